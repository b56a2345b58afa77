//! Everything relay and agent must agree on: the wire protocol ([`wire`]), the control
//! session's liveness rule ([`heartbeat`]), identities in
//! certificates and registration JWTs ([`identity`]), TLS configurations ([`tls`]), the
//! relay URL ([`relay_url`]), the metrics recorder ([`metrics`]), and the data path that moves a stream's bytes ([`datapath`]).
//!
//! Keeping these in one crate means a change to the protocol is one change, seen by both
//! ends at compile time.

pub mod datapath;
pub mod heartbeat;
pub mod identity;
pub mod metrics;
pub mod relay_url;
pub mod tls;
pub mod wire;

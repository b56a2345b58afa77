//! Everything relay and agent must agree on: the wire protocol ([`wire`]), the control
//! session's liveness rule ([`heartbeat`]), identities in
//! certificates and registration JWTs ([`identity`]), TLS configurations ([`tls`]), the
//! relay URL ([`relay_url`]) and the process-wide metrics recorder ([`metrics`]).
//!
//! Keeping these in one crate means a change to the protocol is one change, seen by both
//! ends at compile time. How a stream's bytes move once it is open — kernel TLS, splice,
//! the user-space fallback — is the other shared crate, `sluice-datapath`; this one does
//! no system calls of its own and has no `unsafe`.

#![forbid(unsafe_code)]

pub mod heartbeat;
pub mod identity;
pub mod metrics;
pub mod relay_url;
pub mod tls;
pub mod wire;

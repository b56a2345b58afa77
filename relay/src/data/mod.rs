//! The data plane: what agents and platform jobs connect to, and the live state that
//! joins them.
//!
//! - [`agent_port`]: the one port agents dial (TLS + ALPN): enrollment, control sessions,
//!   data connections;
//! - [`registry`]: live agent sessions, their idle data connections, each resource's
//!   listener and port state;
//! - [`resource_port`]: a resource's port; each platform connection becomes a stream
//!   through a live agent;
//! - [`lease_port`]: endpoint leases: a port per lease, admission by source, expiry and
//!   connection budget, and the leased-only check of fixed ports;
//! - [`streams`]: live and recently closed streams with their byte counts.
//!
//! It reads credentials and persistent state from [`crate::state`], never from the
//! admin plane.

pub mod agent_port;
pub mod lease_port;
pub mod registry;
pub mod resource_port;
pub mod streams;

//! The Sluice relay: the platform side of the tunnel, in three layers.
//!
//! - [`data`] — the data plane: agents dial the agent port, enroll, and hold a control
//!   session and a pool of data connections; each resource gets a stable port where
//!   platform jobs connect, and every connection becomes a stream through a live agent.
//! - [`admin`] — the admin plane: operator actions and the HTTP API; the CLI ([`cli`])
//!   talks to it.
//! - [`state`] — below both: the store, identity material, registration JWTs and the
//!   enrollment decisions.
//!
//! [`relay`] holds the running relay's shared context and starts the listeners of both
//! planes; [`cluster`] its membership of a cluster of relays sharing one store; [`metrics`] is the relay's Prometheus vocabulary; [`limits`] every bound it
//! keeps on what peers may hold, [`admission`] how the listeners enforce them; [`audit`]
//! the audit trail of admin actions and streams; [`lifecycle`] the operator's commands
//! around the relay's life (admin-token rotation, backup, restore).

/// This build's version, commit and date (`--version`, logs, `*_build_info`).
pub use sluice_runtime::{BUILD_DATE, GIT_COMMIT, LONG_VERSION, VERSION};

pub mod admin;
pub(crate) mod admission;
pub mod audit;
pub mod cli;
pub mod cli_tls;
pub mod cluster;
pub(crate) mod data;
pub mod lifecycle;
pub mod limits;
pub(crate) mod metrics;
pub mod relay;
pub mod state;

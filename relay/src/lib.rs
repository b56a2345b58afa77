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
//! planes; [`metrics`] is the relay's Prometheus vocabulary.

/// This build's version (from Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git commit this build was made from (`unknown` outside a git checkout); set by build.rs.
pub const GIT_COMMIT: &str = env!("SLUICE_GIT_COMMIT");
/// The build's date, UTC `YYYY-MM-DD` (`SOURCE_DATE_EPOCH` when set); set by build.rs.
pub const BUILD_DATE: &str = env!("SLUICE_BUILD_DATE");
/// What `--version` prints after the program name, e.g. `0.1.0 (commit 7d5082f, built 2026-11-30)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SLUICE_GIT_COMMIT"),
    ", built ",
    env!("SLUICE_BUILD_DATE"),
    ")"
);

pub mod admin;
pub mod cli;
pub(crate) mod data;
pub(crate) mod metrics;
pub mod relay;
pub mod state;

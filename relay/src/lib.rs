//! The Sluice relay: the platform side of the tunnel.
//!
//! Agents dial the relay's agent port ([`agent_port`]) and enroll, then hold a control
//! session and a pool of data connections ([`registry`]). Each resource gets a stable
//! port ([`resource_port`]) where platform jobs connect; every connection becomes a
//! stream through a live agent. Operators use the admin API ([`api`], [`admin`]) through
//! the CLI ([`cli`]). State lives in a [`store`]; identity material in the data
//! directory ([`pki`]); registration JWTs are signed and checked by [`tokens`].

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
pub mod agent_port;
pub mod api;
pub mod cli;
pub mod enrollment;
pub mod metrics;
pub mod pki;
pub mod registry;
pub mod relay;
pub mod resource_port;
pub mod store;
pub mod streams;
pub mod tokens;

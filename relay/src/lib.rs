//! The Sluice relay: the platform side of the tunnel.
//!
//! Agents dial the relay's agent port ([`agent_port`]) and enroll, then hold a control
//! session and a pool of data connections ([`registry`]). Each resource gets a stable
//! port ([`resource_port`]) where platform jobs connect; every connection becomes a
//! stream through a live agent. Operators use the admin API ([`api`], [`admin`]) through
//! the CLI ([`cli`]). State lives in a [`store`]; identity material in the data
//! directory ([`pki`]); registration JWTs are signed and checked by [`tokens`].

pub mod admin;
pub mod agent_port;
pub mod api;
pub mod cli;
pub mod metrics;
pub mod pki;
pub mod quickstart;
pub mod registry;
pub mod relay;
pub mod resource_port;
pub mod store;
pub mod streams;
pub mod tokens;

/// Starts logging to stderr. `filter` is an env-filter directive such as `info` or
/// `sluice_relay=debug`; `json` switches to one JSON object per line.
pub fn init_logging(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|e| {
        eprintln!("warning: log filter {filter:?} is invalid ({e}); using \"info\"");
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

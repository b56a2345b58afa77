//! What both Sluice binaries (`sluice` and `sluice-agent`) need from the process they
//! run in, written once: log set-up ([`LogArgs`], [`init_logging`]), the shutdown
//! signals ([`shutdown_signal`], [`ShutdownSignals`] for a drain and a second signal), this machine's [`hostname`], [`Secret`] values that
//! never reach a log through `Debug`, the parser of settings that are either blank or a
//! typed value ([`blank_or`]), and configurations made in code from clap's defaults
//! ([`ignoring_env`]), and the build's identity ([`LONG_VERSION`] and its parts).
//! [`sd_notify`] tells systemd (`Type=notify`) when the service is ready and stopping.
//!
//! It is its own small crate so that neither binary owns the other's process glue.

pub mod sd_notify;

use std::fmt;
use std::str::FromStr;

/// This build's version (the workspace's, from Cargo.toml).
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

/// Log options shared by both binaries (`--log`/`SLUICE_LOG`, `--log-json`/`SLUICE_LOG_JSON`).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace, off), optionally with
    /// per-module levels, e.g. `info,sluice_agent::session=debug`.
    #[arg(long, env = "SLUICE_LOG", default_value = "info", global = true)]
    pub log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "SLUICE_LOG_JSON", global = true, value_parser = clap::builder::BoolishValueParser::new())]
    pub log_json: bool,
}

/// Starts logging to stderr. `filter` is a list of directives such as `info` or
/// `info,sluice_relay=debug` (see [`parse_log_filter`]; an invalid one is reported and
/// replaced by `info`); `json` switches to one JSON object per line.
pub fn init_logging(filter: &str, json: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = parse_log_filter(filter).unwrap_or_else(|e| {
        eprintln!("warning: {e}; using \"info\"");
        parse_log_filter("info").expect("a level is a filter")
    });
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
}

/// Parses a log filter: comma-separated directives, each a level (`error`, `warn`,
/// `info`, `debug`, `trace`, `off`) for everything, or `TARGET=LEVEL` for one module
/// and its children (`sluice_agent::session=trace`). Matching is by target prefix only
/// (no regular expressions, no span fields), which keeps a regex engine out of both
/// binaries.
pub fn parse_log_filter(filter: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    let invalid = |why: String| {
        format!(
            "log filter {filter:?} is invalid ({why}): use a level (error, warn, info, debug, trace, off) or \
             TARGET=LEVEL directives separated by commas, e.g. info,sluice_agent=debug"
        )
    };
    if filter.trim().is_empty() {
        return parse_log_filter("info");
    }
    if filter.contains(['[', '{', '/']) {
        return Err(invalid("span and field filters are not supported".into()));
    }
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    if let Some(d) = filter
        .split(',')
        .map(str::trim)
        .find(|d| !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()))
    {
        return Err(invalid(format!("{d:?} is not a level; a module needs one, as in {d}=debug")));
    }
    filter.parse().map_err(|e| invalid(format!("{e}")))
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM, the two ways operators and supervisors
/// (systemd, Docker, Kubernetes) ask a process to stop.
pub async fn shutdown_signal() {
    ShutdownSignals::new().next().await;
}

/// SIGTERM and SIGINT, listened to for the process's life: the first asks for a graceful
/// stop (a drain), a second one for an immediate exit. Made once, before the first
/// wait, so a signal that arrives while the first is handled is not missed.
pub struct ShutdownSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts listening (inside a tokio runtime).
    pub fn new() -> ShutdownSignals {
        use tokio::signal::unix::{SignalKind, signal};
        ShutdownSignals {
            term: signal(SignalKind::terminate()).expect("SIGTERM handler"),
            int: signal(SignalKind::interrupt()).expect("SIGINT handler"),
        }
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    pub async fn next(&mut self) -> &'static str {
        tokio::select! { _ = self.term.recv() => "SIGTERM", _ = self.int.recv() => "SIGINT" }
    }
}

impl Default for ShutdownSignals {
    fn default() -> Self {
        Self::new()
    }
}

/// This machine's host name, `None` when the kernel does not say (each binary picks its
/// own stand-in: the relay needs one that works in a URL).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// `cmd` with every `env = …` removed, so only flags and defaults count: for
/// configurations made in code (`sluice quickstart`, tests), which must not change with
/// the environment of the process that makes them.
pub fn ignoring_env(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| a.env(None::<&str>))
}

/// A value that must not reach a log: its `Debug` prints `Secret(…redacted…)`. Read it
/// with [`Secret::expose`], where it is really needed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Secret<T> {
        Secret(value)
    }

    /// The secret itself.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…redacted…)")
    }
}

/// A clap value parser for a setting given by flag `--x` or environment variable `var`:
/// a blank value (`VAR=` is common in Docker files) means `T::default()`, anything else
/// is parsed with `T::from_str`, and an error names `var` (`VAR: why`), so one parser
/// serves both binaries and the message says which setting to fix.
pub fn blank_or<T>(var: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static
where
    T: FromStr<Err = String> + Default + Clone + Send + Sync + 'static,
{
    move |s: &str| match s.trim() {
        "" => Ok(T::default()),
        s => s.parse().map_err(|e| format!("{var}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = Secret::new("hunter2".to_owned());
        assert_eq!(format!("{s:?}"), "Secret(…redacted…)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn blank_means_default_and_errors_name_the_variable() {
        #[derive(Debug, Clone, Default, PartialEq)]
        struct Level(u8);
        impl FromStr for Level {
            type Err = String;
            fn from_str(s: &str) -> Result<Level, String> {
                s.parse().map(Level).map_err(|_| format!("{s:?} is not a level"))
            }
        }
        let parse = blank_or::<Level>("LEVEL");
        assert_eq!(parse("  "), Ok(Level(0)));
        assert_eq!(parse(" 7 "), Ok(Level(7)));
        assert_eq!(parse("x"), Err("LEVEL: \"x\" is not a level".into()));
    }

    #[test]
    fn log_filters_are_levels_and_target_directives() {
        use tracing::Level;
        use tracing::level_filters::LevelFilter;
        let f = parse_log_filter("info,sluice_relay=debug").unwrap();
        assert!(f.would_enable("sluice_relay::data", &Level::DEBUG));
        assert!(!f.would_enable("sluice_relay::data", &Level::TRACE));
        assert!(f.would_enable("hyper", &Level::INFO) && !f.would_enable("hyper", &Level::DEBUG));
        let only = parse_log_filter("sluice_agent::session=trace").unwrap();
        assert!(only.would_enable("sluice_agent::session::pool", &Level::TRACE));
        assert!(!only.would_enable("sluice_agent", &Level::ERROR), "nothing else is on");
        assert_eq!(parse_log_filter("  ").unwrap().default_level(), Some(LevelFilter::INFO));
        assert_eq!(parse_log_filter("off").unwrap().default_level(), Some(LevelFilter::OFF));
        for bad in ["loud", "sluice_agent=loud", "[span]=debug", "x{a=1}=info"] {
            let e = parse_log_filter(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("e.g. info,sluice_agent=debug"), "{e}");
        }
    }

    #[test]
    fn hostname_is_one_trimmed_line() {
        if let Some(h) = hostname() {
            assert!(!h.is_empty() && !h.contains('\n') && h.trim() == h);
        }
    }

    #[test]
    fn ignoring_env_keeps_the_defaults() {
        #[derive(clap::Parser)]
        struct Cli {
            #[arg(long, env = "PATH", default_value = "d")]
            path: String,
        }
        use clap::{CommandFactory, FromArgMatches};
        let m = ignoring_env(Cli::command()).get_matches_from(["x"]);
        assert_eq!(Cli::from_arg_matches(&m).unwrap().path, "d");
    }
}

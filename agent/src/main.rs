//! `sluice-agent`: configured by environment variables (or the equivalent flags).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice_agent::config::RawConfig;
use tokio_util::sync::CancellationToken;

/// Runs next to a private service and makes it reachable from the platform through the
/// Sluice relay. Dials out only (no inbound port): mutual TLS to the relay, on 443.
///
/// Typical use (Docker or systemd sets these):
///   APP_HOST=db.internal APP_PORT=5432 NAME=orders-db REGISTRATION_JWT=eyJ… sluice-agent
#[derive(Debug, Parser)]
#[command(name = "sluice-agent", version = sluice_agent::LONG_VERSION)]
struct Args {
    /// Host name or IP of the private service.
    #[arg(long, env = "APP_HOST")]
    app_host: Option<String>,
    /// TCP port of the private service.
    #[arg(long, env = "APP_PORT")]
    app_port: Option<String>,
    /// Resource name; agents of one customer with the same NAME share the resource.
    #[arg(long, env = "NAME")]
    name: Option<String>,
    /// Registration JWT from the platform operator.
    #[arg(long, env = "REGISTRATION_JWT", hide_env_values = true)]
    registration_jwt: Option<String>,
    /// Where the agent keeps its key and certificate.
    #[arg(long, env = "STATE_DIR", default_value = sluice_agent::config::DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Relay URL (https://host:port). Default: the one in the registration JWT.
    #[arg(long, env = "SLUICE_URL")]
    sluice_url: Option<String>,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, env = "SLUICE_RECONNECT_MAX_SECS", default_value_t = 30)]
    reconnect_max_secs: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464). Off by
    /// default: the agent opens no port unless asked.
    #[arg(long, env = "SLUICE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// How stream bytes are counted: auto (eBPF when it loads, else user space) or userspace.
    #[arg(long, env = "SLUICE_COUNTER")]
    counter: Option<String>,
    /// How stream bytes move: auto (kernel TLS + splice when the kernel has TLS, else
    /// user-space rustls) or userspace.
    #[arg(long, env = "SLUICE_DATA_PATH")]
    data_path: Option<String>,
    /// Kernel-TLS engine, for benchmarks: splice (default), uring, threads or copy.
    #[arg(long, env = "SLUICE_KTLS_ENGINE", hide_short_help = true)]
    ktls_engine: Option<String>,
    /// Seconds between checks that APP_HOST:APP_PORT accepts TCP connections (a connect
    /// and close, skipped while streams show the service up); 0 checks only at start.
    /// The result is shown by `sluice resources list` and `sluice agents list`.
    #[arg(long, env = "SLUICE_SERVICE_CHECK_SECS", default_value_t = 30)]
    service_check_secs: u64,
    /// Log filter (error, warn, info, debug, trace).
    #[arg(long, env = "SLUICE_LOG", default_value = "info")]
    log: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = RawConfig {
        app_host: args.app_host,
        app_port: args.app_port,
        name: args.name,
        registration_jwt: args.registration_jwt,
        state_dir: Some(args.state_dir),
        relay_url: args.sluice_url,
        reconnect_max_secs: Some(args.reconnect_max_secs),
        metrics_listen: args.metrics_listen,
        counter: args.counter,
        data_path: args.data_path,
        ktls_engine: args.ktls_engine,
        service_check_secs: Some(args.service_check_secs),
    }
    .validate();
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sluice-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signal.cancel();
        });
        match sluice_agent::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-agent: error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
}

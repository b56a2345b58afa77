//! `sluice-agent`: configured by environment variables (or the equivalent flags), see
//! [`sluice_agent::config::AgentConfig`]. Exit codes: 2 bad configuration, 1 refused for
//! good by the relay, 0 stopped by SIGTERM/SIGINT (after draining its streams, up to
//! `SLUICE_DRAIN_TIMEOUT_SECS`; a second signal exits at once). `sluice-agent doctor`
//! checks the same configuration, the relay and the service instead ([`sluice_agent::doctor`]).

use std::process::ExitCode;

use sluice_agent::config::{AgentConfig, ConfigError};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    // `sluice-agent doctor …` checks the same configuration instead of running with it.
    if std::env::args_os().nth(1).is_some_and(|a| a == "doctor") {
        return sluice_agent::doctor::main(std::env::args_os().skip(1).collect());
    }
    let cfg = match AgentConfig::load() {
        Ok(c) => c,
        Err(ConfigError::Clap(e)) => e.exit(),
        Err(ConfigError::Invalid(e)) => {
            eprintln!("sluice-agent: error: {e}");
            return ExitCode::from(2);
        }
    };
    sluice_runtime::init_logging(&cfg.log.log, cfg.log.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let mut signals = sluice_runtime::ShutdownSignals::new();
        tokio::spawn(async move {
            let first = signals.next().await;
            tracing::info!("{first}: shutting down");
            signal.cancel();
            let second = signals.next().await;
            tracing::warn!("{second} during the drain: exiting now, cutting the streams still running");
            std::process::exit(0);
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

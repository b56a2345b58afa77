//! `sluice-agent`: configured by environment variables (or the equivalent flags), see
//! [`sluice_agent::config::AgentConfig`]. Exit codes: 2 bad configuration, 1 refused for
//! good by the relay, 0 stopped by SIGTERM/SIGINT (after draining its streams, up to
//! `SLUICE_DRAIN_TIMEOUT_SECS`; a second signal exits at once).

use std::process::ExitCode;

use sluice_agent::config::{AgentConfig, ConfigError};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    if let Some(code) = completion() {
        return code;
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

/// `sluice-agent completion bash|zsh|fish`: prints a shell completion script for the
/// agent's flags and subcommands, e.g. `sluice-agent completion bash >
/// /etc/bash_completion.d/sluice-agent`. `None` when the command line is not that.
fn completion() -> Option<ExitCode> {
    use clap::CommandFactory;
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("completion") {
        return None;
    }
    let completion_cmd = || {
        clap::Command::new("completion")
            .about("Print a shell completion script (bash, zsh, fish, …)")
            .arg(clap::Arg::new("shell").required(true).value_parser(clap::value_parser!(clap_complete::Shell)))
    };
    let matches = completion_cmd().bin_name("sluice-agent completion").get_matches_from(&args[1..]);
    let shell = *matches.get_one::<clap_complete::Shell>("shell").expect("required");
    let mut cmd = AgentConfig::command().subcommand(completion_cmd());
    clap_complete::generate(shell, &mut cmd, "sluice-agent", &mut std::io::stdout());
    Some(ExitCode::SUCCESS)
}

//! `sluice-agent`: configured by environment variables (or the equivalent flags), see
//! [`sluice_agent::config::AgentConfig`]. Exit codes: 2 bad configuration, 1 refused for
//! good by the relay, 0 stopped by SIGTERM/SIGINT (after draining its streams, up to
//! `SLUICE_DRAIN_TIMEOUT_SECS`; a second signal exits at once). Before exiting 1 or 2 it
//! waits `SLUICE_EXIT_DELAY_SECS` (0 unless set; the image sets 300), see
//! [`delay_final_exit`].
//!
//! `sluice-agent health [ADDR]` asks a running agent's `/readyz` (the container health
//! check; [`sluice_agent::health`]). `sluice-agent doctor` checks the same configuration,
//! the relay and the service instead ([`sluice_agent::doctor`]).

use std::process::ExitCode;

use sluice_agent::config::{AgentConfig, ConfigError};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    if let Some(code) = completion() {
        return code;
    }
    // `sluice-agent health [ADDR]`: the container health check (agent/src/health.rs).
    if std::env::args().nth(1).as_deref() == Some("health") {
        return sluice_agent::health::main(std::env::args().nth(2));
    }
    // `sluice-agent doctor …` checks the same configuration instead of running with it.
    if std::env::args_os().nth(1).is_some_and(|a| a == "doctor") {
        return sluice_agent::doctor::main(std::env::args_os().skip(1).collect());
    }
    let cfg = match AgentConfig::load() {
        Ok(c) => c,
        Err(ConfigError::Clap(e)) => e.exit(),
        Err(ConfigError::Invalid(e)) => {
            eprintln!("sluice-agent: error: {e}");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            rt.block_on(async {
                let mut signals = sluice_runtime::ShutdownSignals::new();
                delay_final_exit(2, async move {
                    signals.next().await;
                })
                .await;
            });
            return ExitCode::from(2);
        }
    };
    sluice_runtime::init_logging(&cfg.log.log, cfg.log.log_json);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let stopped = shutdown.clone();
        let mut signals = sluice_runtime::ShutdownSignals::new();
        tokio::spawn(async move {
            let first = signals.next().await;
            tracing::info!("{first}: shutting down");
            let _ = sluice_runtime::sd_notify::stopping("draining: no new streams, waiting for running ones");
            signal.cancel();
            let second = signals.next().await;
            tracing::warn!("{second} during the drain: exiting now, cutting the streams still running");
            std::process::exit(0);
        });
        match sluice_agent::run(cfg, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sluice-agent: error: {e}");
                delay_final_exit(1, stopped.cancelled()).await;
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
    let mut cmd = AgentConfig::command()
        .subcommand(completion_cmd())
        .subcommand(
            clap::Command::new("doctor").about("Check the configuration, the relay and the private service, in order"),
        )
        .subcommand(
            clap::Command::new("health").about("Exit 0 when the agent's /readyz answers 200 (container health check)"),
        );
    clap_complete::generate(shell, &mut cmd, "sluice-agent", &mut std::io::stdout());
    Some(ExitCode::SUCCESS)
}

/// Before a final exit (2: bad configuration, 1: refused for good), waits
/// `SLUICE_EXIT_DELAY_SECS` (default 0; the container image sets 300) or until SIGTERM/
/// SIGINT (`stop`). Container restart policies restart every exit; this delay keeps a
/// refusal that cannot heal by itself from being retried against the relay in a tight
/// loop. systemd needs none: the unit's RestartPreventExitStatus=1 2 stops it instead.
async fn delay_final_exit(code: u8, stop: impl std::future::Future<Output = ()>) {
    let secs = match std::env::var("SLUICE_EXIT_DELAY_SECS") {
        Err(_) => return,
        Ok(v) if v.trim().is_empty() => return,
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) => secs,
            Err(_) => {
                return eprintln!(
                    "sluice-agent: SLUICE_EXIT_DELAY_SECS={v:?} is not a number of seconds; exiting {code} at once"
                );
            }
        },
    };
    if secs == 0 {
        return;
    }
    eprintln!(
        "sluice-agent: waiting {secs} s before exiting {code} (SLUICE_EXIT_DELAY_SECS), so that a restart policy does \
         not retry at once what cannot succeed by itself: fix the error above, then restart the agent (a stop signal \
         exits now)"
    );
    tokio::select! {
        _ = tokio::time::sleep(std::time::Duration::from_secs(secs)) => {}
        _ = stop => {}
    }
}

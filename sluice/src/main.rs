//! `sluice`: the relay server, a quickstart demo, and the admin CLI.
//!
//! This crate is where the relay and the agent meet: `sluice quickstart` runs both in one
//! process, so the relay library itself does not depend on the agent.

mod quickstart;

use std::process::ExitCode;
use std::time::Duration;

use crate::quickstart::QuickstartArgs;
use clap::{Parser, Subcommand};
use sluice_relay::cli::{self, AdminConn, CustomersCmd, ResourcesCmd, TokensCmd};
use sluice_relay::relay::{self, RelayConfig};

/// Sluice reaches services inside customers' private networks without inbound ports.
///
/// The relay (`sluice serve`) runs on the platform. Customers run `sluice-agent` next to
/// a private service; it dials out to the relay over mutual TLS. Platform jobs connect
/// to the host:port the relay hands out per resource (`sluice resources endpoint NAME`).
///
/// First time? Run `sluice quickstart`.
#[derive(Debug, Parser)]
#[command(name = "sluice", version = sluice_relay::LONG_VERSION, propagate_version = true)]
struct Cli {
    #[command(flatten)]
    log: sluice_runtime::LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of `Serve`'s flags costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the relay: the agent port, the admin API and one port per resource.
    Serve(Box<RelayConfig>),
    /// Start a relay, a demo customer and an agent in one process, and print the
    /// endpoint to connect to.
    Quickstart(QuickstartArgs),
    /// Manage customers (talks to the admin API).
    Customers {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: CustomersCmd,
    },
    /// Manage resources and registration JWTs (talks to the admin API).
    Resources {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: ResourcesCmd,
    },
    /// Show connected agents: resource, host, version, peer, data path, service state.
    Agents {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: cli::AgentsCmd,
    },
    /// List registration JWTs and revoke them one by one (talks to the admin API).
    Tokens {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// API tokens with roles (admin, operator, platform, customer): create, list, revoke.
    #[command(name = "api-tokens")]
    ApiTokens {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: cli::ApiTokensCmd,
    },
    /// The audit trail: admin actions (who, what, target, result, from where) and streams
    /// (resource, agent, client, bytes each way, how they ended).
    Audit {
        #[command(flatten)]
        conn: AdminConn,
        #[command(flatten)]
        args: cli::AuditArgs,
    },
    /// The cluster's relays (they share a PostgreSQL store): list, drain for an upgrade.
    Relays {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: cli::RelaysCmd,
    },
    /// Endpoint leases: a fresh port per platform execution, admitting only its holder
    /// (source network, connection budget, expiry). Talks to the admin API.
    Leases {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: cli::LeasesCmd,
    },
    /// Show live streams: resource, agent, client, bytes in/out, rate, data path, counter.
    Streams {
        #[command(flatten)]
        conn: AdminConn,
        #[command(flatten)]
        args: cli::StreamsArgs,
    },
    /// Print a shell completion script: `sluice completion bash >
    /// /etc/bash_completion.d/sluice`, `sluice completion zsh > "${fpath[1]}/_sluice"`,
    /// `sluice completion fish > ~/.config/fish/completions/sluice.fish`.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// The admin token: rotate it without a restart (talks to the admin API).
    #[command(name = "admin-token")]
    AdminToken {
        #[command(flatten)]
        conn: AdminConn,
        #[command(subcommand)]
        cmd: sluice_relay::lifecycle::AdminTokenCmd,
    },
    /// Copy the relay's state (store, CA and keys) into a directory while it runs.
    Backup(sluice_relay::lifecycle::BackupArgs),
    /// Make a new data directory from a backup (`sluice backup`).
    Restore(sluice_relay::lifecycle::RestoreArgs),
}

/// Runs the relay until SIGTERM or Ctrl-C, then drains it (`--drain-timeout`); a second
/// signal during the drain exits at once. Exits 0 either way: the stop was asked for.
async fn serve(config: RelayConfig) -> anyhow::Result<()> {
    let mut signals = sluice_runtime::ShutdownSignals::new();
    let deadline = config.drain_timeout;
    let running = relay::start(config).await?;
    // systemd (Type=notify): ready once the listeners are bound and the store is open.
    notify(sluice_runtime::sd_notify::ready("serving agents, the admin API and resource ports"));
    let asked = running.relay.cluster.drain_requested.clone();
    tokio::select! {
        signal = signals.next() => tracing::info!("{signal}: shutting down"),
        _ = asked.cancelled() => tracing::info!("`sluice relays drain`: draining for an upgrade, then exiting 0"),
    }
    notify(sluice_runtime::sd_notify::stopping("draining: no new streams, waiting for running ones"));
    tokio::select! {
        _ = running.drain(deadline) => {}
        second = signals.next() => {
            tracing::warn!("{second} during the drain: exiting now, cutting the streams still running");
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// Reports a failed systemd notification (`$NOTIFY_SOCKET` set but not reachable):
/// systemd would then wait for readiness until its start timeout.
fn notify(sent: std::io::Result<bool>) {
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd ($NOTIFY_SOCKET); with Type=notify it waits until TimeoutStartSec");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_cli = matches!(
        cli.cmd,
        Cmd::Customers { .. }
            | Cmd::Resources { .. }
            | Cmd::Tokens { .. }
            | Cmd::Streams { .. }
            | Cmd::Agents { .. }
            | Cmd::Relays { .. }
            | Cmd::Leases { .. }
            | Cmd::ApiTokens { .. }
            | Cmd::Audit { .. }
            | Cmd::AdminToken { .. }
    );
    sluice_runtime::init_logging(if quiet_cli { "warn" } else { &cli.log.log }, cli.log.log_json);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(*a).await,
            Cmd::Quickstart(a) => quickstart::run(a).await,
            Cmd::Customers { conn, cmd } => cli::customers(&conn, cmd).await,
            Cmd::Resources { conn, cmd } => cli::resources(&conn, cmd).await,
            Cmd::Tokens { conn, cmd } => cli::tokens(&conn, cmd).await,
            Cmd::Streams { conn, args } => cli::streams(&conn, args).await,
            Cmd::Agents { conn, cmd } => cli::agents(&conn, cmd).await,
            Cmd::Relays { conn, cmd } => cli::relays(&conn, cmd).await,
            Cmd::Leases { conn, cmd } => cli::leases(&conn, cmd).await,
            Cmd::ApiTokens { conn, cmd } => cli::api_tokens(&conn, cmd).await,
            Cmd::Audit { conn, args } => cli::audit(&conn, args).await,
            Cmd::Completion { shell } => {
                let mut cmd = <Cli as clap::CommandFactory>::command();
                clap_complete::generate(shell, &mut cmd, "sluice", &mut std::io::stdout());
                Ok(())
            }
            Cmd::AdminToken { conn, cmd } => sluice_relay::lifecycle::admin_token(&conn, cmd).await,
            Cmd::Backup(args) => sluice_relay::lifecycle::run_backup(&args),
            Cmd::Restore(args) => sluice_relay::lifecycle::run_restore(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! `sluice`: the relay server, a quickstart demo, and the admin CLI.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sluice_datapath::{DataPathMode, KtlsEngine};
use sluice_relay::cli::{self, AdminConn, CustomersCmd, ResourcesCmd, TokensCmd};
use sluice_relay::quickstart::{self, QuickstartArgs};
use sluice_relay::relay::{self, RelayConfig, parse_port_range};

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
    /// Log filter (error, warn, info, debug, trace, or per-module directives).
    #[arg(long, env = "SLUICE_LOG", default_value = "info", global = true)]
    log: String,
    /// Log as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the relay: the agent port, the admin API and one port per resource.
    Serve(ServeArgs),
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
    /// Show live streams: resource, agent, client, bytes in/out, rate, data path, counter.
    Streams {
        #[command(flatten)]
        conn: AdminConn,
        #[command(flatten)]
        args: cli::StreamsArgs,
    },
}

/// Options of `sluice serve`.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Where the relay keeps its CA, keys, admin token and embedded database.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    data_dir: PathBuf,
    /// Address agents dial (443 in production).
    #[arg(long, env = "SLUICE_AGENT_LISTEN", default_value = "0.0.0.0:8443")]
    agent_listen: SocketAddr,
    /// Address of the admin API (keep it private).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    admin_listen: SocketAddr,
    /// URL agents dial, written into registration JWTs, e.g. https://relay.example.com:443.
    /// Default: derived from --agent-listen.
    #[arg(long, env = "SLUICE_PUBLIC_URL")]
    public_url: Option<String>,
    /// Address the per-resource ports listen on.
    #[arg(long, env = "SLUICE_RESOURCE_BIND", default_value = "127.0.0.1")]
    resource_bind: IpAddr,
    /// Port range for resources; each resource keeps its port across restarts. The
    /// default stays below Linux's ephemeral ports (32768-60999), which outgoing
    /// connections may hold.
    #[arg(long, env = "SLUICE_RESOURCE_PORTS", default_value = "20000-20999", value_parser = parse_port_range)]
    resource_ports: std::ops::RangeInclusive<u16>,
    /// Store location. Default: SQLite file `sluice.db` in the data directory.
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    database_url: Option<String>,
    /// Heartbeat interval of agent sessions in seconds; a silent peer is dead after three.
    #[arg(long, env = "SLUICE_HEARTBEAT_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    heartbeat_secs: u64,
    /// Idle data connections each agent keeps open for new streams.
    #[arg(long, env = "SLUICE_POOL_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pool_size: u32,
    /// How stream bytes move: `auto` hands each tunnel connection's TLS to the kernel
    /// (kTLS + splice, no payload copies) when the kernel supports it and falls back to
    /// user-space rustls otherwise; `userspace` always uses rustls.
    #[arg(long, env = "SLUICE_DATA_PATH", default_value = "auto")]
    data_path: DataPathMode,
    /// Kernel-TLS engine, for benchmarks: splice (default, fastest measured), uring,
    /// threads, or copy (read/write through a buffer).
    #[arg(long, env = "SLUICE_KTLS_ENGINE", default_value = "splice", hide_short_help = true)]
    ktls_engine: KtlsEngine,
    /// How long the client certificates signed for agents are valid (e.g. 30d, 12h).
    /// Agents renew theirs over the control session when a third is left, without their
    /// registration JWT. Shorter means a stolen agent key is useful for less time.
    #[arg(long, env = "SLUICE_AGENT_CERT_LIFETIME", default_value = "30d", value_parser = parse_cert_lifetime)]
    agent_cert_lifetime: u64,
}

/// A certificate lifetime: a duration of at least [`sluice_relay::pki::MIN_AGENT_CERT_SECS`].
fn parse_cert_lifetime(s: &str) -> Result<u64, String> {
    let secs = cli::parse_duration_secs(s)?;
    let min = sluice_relay::pki::MIN_AGENT_CERT_SECS;
    if secs < min {
        return Err(format!("{s:?} is too short: agent certificates must live at least {min} s"));
    }
    if secs > 10 * 365 * 86_400 {
        return Err(format!("{s:?} is too long: at most 10 years (3650d)"));
    }
    Ok(secs)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let running = relay::start(RelayConfig {
        data_dir: args.data_dir,
        agent_listen: args.agent_listen,
        admin_listen: args.admin_listen,
        public_url: args.public_url,
        resource_bind: args.resource_bind,
        resource_ports: args.resource_ports,
        database_url: args.database_url,
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        pool_size: args.pool_size,
        data_path: args.data_path,
        ktls_engine: args.ktls_engine,
        agent_cert_lifetime: Duration::from_secs(args.agent_cert_lifetime),
    })
    .await?;
    quickstart::wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let quiet_cli = matches!(
        cli.cmd,
        Cmd::Customers { .. } | Cmd::Resources { .. } | Cmd::Tokens { .. } | Cmd::Streams { .. } | Cmd::Agents { .. }
    );
    sluice_relay::init_logging(if quiet_cli { "warn" } else { &cli.log }, cli.log_json);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Quickstart(a) => quickstart::run(a).await,
            Cmd::Customers { conn, cmd } => cli::customers(&conn, cmd).await,
            Cmd::Resources { conn, cmd } => cli::resources(&conn, cmd).await,
            Cmd::Tokens { conn, cmd } => cli::tokens(&conn, cmd).await,
            Cmd::Streams { conn, args } => cli::streams(&conn, args).await,
            Cmd::Agents { conn, cmd } => cli::agents(&conn, cmd).await,
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

//! `sluice quickstart`: a relay, a demo customer, a registration JWT and an agent in one
//! process, pointed at a built-in echo service (or `--app-host/--app-port`), so a new
//! user sees a stream go through the tunnel within seconds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use sluice_agent::config::AgentConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use sluice_relay::admin::ops::{JwtRequest, Status};
use sluice_relay::relay::{self, RelayConfig, parse_port_range};

/// Options of `sluice quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Data directory for the relay (kept). Default: a temporary one, removed on exit.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Private service host for the agent. Default: a built-in echo service.
    #[arg(long, requires = "app_port")]
    pub app_host: Option<String>,
    /// Private service port for the agent.
    #[arg(long, requires = "app_host")]
    pub app_port: Option<u16>,
    /// Resource name.
    #[arg(long, default_value = "demo-echo")]
    pub name: String,
    /// Where the relay listens for agents.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub agent_listen: SocketAddr,
    /// Where the admin API listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub admin_listen: SocketAddr,
    /// Port range for resources. Default: `sluice serve`'s (below Linux's ephemeral ports).
    #[arg(long, value_parser = parse_port_range)]
    pub resource_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Exit after the self-check instead of serving until Ctrl-C: status 0 when a message
    /// went through the tunnel and back, 1 otherwise (for CI and install scripts).
    #[arg(long, conflicts_with_all = ["app_host", "app_port"])]
    pub check: bool,
}

/// A tiny echo service standing in for a private database or SFTP server.
async fn echo_service() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

pub async fn run(args: QuickstartArgs) -> Result<()> {
    let (data_dir, _temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new().prefix("sluice-quickstart-").tempdir()?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    // `sluice serve`'s defaults (heartbeat, pool size, data path, certificate
    // lifetime…), on this machine only.
    let serve = RelayConfig::defaults();
    let running = relay::start(RelayConfig {
        data_dir: data_dir.clone(),
        agent_listen: args.agent_listen,
        admin_listen: args.admin_listen,
        resource_bind: "127.0.0.1".parse().expect("address"),
        resource_ports: args.resource_ports.clone().unwrap_or(serve.resource_ports.clone()),
        ..serve
    })
    .await?;
    let relay = running.relay.clone();

    let (app_host, app_port, what) = match (&args.app_host, args.app_port) {
        (Some(h), Some(p)) => (h.clone(), p, format!("{h}:{p}")),
        _ => {
            let a = echo_service().await?;
            (a.ip().to_string(), a.port(), format!("{a} (built-in echo service)"))
        }
    };
    let customer = match relay.customers()?.into_iter().find(|c| c.name == "demo") {
        Some(c) => c,
        None => relay.create_customer("demo")?,
    };
    let jwt =
        relay.issue_registration_jwt(&JwtRequest { customer_id: Some(customer.id.clone()), ..Default::default() })?.jwt;

    // The agent's defaults, but a quick reconnect: relay and agent share this process.
    let mut agent_cfg = AgentConfig::new(&app_host, app_port, &args.name, &jwt).map_err(anyhow::Error::msg)?;
    agent_cfg.state_dir = data_dir.join("agent-state");
    agent_cfg.reconnect_max = Duration::from_secs(5);
    let agent_cfg = agent_cfg.validate().map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    let agent = tokio::spawn(sluice_agent::run(agent_cfg, stop.clone()));

    // Wait for the agent to register and its session to come up.
    let started = Instant::now();
    let view = loop {
        if let Ok(v) = relay.resource_view(&args.name, Some(&customer.id))
            && v.status == Status::Available
        {
            break v;
        }
        if agent.is_finished() || started.elapsed() > Duration::from_secs(30) {
            bail!("the demo agent did not come up within 30 s; see the log above");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let check = self_check(&view.endpoint, args.app_host.is_none()).await;

    print_running(&Running {
        relay_url: relay.public_url.to_string(),
        admin_url: &running.admin_url,
        admin_token: &relay.identity.admin_token,
        customer: &customer,
        view: &view,
        service: &what,
        check: &check,
    });
    if args.check {
        stop.cancel();
        running.shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(2), agent).await;
        return match check {
            Ok(_) => {
                println!("Self-check passed; stopping (--check).");
                Ok(())
            }
            Err(e) => Err(e.context("the quickstart self-check failed")),
        };
    }
    match &args.data_dir {
        Some(d) => println!("Data directory: {} (kept). Stop with Ctrl-C.", d.display()),
        None => println!("Data directory: {} (temporary, removed on exit). Stop with Ctrl-C.", data_dir.display()),
    }
    sluice_runtime::shutdown_signal().await;
    println!("Stopping.");
    stop.cancel();
    running.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(2), agent).await;
    Ok(())
}

/// What the quickstart prints once its tunnel is up.
struct Running<'a> {
    relay_url: String,
    admin_url: &'a str,
    admin_token: &'a str,
    customer: &'a sluice_relay::state::store::Customer,
    view: &'a sluice_relay::admin::ops::ResourceView,
    /// The private service the agent forwards to.
    service: &'a str,
    check: &'a Result<Option<f64>>,
}

fn print_running(r: &Running<'_>) {
    println!();
    println!("Sluice quickstart is running.");
    println!("  relay (agents dial)  {}", r.relay_url);
    println!("  admin API            {}", r.admin_url);
    println!("  customer             {} ({})", r.customer.name, r.customer.id);
    println!("  resource             {} ({}) -> agent -> {}", r.view.name, r.view.id, r.service);
    println!();
    println!("Platform jobs connect to:  {}", r.view.endpoint);
    match r.check {
        Ok(Some(ms)) => println!("  self-check: a message went through the tunnel and back in {ms:.1} ms"),
        Ok(None) => {}
        Err(e) => println!("  self-check FAILED: {e:#}"),
    }
    let (host, port) = r.view.endpoint.rsplit_once(':').unwrap_or((&r.view.endpoint, ""));
    println!("  try:  echo hello | nc -q1 {host} {port}");
    println!();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(std::path::Path::to_path_buf)) {
        let agent = dir.join("sluice-agent");
        println!("Binaries: {} (relay + admin CLI)", dir.join("sluice").display());
        if agent.exists() {
            println!("          {} (agent)", agent.display());
        } else {
            println!("          build the agent with `cargo build --release` (target/release/sluice-agent)");
        }
        println!();
    }
    println!("Use the admin CLI against this relay from another terminal:");
    println!("  export SLUICE_ADMIN_URL={} SLUICE_ADMIN_TOKEN={}", r.admin_url, r.admin_token);
    println!("  cargo run --release -- resources list --extended");
    println!();
}

/// Sends a message through the endpoint and checks the echo (only for the built-in echo).
async fn self_check(endpoint: &str, is_echo: bool) -> Result<Option<f64>> {
    if !is_echo {
        return Ok(None);
    }
    let t = Instant::now();
    let mut s = TcpStream::connect(endpoint).await.with_context(|| format!("connecting to {endpoint}"))?;
    s.write_all(b"sluice quickstart").await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await.context("no echo in 10 s")??;
    if back != b"sluice quickstart" {
        bail!("the echo came back different: {:?}", String::from_utf8_lossy(&back));
    }
    Ok(Some(t.elapsed().as_secs_f64() * 1000.0))
}

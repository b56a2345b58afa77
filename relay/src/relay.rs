//! The running relay: configuration, shared state, and start-up of its three kinds of
//! listener (the agent port, the admin API, one port per resource with a live agent).

use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::TypedValueParser as _;
use sluice_datapath::{DataPath, DataPathMode, KtlsEngine};
use sluice_proto::relay_url::RelayUrl;
use sluice_runtime::blank_or;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::data::registry::Registry;
use crate::state::data_dir::DataDirLock;
use crate::state::pki::{RelayIdentity, files};
use crate::state::store::{PgStore, SqliteStore, Store, redacted_url};
use crate::state::store_watch::StoreHealth;
use crate::state::tokens::TokenSigner;

/// Everything `sluice serve` is told: its options, parsed and typed by clap from flags or
/// environment variables. The defaults are written once, here; `sluice quickstart`
/// starts from the same ones ([`RelayConfig::defaults`]).
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Where the relay keeps its CA, keys, admin token and embedded database.
    #[arg(long, env = "SLUICE_DATA_DIR", default_value = "./sluice-data")]
    pub data_dir: PathBuf,
    /// Address agents dial (443 in production).
    #[arg(long, env = "SLUICE_AGENT_LISTEN", default_value = "0.0.0.0:8443")]
    pub agent_listen: SocketAddr,
    /// Address of the admin API (keep it private).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "127.0.0.1:8080")]
    pub admin_listen: SocketAddr,
    /// URL agents dial, written into registration JWTs, e.g. https://relay.example.com:443.
    /// Default: derived from --agent-listen.
    #[arg(long, env = "SLUICE_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// In a cluster of relays: the URL agents use to reach THIS relay (e.g.
    /// https://relay-2.example.com), told to every agent so each holds a session to every
    /// relay. --public-url stays the cluster's entry (one DNS name or load balancer, in
    /// the JWTs). Default: --public-url.
    #[arg(long, env = "SLUICE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Address the per-resource ports listen on.
    #[arg(long, env = "SLUICE_RESOURCE_BIND", default_value = "127.0.0.1")]
    pub resource_bind: IpAddr,
    /// Host platform jobs are told to connect to for resource ports (`resources
    /// endpoint`): in a cluster, the name of a TCP load balancer or DNS name in front of
    /// every relay. Default: --resource-bind, or the --public-url host when that is 0.0.0.0.
    #[arg(long, env = "SLUICE_RESOURCE_HOST")]
    pub resource_host: Option<String>,
    /// Port range for resources; each resource keeps its port across restarts. The
    /// default stays below Linux's ephemeral ports (32768-60999), which outgoing
    /// connections may hold.
    #[arg(long, env = "SLUICE_RESOURCE_PORTS", default_value = "20000-20999", value_parser = parse_port_range)]
    pub resource_ports: RangeInclusive<u16>,
    /// Port range for endpoint leases (`sluice leases create`): each lease gets the
    /// lowest port of it that no active lease holds; a port is used again once its lease
    /// ended. Keep it apart from --resource-ports and below the ephemeral ports.
    #[arg(long, env = "SLUICE_LEASE_PORTS", default_value = "21000-21999", value_parser = parse_port_range)]
    pub lease_ports: RangeInclusive<u16>,
    /// How long the streams still open under a lease that ended (expired or deleted) may
    /// run on before the relay cuts them (e.g. 30s, 2m; 0: at once). New connections are
    /// refused as soon as the lease ends.
    #[arg(long, env = "SLUICE_LEASE_GRACE", default_value = "30s", value_parser = parse_lease_grace)]
    pub lease_grace: Duration,
    /// Store location. Default: the SQLite file `sluice.db` in the data directory. A path
    /// (or sqlite://PATH) names another SQLite file; postgres://USER:PASSWORD@HOST:PORT/DB
    /// (or postgresql://…) keeps the state in PostgreSQL, in a database the user owns
    /// (the relay creates its tables), so that several relays can share it.
    #[arg(long, env = "SLUICE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Heartbeat interval of agent sessions in seconds; a silent peer is dead after three.
    #[arg(long = "heartbeat-secs", env = "SLUICE_HEARTBEAT_SECS", default_value = "10",
          value_parser = clap::value_parser!(u64).range(1..=300).map(Duration::from_secs))]
    pub heartbeat: Duration,
    /// Idle data connections each agent keeps open for new streams at rest. While streams
    /// arrive faster than an agent refills, it keeps more (up to 64), then falls back.
    #[arg(long, env = "SLUICE_POOL_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub pool_size: u32,
    /// How stream bytes move: `auto` hands each tunnel connection's TLS to the kernel
    /// (kTLS + splice, no payload copies) when the kernel supports it and falls back to
    /// user-space rustls otherwise; `userspace` always uses rustls.
    #[arg(long, env = "SLUICE_DATA_PATH", default_value = "auto", value_parser = blank_or::<DataPathMode>("SLUICE_DATA_PATH"))]
    pub data_path: DataPathMode,
    /// Reuse a data connection for the next stream after a clean end, when both this
    /// relay's and the agent's streams run on user-space TLS (the agent announces it):
    /// new streams then skip the TCP + TLS handshake. `off` closes every data
    /// connection after its stream, as relays before it did (docs/protocol.md).
    #[arg(long, env = "SLUICE_DATA_REUSE", default_value = "on", value_name = "on|off", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub data_reuse: bool,
    /// Kernel-TLS engine: splice (the default, fastest measured). Builds with the cargo
    /// feature bench-engines also take uring, threads and copy, for benchmarks.
    #[arg(long, env = "SLUICE_KTLS_ENGINE", default_value = "splice", hide_short_help = true,
          value_parser = blank_or::<KtlsEngine>("SLUICE_KTLS_ENGINE"))]
    pub ktls_engine: KtlsEngine,
    /// How long the client certificates signed for agents are valid (e.g. 30d, 12h).
    /// Agents renew theirs over the control session when a third is left, without their
    /// registration JWT. Shorter means a stolen agent key is useful for less time.
    #[arg(long, env = "SLUICE_AGENT_CERT_LIFETIME", default_value = "30d", value_parser = parse_cert_lifetime)]
    pub agent_cert_lifetime: Duration,
    /// On SIGTERM or Ctrl-C the relay drains: it closes the resource ports and the agent
    /// port at once (no new streams), lets the streams under way finish for up to this
    /// long (e.g. 30s, 2m; 0: none), then exits 0, cutting what still runs. A second
    /// signal exits at once.
    #[arg(long, env = "SLUICE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_drain_timeout)]
    pub drain_timeout: Duration,
    /// Start with a new, EMPTY database although the data directory holds this relay's
    /// CA (so it served before, and its database is missing): every customer, resource
    /// and agent is gone, and every agent must enroll again. Without it the relay refuses
    /// to start in that case, so a lost database file is never replaced silently.
    #[arg(long, env = "SLUICE_RECREATE_DATABASE", value_parser = clap::builder::BoolishValueParser::new())]
    pub recreate_database: bool,
    /// Also write every audit record (admin actions, streams) as a JSON line to this
    /// file (created 0600, appended to), or `-` for stdout. The store keeps them either
    /// way (`sluice audit`).
    #[arg(long, env = "SLUICE_AUDIT_LOG", value_name = "PATH", value_parser = crate::audit::parse_sink)]
    pub audit_log: Option<PathBuf>,
    /// Serve the admin API over TLS with a certificate the relay issues from its own CA
    /// at every start, for localhost, 127.0.0.1, ::1, this host's name, the
    /// --admin-listen address and the --public-url host. The CLI on this host trusts it
    /// through the data directory's ca.pem; elsewhere pass that file as --admin-ca.
    #[arg(long, env = "SLUICE_ADMIN_TLS", value_parser = clap::builder::BoolishValueParser::new(),
          conflicts_with = "admin_tls_cert")]
    pub admin_tls: bool,
    /// Serve the admin API over TLS with this certificate chain (PEM, leaf first), e.g.
    /// one your PKI issued for the admin host name; needs --admin-tls-key.
    #[arg(long, env = "SLUICE_ADMIN_TLS_CERT", value_name = "FILE", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,
    /// The private key (PEM: PKCS#8, SEC1 or PKCS#1) of --admin-tls-cert.
    #[arg(long, env = "SLUICE_ADMIN_TLS_KEY", value_name = "FILE", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,
    /// Bounds on connections, handshakes, streams and per-customer quotas.
    #[command(flatten)]
    pub limits: crate::limits::Limits,
}

impl RelayConfig {
    /// `sluice serve`'s defaults, environment not read (for relays started in code:
    /// `sluice quickstart`, tests). Change fields before [`start`].
    pub fn defaults() -> RelayConfig {
        use clap::{Args, FromArgMatches};
        let cmd = sluice_runtime::ignoring_env(RelayConfig::augment_args(clap::Command::new("serve")));
        RelayConfig::from_arg_matches(&cmd.get_matches_from(["serve"])).expect("the defaults parse")
    }
}

/// A certificate lifetime: a duration of at least [`crate::state::pki::MIN_AGENT_CERT_SECS`]
/// and at most 10 years.
fn parse_cert_lifetime(s: &str) -> Result<Duration, String> {
    let secs = crate::cli::parse_duration_secs(s)?;
    let min = crate::state::pki::MIN_AGENT_CERT_SECS;
    if secs < min {
        return Err(format!("{s:?} is too short: agent certificates must live at least {min} s"));
    }
    if secs > 10 * 365 * 86_400 {
        return Err(format!("{s:?} is too long: at most 10 years (3650d)"));
    }
    Ok(Duration::from_secs(secs))
}

/// A drain deadline: a duration (30s, 2m) or a number of seconds, 0 to 1 hour.
fn parse_drain_timeout(s: &str) -> Result<Duration, String> {
    let secs = match s.trim() {
        "0" | "0s" => 0,
        s => crate::cli::parse_duration_secs(s)?,
    };
    if secs > 3600 {
        return Err(format!("{s:?} is too long: a drain waits at most 1 hour (1h)"));
    }
    Ok(Duration::from_secs(secs))
}

/// A lease grace period: a duration (30s, 2m) or a number of seconds, 0 to 1 hour.
fn parse_lease_grace(s: &str) -> Result<Duration, String> {
    parse_drain_timeout(s).map_err(|e| e.replace("a drain waits", "a lease's grace lasts"))
}

/// The relay's shared state, handed to every task.
pub struct Relay {
    pub config: RelayConfig,
    pub public_url: RelayUrl,
    pub identity: RelayIdentity,
    pub(crate) signer: TokenSigner,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) registry: Registry,
    pub(crate) streams: Arc<crate::data::streams::Streams>,
    pub(crate) metrics: sluice_proto::metrics::PrometheusHandle,
    pub shutdown: CancellationToken,
    /// How streams move bytes (decided once at start).
    pub(crate) data_path: DataPath,
    next_stream_id: AtomicU64,
    /// True while the agent port's accept loop runs (for `/readyz`).
    pub(crate) agent_listener_up: AtomicBool,
    /// What the database watch last found wrong (for `/readyz`).
    pub(crate) store_health: Arc<StoreHealth>,
    /// This relay's membership of its cluster (one relay on SQLite: a cluster of one).
    pub cluster: crate::cluster::Cluster,
    /// The endpoint leases this relay serves, and the leased-only resources.
    pub(crate) leases: crate::data::lease_port::Leases,
    /// The audit trail (store and `--audit-log`).
    pub(crate) audit: crate::audit::Audit,
    /// The data directory's admin token as this relay holds it (a rotation replaces it
    /// without a restart: [`crate::admin::admin_token`]).
    pub(crate) admin_token: parking_lot::RwLock<String>,
    /// Held for the relay's life: no second relay on this data directory.
    _lock: DataDirLock,
}

impl Relay {
    /// True when streams to an agent with these capabilities are framed, so their data
    /// connections are reused: reuse is on, this relay's streams run on user-space TLS,
    /// and the agent's do too (it announced `reuse`).
    pub(crate) fn frames_streams_for(&self, agent: &sluice_proto::wire::Capabilities) -> bool {
        self.config.data_reuse && !self.data_path.kernel_tls() && agent.reuse
    }

    /// One line for the start-up log: whether data connections are reused, and why not.
    fn describe_reuse(&self) -> &'static str {
        if !self.config.data_reuse {
            "closed after each stream (SLUICE_DATA_REUSE=off)"
        } else if self.data_path.kernel_tls() {
            "closed after each stream: they are handed to kernel TLS, and reuse needs user-space TLS at both ends"
        } else {
            "reused for the next stream after a clean end, with agents whose streams run on user-space TLS"
        }
    }

    /// The enrollment decisions, with what they need of this relay.
    pub(crate) fn enroller(&self) -> crate::state::enrollment::Enroller<'_> {
        crate::state::enrollment::Enroller {
            store: &*self.store,
            signer: &self.signer,
            identity: &self.identity,
            resource_ports: self.config.resource_ports.clone(),
            cert_lifetime: self.config.agent_cert_lifetime,
            max_resources_per_customer: self.config.limits.max_resources_per_customer,
            max_enrollments_per_jwt_per_hour: self.config.limits.max_enrollments_per_jwt_per_hour,
        }
    }

    pub(crate) fn next_stream_id(&self) -> u64 {
        self.next_stream_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// `host:port` platform jobs use for a resource's port.
    pub fn endpoint(&self, port: u16) -> String {
        let host = resource_host(&self.config, &self.public_url);
        if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
    }
}

/// The host platform jobs connect to for resource ports on this relay.
fn resource_host(config: &RelayConfig, public_url: &RelayUrl) -> String {
    if let Some(h) = config.resource_host.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
        return h.trim_start_matches('[').trim_end_matches(']').to_owned();
    }
    if config.resource_bind.is_unspecified() { public_url.host.clone() } else { config.resource_bind.to_string() }
}

/// A started relay: where it listens, and how to stop it.
pub struct RunningRelay {
    pub relay: Arc<Relay>,
    pub agent_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub admin_url: String,
}

impl RunningRelay {
    /// Stops accepting and ends every session.
    pub fn shutdown(&self) {
        self.relay.shutdown.cancel();
    }

    /// Drains the relay: stops accepting (resource ports, agent port, admin API, agent
    /// sessions end) so no new stream starts, then waits up to `deadline` for the streams
    /// under way to finish, reporting progress in the log. Returns how many streams were
    /// still running at the deadline (0: drained).
    pub async fn drain(&self, deadline: Duration) -> usize {
        let streams = &self.relay.streams;
        crate::metrics::draining(true);
        // First out of the cluster's set, so the agents stop holding sessions here and
        // the other relays stop listing it; then close.
        self.relay.cluster.start_draining(&*self.relay.store, &self.relay.registry);
        self.shutdown();
        let active = streams.live_count();
        if active == 0 {
            info!("draining: no stream active; exiting");
            self.relay.cluster.leave(&*self.relay.store);
            return 0;
        }
        info!(
            active,
            deadline_secs = deadline.as_secs(),
            "draining: {active} stream(s) active, waiting up to {} s for them to finish; the resource ports and the \
             agent port are closed; a second SIGTERM or Ctrl-C exits at once",
            deadline.as_secs()
        );
        let started = tokio::time::Instant::now();
        let mut last_report = started;
        loop {
            let active = streams.live_count();
            if active == 0 {
                info!(secs = started.elapsed().as_secs_f64(), "drained: every stream finished; exiting");
                self.relay.cluster.leave(&*self.relay.store);
                return 0;
            }
            if started.elapsed() >= deadline {
                warn!(
                    active,
                    "drain deadline (--drain-timeout {} s) reached: cutting {active} stream(s) still running",
                    deadline.as_secs()
                );
                self.relay.cluster.leave(&*self.relay.store);
                return active;
            }
            if last_report.elapsed() >= Duration::from_secs(5) {
                last_report = tokio::time::Instant::now();
                let left = deadline.saturating_sub(started.elapsed()).as_secs();
                info!(active, "draining: {active} stream(s) still active, {left} s left");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Parses `A-B` (or a single port) into a port range.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let parse = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{p:?} is not a port number (1-65535); expected a range like 20000-20999"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    if a > b {
        return Err(format!("port range {s:?} is empty: the first port must not exceed the last"));
    }
    Ok(a..=b)
}

/// The kernel's range of ephemeral (automatically assigned) local ports.
const EPHEMERAL_RANGE_FILE: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Warns, once at start, about resources whose ports lie outside `--resource-ports` and
/// about a range that overlaps the kernel's ephemeral ports (where any outgoing
/// connection of this host may hold a resource's port when the relay wants to bind it).
fn warn_about_port_ranges(range: &RangeInclusive<u16>, resources: &[crate::state::store::Resource]) {
    let outside = ports_outside(range, resources);
    if !outside.is_empty() {
        warn!(
            count = outside.len(),
            resources = %outside.join(","),
            range = %format!("{}-{}", range.start(), range.end()),
            "{} resource(s) have ports outside --resource-ports: their ports stay as they are; widen \
             --resource-ports to include them",
            outside.len()
        );
    }
    let ephemeral = std::fs::read_to_string(EPHEMERAL_RANGE_FILE).ok().and_then(|s| parse_ephemeral_range(&s));
    if let Some(kernel) = ephemeral
        && let Some(both) = overlap(range, &kernel)
    {
        warn!(
            resource_ports = %format!("{}-{}", range.start(), range.end()),
            ephemeral = %format!("{}-{}", kernel.start(), kernel.end()),
            overlap = %format!("{}-{}", both.start(), both.end()),
            "--resource-ports overlaps the kernel's ephemeral port range ({EPHEMERAL_RANGE_FILE}): an outgoing \
             connection of this host may hold a resource's port, which then stays PORT_BLOCKED until it is free; \
             move --resource-ports below {} (the default is 20000-20999)",
            kernel.start()
        );
    }
}

/// Ids of the resources whose ports lie outside `range`.
fn ports_outside<'a>(range: &RangeInclusive<u16>, resources: &'a [crate::state::store::Resource]) -> Vec<&'a str> {
    resources.iter().filter(|r| !range.contains(&r.port)).map(|r| r.id.as_str()).collect()
}

/// Parses `/proc/sys/net/ipv4/ip_local_port_range` ("32768\t60999").
fn parse_ephemeral_range(s: &str) -> Option<RangeInclusive<u16>> {
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
    let (a, b) = (it.next()??, it.next()??);
    (a <= b).then_some(a..=b)
}

/// The ports two ranges share, if any.
fn overlap(a: &RangeInclusive<u16>, b: &RangeInclusive<u16>) -> Option<RangeInclusive<u16>> {
    let (lo, hi) = (*a.start().max(b.start()), *a.end().min(b.end()));
    (lo <= hi).then_some(lo..=hi)
}

fn derive_public_url(cfg: &RelayConfig, agent_addr: SocketAddr) -> Result<RelayUrl> {
    if let Some(u) = &cfg.public_url {
        return RelayUrl::parse(u).map_err(anyhow::Error::msg).context("--public-url");
    }
    let host = if agent_addr.ip().is_unspecified() {
        let name = hostname();
        warn!(
            host = %name,
            "no --public-url given: agents will be told to dial this machine's host name; set --public-url \
             (SLUICE_PUBLIC_URL) to the address agents can reach"
        );
        name
    } else {
        agent_addr.ip().to_string()
    };
    Ok(RelayUrl { host, port: agent_addr.port() })
}

/// This machine's host name (falls back to `localhost`: it becomes part of a URL).
pub fn hostname() -> String {
    sluice_runtime::hostname().unwrap_or_else(|| "localhost".into())
}

/// Opens the store: PostgreSQL for a `postgres://` URL, else the SQLite file (by
/// default in the data directory), refusing to create an empty SQLite database where
/// this relay's data directory says one existed (`had_ca`: the CA was there before
/// this start).
fn open_store(cfg: &RelayConfig, had_ca: bool) -> Result<Arc<dyn Store>> {
    let path = match cfg.database_url.as_deref() {
        None => cfg.data_dir.join(files::DATABASE),
        Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
            let store = PgStore::open(u)?;
            info!(database_url = %redacted_url(u), "store: PostgreSQL at {}", store.server());
            return Ok(Arc::new(store));
        }
        Some(u) => PathBuf::from(u.strip_prefix("sqlite://").unwrap_or(u)),
    };
    if had_ca && !path.exists() {
        if !cfg.recreate_database {
            return Err(crate::state::data_dir::refuse_missing_database(&cfg.data_dir, &path));
        }
        warn!(
            file = %path.display(),
            "--recreate-database: starting with a new, EMPTY database; every customer, resource and agent of the old \
             one is gone and every agent must enroll again"
        );
    }
    info!(file = %path.display(), "store: SQLite");
    Ok(Arc::new(SqliteStore::open(&path)?))
}

/// Starts a relay: loads (or creates) its identity, opens the store, binds the agent and
/// admin listeners, and returns once they accept.
pub async fn start(config: RelayConfig) -> Result<RunningRelay> {
    // The lock first: a second relay on this data directory must change nothing in it.
    crate::state::pki::ensure_private_dir(&config.data_dir)?;
    let mut lock = DataDirLock::acquire(&config.data_dir)?;
    let agent_listener = TcpListener::bind(config.agent_listen).await.with_context(|| {
        format!("binding the agent listener on {} (--agent-listen); is another relay running?", config.agent_listen)
    })?;
    let admin_listener = TcpListener::bind(config.admin_listen).await.with_context(|| {
        format!("binding the admin API on {} (--admin-listen); is another relay running?", config.admin_listen)
    })?;
    let agent_addr = agent_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    lock.record_holder(agent_addr, admin_addr);
    let public_url = derive_public_url(&config, agent_addr)?;

    let advertise_url = match &config.advertise_url {
        Some(u) => RelayUrl::parse(u).map_err(anyhow::Error::msg).context("--advertise-url")?,
        None => public_url.clone(),
    };
    let mut names = vec![
        public_url.host.clone(),
        advertise_url.host.clone(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let had_ca = config.data_dir.join(files::CA_CERT).exists();
    let identity = RelayIdentity::load_or_create(&config.data_dir, &names)?;
    let admin_tls = admin_tls_config(&config, &identity, admin_addr, &names)?;
    let store = open_store(&config, had_ca)?;
    let admin_url = format!("{}://{admin_addr}", if admin_tls.is_some() { "https" } else { "http" });

    let cluster = crate::cluster::Cluster::new(crate::state::store::RelayRecord {
        id: crate::cluster::Cluster::new_id(),
        agent_url: advertise_url.to_string(),
        resource_host: resource_host(&config, &public_url),
        admin_url: admin_url.clone(),
        version: crate::VERSION.to_owned(),
        started_at: sluice_proto::identity::unix_now(),
        heartbeat_at: 0,
        state: crate::state::store::RelayState::Active,
    });
    cluster.register(&*store)?;
    let audit = crate::audit::Audit::start(store.clone(), &cluster.id, config.audit_log.as_deref())?;
    let admin_token = parking_lot::RwLock::new(identity.admin_token.clone());
    let relay = Arc::new(Relay {
        admin_token,
        audit,
        cluster,
        signer: TokenSigner::new(&identity.jwt_key),
        identity,
        store,
        public_url,
        registry: Registry::default(),
        streams: Arc::new(crate::data::streams::Streams::default()),
        metrics: crate::metrics::install(),
        shutdown: CancellationToken::new(),
        data_path: DataPath::new(config.data_path, config.ktls_engine),
        next_stream_id: AtomicU64::new(0),
        agent_listener_up: AtomicBool::new(true),
        store_health: Arc::default(),
        leases: Default::default(),
        _lock: lock,
        config,
    });

    info!(path = relay.data_path.default_path().as_str(), "data path: {}", relay.data_path.describe());
    if let Some(w) = relay.data_path.testing_knob_warning() {
        warn!("{w}");
    }
    info!("data connections: {}", relay.describe_reuse());
    let resources = relay.store.resources()?;
    let n_resources = resources.len();
    warn_about_port_ranges(&relay.config.resource_ports, &resources);
    crate::admission::reserve_descriptors(&relay.config.limits, n_resources);
    info!(
        version = crate::VERSION,
        commit = crate::GIT_COMMIT,
        built = crate::BUILD_DATE,
        agent_listen = %agent_addr,
        admin = %admin_url,
        public_url = %relay.public_url,
        resources = n_resources,
        ca_pin = %relay.identity.ca_pin,
        relay_id = %relay.cluster.id,
        "relay ready"
    );
    tokio::spawn(crate::cluster::run(relay.clone()));
    relay.leases.load(&*relay.store)?;
    tokio::spawn(crate::data::lease_port::run(relay.clone()));
    tokio::spawn(crate::audit::run_retention(
        relay.store.clone(),
        relay.config.limits.audit_retention,
        relay.shutdown.clone(),
    ));
    tokio::spawn(relay.streams.clone().run_sampler(relay.shutdown.clone()));
    tokio::spawn(sluice_datapath::buffers::trim_periodically(relay.shutdown.clone()));
    tokio::spawn(crate::state::store_watch::run(
        relay.store.clone(),
        relay.store_health.clone(),
        relay.shutdown.clone(),
    ));
    let accepting = relay.clone();
    tokio::spawn(async move {
        crate::data::agent_port::serve(accepting.clone(), agent_listener).await;
        accepting.agent_listener_up.store(false, Ordering::Relaxed);
    });
    tokio::spawn(crate::admin::api::serve(relay.clone(), admin_listener, admin_tls));
    if relay.identity.created {
        announce_admin_token(&relay.config.data_dir.join(files::ADMIN_TOKEN), &relay.identity.admin_token);
    }
    // Last: the CLI (and whoever waits for the relay) takes this file as "ready", so it
    // appears only once everything above, the token's notice included, is done.
    crate::state::pki::write_secret(&relay.config.data_dir.join(files::ADMIN_URL), admin_url.as_bytes())?;
    Ok(RunningRelay { relay, agent_addr, admin_addr, admin_url })
}

/// The admin API's TLS configuration: none (plain HTTP), the operator's certificate
/// and key (`--admin-tls-cert`/`--admin-tls-key`), or a certificate issued from the
/// relay's CA (`--admin-tls`). TLS 1.2 and 1.3, so reverse proxies and old clients fit.
fn admin_tls_config(
    config: &RelayConfig,
    identity: &RelayIdentity,
    admin_addr: SocketAddr,
    names: &[String],
) -> Result<Option<Arc<rustls::ServerConfig>>> {
    let (chain, key) = match (&config.admin_tls_cert, &config.admin_tls_key) {
        (Some(cert), Some(key)) => {
            let read = |p: &PathBuf, what: &str| {
                std::fs::read_to_string(p)
                    .map_err(|e| crate::state::data_dir::io_failure(&format!("read {what}"), p, &e))
            };
            let chain = sluice_proto::tls::certs_from_pem(&read(cert, "--admin-tls-cert")?).map_err(|e| {
                anyhow::anyhow!("--admin-tls-cert {}: {e}; expected PEM certificates, leaf first", cert.display())
            })?;
            let key = sluice_proto::tls::key_from_pem(&read(key, "--admin-tls-key")?)
                .map_err(|e| anyhow::anyhow!("--admin-tls-key {}: {e}; expected a PEM private key", key.display()))?;
            (chain, key)
        }
        _ if config.admin_tls => {
            let mut names = names.to_vec();
            if !admin_addr.ip().is_unspecified() {
                names.push(admin_addr.ip().to_string());
            }
            names.push(hostname());
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            identity.issue_server_cert(&names)?
        }
        _ => return Ok(None),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the admin TLS certificate and key do not fit together (--admin-tls-cert, --admin-tls-key)")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    info!(admin_tls = if config.admin_tls { "relay CA" } else { "--admin-tls-cert" }, "admin API over TLS");
    Ok(Some(Arc::new(tls)))
}

/// Tells whoever started the relay where its new admin token is, once start-up
/// succeeded (listeners bound, store open). The token itself is printed only on an
/// interactive terminal: under a service manager stdout goes to a journal or a log
/// file, which must not hold it.
fn announce_admin_token(file: &std::path::Path, token: &str) {
    use std::io::IsTerminal;
    println!("{}", admin_token_notice(file, token, std::io::stdout().is_terminal()));
}

/// The start-up notice of a new admin token: where it is, and the token only when
/// `on_terminal`.
fn admin_token_notice(file: &std::path::Path, token: &str, on_terminal: bool) -> String {
    let file = file.display();
    if on_terminal {
        format!("Admin token (stored in {file}, mode 0600; the CLI on this host reads it with --data-dir):\n  {token}")
    } else {
        format!(
            "Admin token created and stored in {file} (mode 0600); not printed because stdout is not a terminal. \
             The CLI on this host reads it with --data-dir; elsewhere pass it as --admin-token (SLUICE_ADMIN_TOKEN)."
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_with_clear_errors() {
        assert_eq!(parse_port_range("40000-40999").unwrap(), 40000..=40999);
        assert_eq!(parse_port_range("5").unwrap(), 5..=5);
        assert!(parse_port_range("9-1").unwrap_err().contains("empty"));
        assert!(parse_port_range("0-5").unwrap_err().contains("not a port"));
        assert!(parse_port_range("a-b").is_err());
    }

    #[test]
    fn overlap_of_port_ranges() {
        let linux = 32768..=60999;
        assert_eq!(overlap(&(20000..=20999), &linux), None, "the default stays below the ephemeral range");
        assert_eq!(overlap(&(40000..=40999), &linux), Some(40000..=40999));
        assert_eq!(overlap(&(30000..=32768), &linux), Some(32768..=32768));
        assert_eq!(overlap(&(60999..=61010), &linux), Some(60999..=60999));
        assert_eq!(overlap(&(61000..=65535), &linux), None);
        assert_eq!(overlap(&(1..=65535), &linux), Some(linux.clone()));
    }

    #[test]
    fn resources_outside_the_range_are_named() {
        let r = |id: &str, port| crate::state::store::Resource {
            id: id.into(),
            customer_id: None,
            name: id.into(),
            port,
            generation: 1,
            created_at: 0,
            last_seen_at: None,
        };
        let resources = [r("res_old", 40000), r("res_new", 20000), r("res_edge", 20999), r("res_below", 19999)];
        assert_eq!(ports_outside(&(20000..=20999), &resources), ["res_old", "res_below"]);
        assert!(ports_outside(&(1..=65535), &resources).is_empty());
    }

    #[test]
    fn drain_timeouts() {
        assert_eq!(parse_drain_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_drain_timeout("0"), Ok(Duration::ZERO));
        assert_eq!(parse_drain_timeout("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_drain_timeout("2h").unwrap_err().contains("at most 1 hour"));
        assert!(parse_drain_timeout("soon").is_err());
    }

    #[test]
    fn the_admin_token_is_shown_only_on_a_terminal() {
        let file = std::path::Path::new("/var/lib/sluice/admin-token");
        let piped = admin_token_notice(file, "sluice_admin_secret", false);
        assert!(piped.contains("/var/lib/sluice/admin-token") && !piped.contains("sluice_admin_secret"), "{piped}");
        let tty = admin_token_notice(file, "sluice_admin_secret", true);
        assert!(tty.contains("/var/lib/sluice/admin-token") && tty.contains("sluice_admin_secret"), "{tty}");
    }

    #[test]
    fn ephemeral_range_file() {
        assert_eq!(parse_ephemeral_range("32768\t60999\n"), Some(32768..=60999));
        assert_eq!(parse_ephemeral_range("1024 65535"), Some(1024..=65535));
        assert_eq!(parse_ephemeral_range("junk"), None);
        assert_eq!(parse_ephemeral_range("9 1"), None);
    }
}

//! Simulated agents: thousands of agents' worth of control sessions and data pools in
//! one process, against one real relay, to measure what each costs the relay (issue #12,
//! `cargo xtask sim-agents`, docs/scaling.md).
//!
//! A simulated agent holds at the relay exactly what a real `sluice-agent` holds: an
//! enrolled identity (its own P-256 key, a client certificate signed by the relay), a
//! mutual-TLS 1.3 control session (hello → welcome; the relay's pings answered; its own
//! pings sent by the shared [`Heartbeat`] rule; a service report at start; stream stats
//! once a second while streams run) and the welcome's `pool_size` idle data connections,
//! each replaced the moment a stream takes it, more opened when the relay asks. What it
//! lacks is a private service: a stream is answered `Accepted` and its bytes are echoed
//! in process. Frames, messages, TLS configurations and the heartbeat rule all come from
//! `sluice-proto`; nothing here encodes the protocol by hand.
//!
//! [`Counters`] count what crossed the control sessions (frames each way, by kind), so a
//! run can state the control-message rate the relay handles, and how many sessions were
//! welcomed, refused or lost. A [`Sim`] stops every agent when dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use rcgen::{CertificateParams, KeyPair};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use sluice_proto::heartbeat::Heartbeat;
use sluice_proto::identity::{RegistrationClaims, unix_now};
use sluice_proto::relay_url::RelayUrl;
use sluice_proto::tls;
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, AgentMsg, Capabilities, CounterSource, DataHello, EnrollRequest, EnrollResponse,
    PROTOCOL_VERSION, PathKind, RelayMsg, StreamOpen, StreamReply, StreamStat,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// What simulated agents report as their version (shown by `sluice agents list`).
pub const SIM_VERSION: &str = "sim-agent";
/// How long a connect, handshake or welcome may take before the attempt counts as failed
/// (a real agent allows 10 s + 15 s; a loaded 2-core test machine needs the margin).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a session with streams running reports their counts (as the agent does).
const STATS_EVERY: Duration = Duration::from_secs(1);

// === identities ===

/// One simulated agent's enrolled identity (kept in an identity cache between runs).
#[derive(Clone, Serialize, Deserialize)]
pub struct SimIdentity {
    /// The resource NAME it enrolled for.
    pub name: String,
    pub agent_id: String,
    pub resource_id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for SimIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimIdentity").field("name", &self.name).field("agent_id", &self.agent_id).finish()
    }
}

impl SimIdentity {
    /// The mutual-TLS configuration of this identity for a control or data connection.
    fn client_config(&self, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
        let ca = tls::certs_from_pem(&self.ca_pem).map_err(|e| e.to_string())?.remove(0);
        let chain = tls::certs_from_pem(&self.cert_pem).map_err(|e| e.to_string())?;
        let key = tls::key_from_pem(&self.key_pem).map_err(|e| e.to_string())?;
        tls::agent_session_config(ca, chain, key, alpn).map(Arc::new).map_err(|e| e.to_string())
    }
}

/// Where the relay's agent port is: `host:port` and the name its certificate carries.
#[derive(Debug, Clone)]
pub struct Target {
    pub authority: String,
    pub server_name: ServerName<'static>,
}

impl Target {
    /// The relay a registration JWT points at (its `relay_url` claim).
    pub fn of_jwt(jwt: &str) -> Result<Target, String> {
        let claims = RegistrationClaims::decode_unverified(jwt, unix_now()).map_err(|e| e.to_string())?;
        let url = RelayUrl::parse(&claims.relay_url)?;
        let server_name = tls::server_name_of(&url.host).map_err(|e| e.to_string())?;
        Ok(Target { authority: url.authority(), server_name })
    }

    /// TCP connect + TLS handshake with `cfg`, each bounded by [`STEP_TIMEOUT`].
    async fn dial(&self, cfg: Arc<ClientConfig>) -> Result<TlsStream<TcpStream>, String> {
        let tcp = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(&self.authority))
            .await
            .map_err(|_| format!("connecting to {} timed out", self.authority))?
            .map_err(|e| format!("connecting to {}: {e}", self.authority))?;
        let _ = tcp.set_nodelay(true);
        tokio::time::timeout(STEP_TIMEOUT, TlsConnector::from(cfg).connect(self.server_name.clone(), tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))
    }
}

/// Enrolls one agent for resource `name` with `jwt`, the way `sluice-agent` does: a key
/// made here, a CSR, TLS that trusts only the CA pinned in the JWT.
pub async fn enroll(jwt: &str, name: &str) -> Result<SimIdentity, String> {
    let claims = RegistrationClaims::decode_unverified(jwt, unix_now()).map_err(|e| e.to_string())?;
    let target = Target::of_jwt(jwt)?;
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let csr_pem = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("making the CSR: {e}"))?;
    let cfg = tls::agent_enroll_config(&claims.ca_pin).map_err(|e| e.to_string())?;
    let mut conn = target.dial(Arc::new(cfg)).await?;
    let req = EnrollRequest {
        version: PROTOCOL_VERSION,
        jwt: jwt.to_owned(),
        name: name.to_owned(),
        csr_pem,
        agent_version: SIM_VERSION.into(),
        hostname: format!("sim-host-{name}"),
    };
    let answer = tokio::time::timeout(STEP_TIMEOUT, async {
        wire::write_frame(&mut conn, &req).await?;
        wire::read_frame::<_, EnrollResponse>(&mut conn).await
    })
    .await
    .map_err(|_| "the relay did not answer the enrollment in time".to_string())?
    .map_err(|e| format!("enrollment exchange: {e}"))?;
    match answer {
        EnrollResponse::Enrolled(e) => Ok(SimIdentity {
            name: name.to_owned(),
            agent_id: e.agent_id.to_string(),
            resource_id: e.resource_id.to_string(),
            key_pem: key.serialize_pem(),
            cert_pem: e.cert_pem,
            ca_pem: e.ca_pem,
        }),
        EnrollResponse::Rejected(r) => Err(format!("enrollment of {name:?} refused ({:?}): {}", r.code, r.message)),
    }
}

/// Enrolls one agent per name, `parallel` at a time; a failed attempt (the relay busy, a
/// handshake refused at its cap) is retried up to 5 times. Results are in `names` order.
pub async fn enroll_all(jwt: &str, names: &[String], parallel: usize) -> Result<Vec<SimIdentity>, String> {
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(names.len());
    for name in names {
        let (gate, jwt, name) = (gate.clone(), jwt.to_owned(), name.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await.expect("gate open");
            let mut last = String::new();
            for attempt in 0..5u32 {
                match enroll(&jwt, &name).await {
                    Ok(id) => return Ok(id),
                    Err(e) => last = e,
                }
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
            Err(last)
        }));
    }
    let mut out = Vec::with_capacity(names.len());
    for t in tasks {
        out.push(t.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

// === counters ===

macro_rules! counters {
    ($($(#[$doc:meta])* $field:ident,)*) => {
        /// What every simulated agent of a [`Sim`] did, summed; read with [`Counters::snapshot`].
        #[derive(Debug, Default)]
        pub struct Counters { $($(#[$doc])* pub $field: AtomicU64,)* }

        /// The [`Counters`] at one instant.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
        pub struct Snapshot { $($(#[$doc])* pub $field: u64,)* }

        impl Counters {
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($field: self.$field.load(Ordering::Relaxed),)* }
            }
        }

        impl std::ops::Sub for Snapshot {
            type Output = Snapshot;
            /// What changed from `earlier` to `self` (gauges too: their difference).
            fn sub(self, earlier: Snapshot) -> Snapshot {
                Snapshot { $($field: self.$field.wrapping_sub(earlier.$field),)* }
            }
        }
    };
}

counters! {
    /// Sessions that got their welcome.
    welcomed,
    /// Sessions that got no welcome (refused, or the connection failed first).
    refused,
    /// Sessions that ended after their welcome (the relay closed them, declared them dead, …).
    lost,
    /// Data connections open now (idle or carrying a stream): a gauge.
    data_conns,
    /// Data connections idle now, waiting for a stream: a gauge.
    idle,
    /// Data connections that could not be opened (retried after a second).
    data_failed,
    /// Streams running now: a gauge.
    streams_active,
    /// Streams ended.
    streams_done,
    /// Control frames read from the relay.
    from_relay,
    /// Control frames written to the relay.
    to_relay,
    /// Of `from_relay`: the relay's pings.
    pings_from_relay,
    /// Of `from_relay`: pongs to our pings.
    pongs_from_relay,
    /// Of `from_relay`: requests for more data connections.
    open_data_from_relay,
    /// Of `to_relay`: our pings.
    pings_to_relay,
    /// Of `to_relay`: pongs to the relay's pings.
    pongs_to_relay,
    /// Of `to_relay`: stream stats messages.
    stats_to_relay,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Ordering::Relaxed);
    }

    fn sent(&self, msg: &AgentMsg) {
        Self::add(&self.to_relay, 1);
        match msg {
            AgentMsg::Ping { .. } => Self::add(&self.pings_to_relay, 1),
            AgentMsg::Pong { .. } => Self::add(&self.pongs_to_relay, 1),
            AgentMsg::StreamStats { .. } => Self::add(&self.stats_to_relay, 1),
            _ => {}
        }
    }

    fn received(&self, msg: &RelayMsg) {
        Self::add(&self.from_relay, 1);
        match msg {
            RelayMsg::Ping { .. } => Self::add(&self.pings_from_relay, 1),
            RelayMsg::Pong { .. } => Self::add(&self.pongs_from_relay, 1),
            RelayMsg::OpenData { .. } => Self::add(&self.open_data_from_relay, 1),
            _ => {}
        }
    }
}

// === one simulated agent ===

/// What one session's data connections and stream stats share.
struct Session {
    target: Arc<Target>,
    data_cfg: Arc<ClientConfig>,
    session_id: sluice_proto::identity::SessionId,
    /// Idle data connections to keep (the welcome's `pool_size`).
    pool_target: u64,
    idle: AtomicU64,
    connecting: AtomicU64,
    /// Cancelled when the session ends (or the simulation stops): idle connections close.
    closed: CancellationToken,
    /// Running streams: id → (bytes in, bytes out), for the stats.
    streams: Mutex<HashMap<u64, (u64, u64)>>,
    control: mpsc::UnboundedSender<AgentMsg>,
    counters: Arc<Counters>,
}

impl Session {
    fn stat(stream_id: u64, (bytes_in, bytes_out): (u64, u64), closed: bool) -> StreamStat {
        StreamStat {
            stream_id,
            bytes_in,
            bytes_out,
            path: PathKind::Userspace,
            counter: CounterSource::Userspace,
            closed,
            tunnel_bytes: None,
        }
    }

    fn stats(&self) -> Vec<StreamStat> {
        self.streams.lock().iter().map(|(id, b)| Self::stat(*id, *b, false)).collect()
    }
}

/// Opens data connections until idle + connecting reaches the pool target (the agent's rule).
fn refill(s: &Arc<Session>) {
    while !s.closed.is_cancelled()
        && s.idle.load(Ordering::Relaxed) + s.connecting.load(Ordering::Relaxed) < s.pool_target
    {
        spawn_data_conn(s, None);
    }
}

/// Opens one data connection in the background; it waits idle for a stream, echoes it,
/// and is replaced as soon as a stream takes it. `parked` hears when it is idle (or failed).
fn spawn_data_conn(s: &Arc<Session>, parked: Option<tokio::sync::oneshot::Sender<Result<(), String>>>) {
    s.connecting.fetch_add(1, Ordering::Relaxed);
    let s = s.clone();
    tokio::spawn(async move {
        let conn = tokio::select! {
            c = data_conn(&s) => c,
            _ = s.closed.cancelled() => Err("session over".into()),
        };
        s.connecting.fetch_sub(1, Ordering::Relaxed);
        let mut tls = match conn {
            Ok(t) => t,
            Err(e) => {
                Counters::add(&s.counters.data_failed, 1);
                if let Some(p) = parked {
                    let _ = p.send(Err(e));
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => refill(&s),
                    _ = s.closed.cancelled() => {}
                }
                return;
            }
        };
        Counters::add(&s.counters.data_conns, 1);
        s.idle.fetch_add(1, Ordering::Relaxed);
        Counters::add(&s.counters.idle, 1);
        if let Some(p) = parked {
            let _ = p.send(Ok(()));
        }
        let open = tokio::select! {
            o = wire::read_frame::<_, StreamOpen>(&mut tls) => Some(o),
            _ = s.closed.cancelled() => None,
        };
        s.idle.fetch_sub(1, Ordering::Relaxed);
        Counters::sub(&s.counters.idle, 1);
        match open {
            Some(Ok(open)) => {
                refill(&s);
                serve_stream(&s, tls, open).await;
            }
            Some(Err(_)) => {
                // The relay closed an idle connection (surplus, or the session is gone).
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => refill(&s),
                    _ = s.closed.cancelled() => {}
                }
            }
            None => {}
        }
        Counters::sub(&s.counters.data_conns, 1);
    });
}

async fn data_conn(s: &Session) -> Result<TlsStream<TcpStream>, String> {
    let mut tls = s.target.dial(s.data_cfg.clone()).await?;
    let hello = DataHello { version: PROTOCOL_VERSION, session_id: s.session_id.clone() };
    wire::write_frame(&mut tls, &hello).await.map_err(|e| format!("sending the data hello: {e}"))?;
    Ok(tls)
}

/// The stand-in for the private service: accepts the stream and echoes its bytes until
/// the relay's side ends, then ends cleanly (close_notify + FIN) and reports the counts.
async fn serve_stream(s: &Arc<Session>, mut tls: TlsStream<TcpStream>, open: StreamOpen) {
    if wire::write_frame(&mut tls, &StreamReply::Accepted).await.is_err() {
        return;
    }
    Counters::add(&s.counters.streams_active, 1);
    s.streams.lock().insert(open.stream_id, (0, 0));
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match tls.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if tls.write_all(&buf[..n]).await.is_err() || tls.flush().await.is_err() {
            break;
        }
        if let Some(b) = s.streams.lock().get_mut(&open.stream_id) {
            *b = (b.0 + n as u64, b.1 + n as u64);
        }
    }
    let _ = tls.shutdown().await;
    let last = s.streams.lock().remove(&open.stream_id).unwrap_or_default();
    let _ = s.control.send(AgentMsg::StreamStats { streams: vec![Session::stat(open.stream_id, last, true)] });
    Counters::sub(&s.counters.streams_active, 1);
    Counters::add(&s.counters.streams_done, 1);
}

/// Runs one simulated agent: control session, then its pool. `ready` hears once the
/// welcome came and every pooled connection is parked (or why not); the session then
/// runs until the relay ends it or `stop` fires. Returns why it ended.
async fn run_agent(
    id: Arc<SimIdentity>,
    target: Arc<Target>,
    counters: Arc<Counters>,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
) -> String {
    let started = match start_session(&id, target, counters.clone(), &stop).await {
        Ok(s) => s,
        Err(e) => {
            Counters::add(&counters.refused, 1);
            let _ = ready.send(Err(e.clone()));
            return e;
        }
    };
    Counters::add(&counters.welcomed, 1);
    let (session, ctl, out_rx, heartbeat) = started;
    let mut parked = Vec::new();
    for _ in 0..session.pool_target {
        let (tx, rx) = tokio::sync::oneshot::channel();
        spawn_data_conn(&session, Some(tx));
        parked.push(rx);
    }
    let pool_ready = async {
        for p in parked {
            p.await.map_err(|_| "data connection task gone".to_string())??;
        }
        Ok::<(), String>(())
    };
    let mut ready = Some(ready);
    let session_run = drive(&session, ctl, out_rx, heartbeat, &stop);
    tokio::pin!(session_run, pool_ready);
    let why = loop {
        tokio::select! {
            r = &mut pool_ready, if ready.is_some() => {
                let _ = ready.take().expect("checked").send(r);
            }
            why = &mut session_run => break why,
        }
    };
    if let Some(r) = ready {
        let _ = r.send(Err(format!("the session ended before its pool was full: {why}")));
    }
    session.closed.cancel();
    if !stop.is_cancelled() {
        Counters::add(&counters.lost, 1);
    }
    why
}

type Opened = (Arc<Session>, TlsStream<TcpStream>, mpsc::UnboundedReceiver<AgentMsg>, Duration);

/// Dials the control session, sends the hello and reads the welcome.
async fn start_session(
    id: &SimIdentity,
    target: Arc<Target>,
    counters: Arc<Counters>,
    stop: &CancellationToken,
) -> Result<Opened, String> {
    let (control_cfg, data_cfg) = (id.client_config(ALPN_CONTROL)?, id.client_config(ALPN_DATA)?);
    let mut ctl = target.dial(control_cfg).await?;
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: SIM_VERSION.into(),
        hostname: format!("sim-host-{}", id.name),
        capabilities: Capabilities { service_status: true, ..Default::default() },
    };
    wire::write_frame(&mut ctl, &hello).await.map_err(|e| format!("sending the hello: {e}"))?;
    counters.sent(&hello);
    let welcome = tokio::time::timeout(STEP_TIMEOUT, wire::read_frame::<_, RelayMsg>(&mut ctl))
        .await
        .map_err(|_| "no welcome in time".to_string())?
        .map_err(|e| format!("waiting for the welcome: {e}"))?;
    counters.received(&welcome);
    let (session_id, heartbeat_secs, pool_size) = match welcome {
        RelayMsg::Welcome { session_id, heartbeat_secs, pool_size, .. } => (session_id, heartbeat_secs, pool_size),
        RelayMsg::Rejected(r) => return Err(format!("session refused ({:?}): {}", r.code, r.message)),
        other => return Err(format!("unexpected first message: {other:?}")),
    };
    let (control, out_rx) = mpsc::unbounded_channel();
    let session = Arc::new(Session {
        target,
        data_cfg,
        session_id,
        pool_target: u64::from(pool_size.max(1)),
        idle: AtomicU64::new(0),
        connecting: AtomicU64::new(0),
        closed: stop.child_token(),
        streams: Mutex::new(HashMap::new()),
        control,
        counters,
    });
    // As the agent does at session start: the private service is reachable.
    let _ = session.control.send(AgentMsg::ServiceStatus { reachable: true, error: None });
    Ok((session, ctl, out_rx, Duration::from_secs(heartbeat_secs.max(1))))
}

/// The live control session: reads the relay's frames (answers pings, opens data
/// connections on request), writes ours, pings by the heartbeat rule, reports stream
/// stats once a second while streams run. Returns why it ended.
async fn drive(
    s: &Arc<Session>,
    ctl: TlsStream<TcpStream>,
    mut out_rx: mpsc::UnboundedReceiver<AgentMsg>,
    interval: Duration,
    stop: &CancellationToken,
) -> String {
    let (mut rd, mut wr) = tokio::io::split(ctl);
    let heartbeat = parking_lot::Mutex::new(Heartbeat::new(interval, Instant::now()));
    let reader = async {
        loop {
            let msg = match wire::read_frame::<_, RelayMsg>(&mut rd).await {
                Ok(m) => m,
                Err(e) => return format!("control connection ended: {e}"),
            };
            heartbeat.lock().heard(Instant::now());
            s.counters.received(&msg);
            match msg {
                RelayMsg::Ping { seq } => {
                    let _ = s.control.send(AgentMsg::Pong { seq });
                }
                RelayMsg::OpenData { count } => {
                    for _ in 0..count {
                        spawn_data_conn(s, None);
                    }
                }
                RelayMsg::Rejected(r) => return format!("the relay ended the session: {}", r.message),
                _ => {}
            }
        }
    };
    let writer = async {
        while let Some(msg) = out_rx.recv().await {
            if let Err(e) = wire::write_frame(&mut wr, &msg).await {
                return format!("writing to the relay: {e}");
            }
            s.counters.sent(&msg);
        }
        "session closed".to_string()
    };
    let mut seq = 0u64;
    let beats = Heartbeat::run(&heartbeat, || {
        seq += 1;
        s.control.send(AgentMsg::Ping { seq }).is_ok()
    });
    let stats = async {
        let mut tick = tokio::time::interval(STATS_EVERY);
        loop {
            tick.tick().await;
            let streams = s.stats();
            if !streams.is_empty() {
                let _ = s.control.send(AgentMsg::StreamStats { streams });
            }
        }
    };
    tokio::select! {
        w = reader => w,
        w = writer => w,
        silent = beats => match silent {
            Some(d) => format!("no word from the relay for {d:?}"),
            None => "session closed".into(),
        },
        _ = stats => "the stats loop ended".into(),
        _ = stop.cancelled() => "simulation stopped".into(),
    }
}

// === many agents ===

/// Simulated agents against one relay; every agent stops when this is dropped.
pub struct Sim {
    pub counters: Arc<Counters>,
    target: Arc<Target>,
    stop: CancellationToken,
    /// Why each ended session ended (first few only).
    ended: Arc<Mutex<Vec<String>>>,
}

/// How a batch of agents came up.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Started {
    /// Agents whose welcome came and whose pool is full.
    pub ready: usize,
    /// Agents that did not get there, and the first few reasons.
    pub failed: usize,
    pub reasons: Vec<String>,
    pub secs: f64,
}

impl Sim {
    pub fn new(target: Target) -> Sim {
        Sim {
            counters: Arc::default(),
            target: Arc::new(target),
            stop: CancellationToken::new(),
            ended: Arc::default(),
        }
    }

    /// Starts one agent per identity, at most `parallel` connecting at once (each holds
    /// a slot until its pool is full, so at most `parallel × (1 + pool)` handshakes run at
    /// once); returns when every one is ready or has failed.
    pub async fn start(&self, ids: &[SimIdentity], parallel: usize) -> Started {
        let t = std::time::Instant::now();
        let gate = Arc::new(Semaphore::new(parallel.max(1)));
        let mut waits = Vec::with_capacity(ids.len());
        for id in ids {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (id, target, counters, stop, gate, ended) = (
                Arc::new(id.clone()),
                self.target.clone(),
                self.counters.clone(),
                self.stop.clone(),
                gate.clone(),
                self.ended.clone(),
            );
            let (slot_tx, slot_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
            tokio::spawn(async move {
                let slot = gate.acquire_owned().await.expect("gate open");
                let agent = tokio::spawn(run_agent(id, target, counters, stop, slot_tx));
                let r = slot_rx.await.unwrap_or_else(|_| Err("agent task gone".into()));
                drop(slot);
                let _ = tx.send(r);
                if let Ok(why) = agent.await {
                    let mut e = ended.lock();
                    if e.len() < 20 {
                        e.push(why);
                    }
                }
            });
            waits.push(rx);
        }
        let mut out = Started::default();
        for w in waits {
            match w.await.unwrap_or_else(|_| Err("agent task gone".into())) {
                Ok(()) => out.ready += 1,
                Err(e) => {
                    out.failed += 1;
                    if out.reasons.len() < 5 {
                        out.reasons.push(e);
                    }
                }
            }
        }
        out.secs = t.elapsed().as_secs_f64();
        out
    }

    /// Why sessions ended so far (the first 20).
    pub fn ended(&self) -> Vec<String> {
        self.ended.lock().clone()
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Streams held open by [`hold_streams`], and why the others failed.
#[derive(Debug, Default)]
pub struct Held {
    pub streams: Vec<TcpStream>,
    pub failed: Vec<String>,
}

/// Holds `n` streams open through the relay, spread round-robin over `endpoints`: each
/// connects, sends one byte and reads its echo (so the stream is through the relay and
/// the simulated agent), then stays open until the returned sockets are dropped. At most
/// `parallel` are opened at once; the ones that fail are counted, with why.
pub async fn hold_streams(endpoints: &[String], n: usize, parallel: usize) -> Held {
    let gate = Arc::new(Semaphore::new(parallel.max(1)));
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (gate, ep) = (gate.clone(), endpoints[i % endpoints.len()].clone());
        tasks.push(tokio::spawn(async move {
            let _slot = gate.acquire_owned().await.expect("gate open");
            let echo = async {
                let mut c = TcpStream::connect(&ep).await?;
                c.write_all(&[i as u8]).await?;
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await?;
                if b[0] != i as u8 {
                    return Err(std::io::Error::other("wrong byte echoed"));
                }
                Ok(c)
            };
            tokio::time::timeout(STEP_TIMEOUT, echo)
                .await
                .map_err(|_| format!("stream {i} via {ep}: no echo in {STEP_TIMEOUT:?}"))?
                .map_err(|e| format!("stream {i} via {ep}: {e}"))
        }));
    }
    let mut out = Held::default();
    for t in tasks {
        match t.await.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok(c) => out.streams.push(c),
            Err(e) => out.failed.push(e),
        }
    }
    out
}

// === the relay's side ===

/// `sluice serve` flags that let one relay take `agents` simulated agents over
/// `resources` resources of one customer: the quotas a real platform spreads over many
/// customers and hours (resources per customer, enrollments per JWT per hour, agents per
/// resource) and the handshake cap (agents connect `parallel` at a time, each with its
/// pool), plus the pool size and heartbeat under test.
pub fn relay_flags(agents: usize, resources: usize, parallel: usize, pool: u32, heartbeat_secs: u64) -> Vec<String> {
    let per_resource = agents.div_ceil(resources.max(1)).max(16);
    let handshakes = (parallel * (1 + pool as usize) * 2).max(256);
    [
        ("--max-resources-per-customer", resources.max(100).to_string()),
        ("--max-enrollments-per-jwt-per-hour", (agents * 2).max(30).to_string()),
        ("--max-agents-per-resource", per_resource.to_string()),
        ("--agent-max-handshakes", handshakes.min(65536).to_string()),
        ("--pool-size", pool.to_string()),
        ("--heartbeat-secs", heartbeat_secs.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// The resource NAME of simulated agent `i` when `per_resource` agents share one.
pub fn resource_name(i: usize, per_resource: usize) -> String {
    format!("sim-{:05}", i / per_resource.max(1))
}

// === process figures ===

/// utime + stime of process `pid`, in seconds (clock ticks of 1/100 s; 0 when it is gone).
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(after) = s.rfind(')').map(|i| &s[i + 2..]) else { return 0.0 };
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / 100.0
}

/// Packets the kernel dropped because a CPU's input backlog was full (the second column
/// of `/proc/net/softnet_stat`, summed over CPUs). Loopback traffic goes through that
/// backlog (`net.core.netdev_max_backlog`), so bursts of thousands of packets at one
/// instant on loopback can lose some.
pub fn backlog_drops() -> u64 {
    let s = std::fs::read_to_string("/proc/net/softnet_stat").unwrap_or_default();
    s.lines().filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok()).sum()
}

/// TCP connections the kernel aborted after unanswered retransmissions or keepalive
/// probes (`TcpExt: TCPAbortOnTimeout` of `/proc/net/netstat`), machine-wide.
pub fn tcp_aborts_on_timeout() -> u64 {
    let s = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = s.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let [names, values, ..] = lines[..] else { return 0 };
    let at = names.split_whitespace().position(|n| n == "TCPAbortOnTimeout");
    at.and_then(|i| values.split_whitespace().nth(i)?.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_raise_every_quota_a_large_run_meets() {
        let f = relay_flags(2000, 2000, 32, 4, 10);
        let get = |k: &str| f[f.iter().position(|a| a == k).unwrap() + 1].clone();
        assert_eq!(get("--max-resources-per-customer"), "2000");
        assert_eq!(get("--max-enrollments-per-jwt-per-hour"), "4000");
        assert_eq!(get("--max-agents-per-resource"), "16", "one agent per resource: the default suffices");
        assert_eq!(get("--agent-max-handshakes"), "320");
        let small = relay_flags(20, 10, 4, 4, 1);
        let get = |k: &str| small[small.iter().position(|a| a == k).unwrap() + 1].clone();
        assert_eq!(get("--max-resources-per-customer"), "100", "never below the default");
        assert_eq!(get("--agent-max-handshakes"), "256");
    }

    #[test]
    fn names_group_agents_per_resource() {
        assert_eq!(resource_name(0, 1), "sim-00000");
        assert_eq!(resource_name(7, 1), "sim-00007");
        assert_eq!(resource_name(7, 4), "sim-00001");
    }

    #[test]
    fn snapshots_subtract_field_by_field() {
        let c = Counters::default();
        let a = c.snapshot();
        Counters::add(&c.pings_from_relay, 3);
        c.sent(&AgentMsg::Pong { seq: 1 });
        let d = c.snapshot() - a;
        assert_eq!((d.pings_from_relay, d.to_relay, d.pongs_to_relay, d.from_relay), (3, 1, 1, 0));
    }
}

//! One control session with the relay and its pool of data connections, in the shape of
//! the protocol:
//!
//! - [`control`]: hello → welcome, certificate renewal, and how a welcome can fail;
//! - [`pool`]: dialing the relay and keeping warm data connections parked there,
//!   replacing each one a stream takes; [`demand`]: how many to keep;
//! - [`stream`]: one stream on a data connection — the private service's connect, the
//!   reply, the bytes, the final counts.
//!
//! [`run`] ties them together: it reads the relay's frames, writes the agent's (pings by
//! the shared [`Heartbeat`] rule, stream stats, service reports), and ends with a
//! [`SessionEnd`] that tells the agent's main loop what to do next.

pub mod control;
pub mod demand;
pub mod pool;
pub mod stream;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::ClientConfig;
use sluice_datapath::DataPath;
use sluice_proto::heartbeat::Heartbeat;
use sluice_proto::relay_url::RelayUrl;
use sluice_proto::tls;
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, AgentMsg, Capabilities, CounterSource, RejectCode, RelayMsg, RelayPeer,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::AgentConfig;
use crate::enroll::Identity;
use crate::meter::Meter;
use crate::service::ServiceHealth;
use pool::{Pool, RelayTarget};

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The connection failed or the relay went quiet; reconnect.
    Lost(String),
    /// The relay says this agent's certificate is no longer valid; enroll again.
    Revoked(String),
    /// The certificate is due for renewal and the relay cannot renew it over the
    /// session (an older relay): enroll again.
    Renew,
    /// The session came up, then ended; `.0` is why. Resets the reconnect backoff.
    Ended(String),
}

/// The TLS client configuration of the agent's identity for one ALPN.
pub(crate) fn client_config(id: &Identity, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
    tls::agent_session_config(id.ca(), id.chain(), id.key(), alpn)
        .map(Arc::new)
        .map_err(|e| format!("building the TLS configuration from the saved identity: {e}"))
}

/// What a relay said about its cluster: the relay a session reached (`relay_id`) and
/// the active relays (from the welcome, then on every change).
#[derive(Debug, Clone)]
pub struct PeerReport {
    /// The URL the session dialed.
    pub dialed: RelayUrl,
    pub relay_id: String,
    pub relays: Vec<RelayPeer>,
}

/// What lives as long as the agent and every session shares.
#[derive(Clone)]
pub struct Parts {
    pub cfg: Arc<AgentConfig>,
    pub meter: Arc<Meter>,
    pub data_path: Arc<DataPath>,
    pub service: Arc<ServiceHealth>,
    pub drain: crate::drain::Drain,
}

/// Runs one control session with the relay at `relay_url` until it ends. Its streams run
/// on until they finish, the certificate is revoked, or the agent's drain cuts them.
/// What the relay says about its cluster goes to `peers`.
pub async fn run(
    parts: &Parts,
    relay_url: &RelayUrl,
    id: Identity,
    shutdown: &CancellationToken,
    peers: &mpsc::UnboundedSender<PeerReport>,
) -> SessionEnd {
    let Parts { cfg, meter, data_path, service, drain } = parts;
    let capabilities = Capabilities {
        ktls: data_path.kernel_tls(),
        ebpf: meter.source() == CounterSource::Ebpf,
        renew: true,
        service_status: true,
        relays: true,
        key_updates: data_path.follows_key_updates(),
        reuse: !data_path.kernel_tls(),
    };
    let (tls, welcome, relay, data_cfg) = match connect(relay_url, &id, capabilities, cfg.proxy()).await {
        Ok(c) => c,
        Err(end) => return end,
    };
    info!(session = %welcome.session_id, resource = %id.meta.resource_name, relay = %relay_url,
          relay_id = %welcome.relay_id, "connected to the relay");
    let report = |relays: Vec<RelayPeer>| {
        let _ = peers.send(PeerReport { dialed: relay_url.clone(), relay_id: welcome.relay_id.clone(), relays });
    };
    report(welcome.relays.clone());
    let (out_tx, out_rx) = mpsc::unbounded_channel::<AgentMsg>();
    let pool = Arc::new(Pool {
        relay,
        connector: Mutex::new(TlsConnector::from(data_cfg)),
        service: service.clone(),
        data_path: data_path.clone(),
        relay_follows_key_updates: welcome.relay.key_updates,
        session_id: welcome.session_id.clone(),
        target: Mutex::new(demand::PoolTarget::new(welcome.pool_size, std::time::Instant::now())),
        idle: AtomicU32::new(0),
        connecting: AtomicU32::new(0),
        closed: CancellationToken::new(),
        stop_streams: drain.cut.child_token(),
        drain: drain.clone(),
        control: out_tx.clone(),
        active: Mutex::new(HashMap::new()),
        meter: meter.clone(),
    });
    crate::metrics::session(true);
    pool::refill(&pool);
    let end = drive(cfg, &pool, id, &welcome, tls, (out_tx, out_rx), shutdown, &report).await;
    pool.closed.cancel();
    crate::metrics::session(false);
    if matches!(end, SessionEnd::Revoked(_)) {
        pool.stop_streams.cancel();
    }
    end
}

/// Dials the relay's control port (through `proxy`, if any) with the identity and
/// exchanges hello and welcome.
/// Also returns the relay's address and the TLS configuration data connections use.
async fn connect(
    relay_url: &RelayUrl,
    id: &Identity,
    capabilities: Capabilities,
    proxy: Option<&crate::egress::Proxy>,
) -> Result<(pool::Tunnel, control::Welcome, RelayTarget, Arc<ClientConfig>), SessionEnd> {
    let relay = match tls::server_name_of(&relay_url.host) {
        Ok(server_name) => RelayTarget { authority: relay_url.authority(), server_name, proxy: proxy.cloned() },
        Err(e) => return Err(SessionEnd::Lost(e.to_string())),
    };
    let (control_cfg, data_cfg) = match (client_config(id, ALPN_CONTROL), client_config(id, ALPN_DATA)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return Err(SessionEnd::Revoked(e)),
    };
    let (mut tls, _) =
        pool::dial(&relay, &TlsConnector::from(control_cfg), None, None).await.map_err(SessionEnd::Lost)?;
    let welcome = control::hello(&mut tls, crate::hostname(), capabilities).await?;
    Ok((tls, welcome, relay, data_cfg))
}

/// Runs a live session until it ends: the reader handles the relay's frames, the shared
/// [`Heartbeat`] rule pings and declares a silent relay dead, the writer sends what is
/// queued plus stream stats and service reports, and the certificate is renewed on time.
#[allow(clippy::too_many_arguments)]
async fn drive(
    cfg: &AgentConfig,
    pool: &Arc<Pool>,
    id: Identity,
    welcome: &control::Welcome,
    tls: pool::Tunnel,
    (out_tx, mut out_rx): (mpsc::UnboundedSender<AgentMsg>, mpsc::UnboundedReceiver<AgentMsg>),
    shutdown: &CancellationToken,
    report: &(dyn Fn(Vec<RelayPeer>) + Sync),
) -> SessionEnd {
    let heartbeat = Mutex::new(Heartbeat::new(welcome.heartbeat, Instant::now()));
    let (mut rd, mut wr) = tokio::io::split(tls);
    let (renewed_tx, renewed_rx) = mpsc::unbounded_channel::<RelayMsg>();
    let reader = async {
        loop {
            let msg = match wire::read_frame::<_, RelayMsg>(&mut rd).await {
                Ok(m) => m,
                Err(e) => return SessionEnd::Ended(format!("control connection ended: {e}")),
            };
            heartbeat.lock().heard(Instant::now());
            if let RelayMsg::Relays { relays } = msg {
                report(relays);
                continue;
            }
            if let Some(end) = on_relay_msg(pool, &out_tx, &renewed_tx, msg) {
                return end;
            }
        }
    };
    let renewal = control::renew_certificate(
        cfg.state_dir.clone(),
        pool.clone(),
        id,
        welcome.relay.renew,
        out_tx.clone(),
        renewed_rx,
    );
    let mut seq = 0;
    let beats = Heartbeat::run(&heartbeat, || {
        seq += 1;
        out_tx.send(AgentMsg::Ping { seq }).is_ok()
    });
    // Report the service's state now and on every change (to relays that take it).
    let mut service_rx = pool.service.subscribe();
    let reports_service = welcome.relay.service_status;
    if reports_service {
        service_rx.mark_changed();
    }
    let writer = async {
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return SessionEnd::Ended("session closed".into()) },
                changed = service_rx.changed(), if reports_service => {
                    if changed.is_err() { continue }
                    let s = service_rx.borrow_and_update().clone();
                    let Some(reachable) = s.reachable else { continue };
                    AgentMsg::ServiceStatus { reachable, error: s.error }
                }
                _ = stats_tick.tick() => {
                    crate::metrics::pool(pool.meter.entries(), pool.idle(), pool.target());
                    let streams = pool.stats();
                    if streams.is_empty() { continue }
                    AgentMsg::StreamStats { streams }
                }
            };
            if let Err(e) = wire::write_frame(&mut wr, &msg).await {
                return SessionEnd::Ended(format!("writing to the relay failed: {e}"));
            }
        }
    };
    tokio::select! {
        e = reader => e,
        e = writer => e,
        silent = beats => match silent {
            Some(d) => SessionEnd::Lost(format!("no word from the relay for {d:?}")),
            None => SessionEnd::Ended("session closed".into()),
        },
        _ = shutdown.cancelled() => SessionEnd::Shutdown,
        e = renewal => e,
    }
}

/// Handles one frame from the relay; `Some(end)` ends the session.
fn on_relay_msg(
    pool: &Arc<Pool>,
    out: &mpsc::UnboundedSender<AgentMsg>,
    renewals: &mpsc::UnboundedSender<RelayMsg>,
    msg: RelayMsg,
) -> Option<SessionEnd> {
    match msg {
        RelayMsg::Ping { seq } => {
            let _ = out.send(AgentMsg::Pong { seq });
        }
        RelayMsg::OpenData { count } => {
            // The relay's pool ran dry: a stream is waiting for a handshake. Keep more warm.
            pool.target.lock().ran_dry(count, std::time::Instant::now());
            pool::refill(pool);
        }
        RelayMsg::Rejected(r) if r.code == RejectCode::RevokedCertificate => {
            return Some(SessionEnd::Revoked(r.message));
        }
        RelayMsg::Rejected(r) => {
            return Some(SessionEnd::Ended(format!("the relay closed the session: {}", r.message)));
        }
        m @ (RelayMsg::CertificateRenewed { .. } | RelayMsg::RenewalRefused(_)) => {
            let _ = renewals.send(m);
        }
        RelayMsg::Pong { .. } | RelayMsg::Welcome { .. } | RelayMsg::Relays { .. } | RelayMsg::Unknown => {}
    }
    None
}

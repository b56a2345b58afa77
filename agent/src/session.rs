//! One control session with the relay and its pool of data connections.
//!
//! The session keeps `pool_size` idle, handshaken data connections open at the relay.
//! When the relay starts a stream on one, the agent connects to the private service,
//! answers accept/refuse, and moves the stream's bytes; a replacement connection is
//! opened at once so the pool stays warm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use std::collections::HashMap;

use parking_lot::Mutex;
use sluice_proto::datapath::{self, PathKind, StreamEnd, Transfer};
use sluice_proto::tls;
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, AgentMsg, Capabilities, CounterSource, DataHello, PROTOCOL_VERSION, RejectCode,
    RelayMsg, StreamOpen, StreamReply, StreamStat,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AgentConfig;
use crate::enroll::Identity;

/// How a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent is shutting down.
    Shutdown,
    /// The connection failed or the relay went quiet; reconnect.
    Lost(String),
    /// The relay says this agent's certificate is no longer valid; enroll again.
    Revoked(String),
    /// The certificate is due for renewal; enroll again.
    Renew,
    /// The session came up, then ended; `.0` is why. Resets the reconnect backoff.
    Ended(String),
}

/// What data connections share.
struct Pool {
    cfg: Arc<AgentConfig>,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    session_id: String,
    target: u32,
    idle: AtomicU32,
    connecting: AtomicU32,
    /// Cancelled when the session ends: idle connections close; streams continue.
    closed: CancellationToken,
    /// Cancelled when the agent shuts down or is revoked: streams are cut too.
    stop_streams: CancellationToken,
    /// Messages to the relay (stream stats).
    control: mpsc::UnboundedSender<AgentMsg>,
    /// Running streams, for the periodic stats.
    active: Mutex<HashMap<u64, Arc<ActiveStream>>>,
}

/// A running stream's counts.
#[derive(Default)]
struct ActiveStream {
    transfer: Transfer,
    /// Bytes already added to the Prometheus counters.
    metered: Mutex<(u64, u64)>,
}

impl ActiveStream {
    /// (bytes in = to the service, bytes out = from the service).
    fn counts(&self) -> (u64, u64) {
        let (plain_to_tunnel, tunnel_to_plain) = self.transfer.get();
        (tunnel_to_plain, plain_to_tunnel)
    }

    fn stat(&self, stream_id: u64, closed: bool) -> StreamStat {
        let (bytes_in, bytes_out) = self.counts();
        let mut m = self.metered.lock();
        crate::metrics::bytes(bytes_in - m.0, bytes_out - m.1);
        *m = (bytes_in, bytes_out);
        StreamStat {
            stream_id,
            bytes_in,
            bytes_out,
            path: PathKind::Userspace,
            counter: CounterSource::Userspace,
            closed,
        }
    }
}

impl Pool {
    /// Stats of every running stream (and their bytes into the metrics).
    fn stats(&self) -> Vec<StreamStat> {
        self.active.lock().iter().map(|(id, s)| s.stat(*id, false)).collect()
    }
}

async fn dial(
    cfg: &AgentConfig,
    connector: &TlsConnector,
    name: &ServerName<'static>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let authority = cfg.relay_url.authority();
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&authority))
        .await
        .map_err(|_| format!("connecting to the relay at {authority} timed out"))?
        .map_err(|e| format!("cannot connect to the relay at {authority}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    datapath::tune_tunnel_socket(&tcp);
    tokio::time::timeout(Duration::from_secs(15), connector.connect(name.clone(), tcp))
        .await
        .map_err(|_| format!("TLS handshake with the relay at {authority} timed out"))?
        .map_err(|e| {
            crate::metrics::handshake_failed();
            format!("TLS handshake with the relay at {authority} failed: {e}")
        })
}

fn client_config(id: &Identity, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
    tls::agent_session_config(id.ca(), id.chain(), id.key(), alpn)
        .map(Arc::new)
        .map_err(|e| format!("building the TLS configuration from the saved identity: {e}"))
}

/// Runs one control session until it ends.
pub async fn run(cfg: Arc<AgentConfig>, id: &Identity, shutdown: &CancellationToken) -> SessionEnd {
    let name = match tls::server_name_of(&cfg.relay_url.host) {
        Ok(n) => n,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let (control_cfg, data_cfg) = match (client_config(id, ALPN_CONTROL), client_config(id, ALPN_DATA)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return SessionEnd::Revoked(e),
    };
    let mut tls = match dial(&cfg, &TlsConnector::from(control_cfg), &name).await {
        Ok(t) => t,
        Err(e) => return SessionEnd::Lost(e),
    };
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: crate::hostname(),
        capabilities: Capabilities::default(),
    };
    if let Err(e) = wire::write_frame(&mut tls, &hello).await {
        return SessionEnd::Lost(format!("sending hello: {e}"));
    }
    let welcome = tokio::time::timeout(Duration::from_secs(15), wire::read_frame::<_, RelayMsg>(&mut tls)).await;
    let (session_id, heartbeat, pool_size) = match welcome {
        Ok(Ok(RelayMsg::Welcome { session_id, heartbeat_secs, pool_size, .. })) => {
            (session_id, Duration::from_secs(heartbeat_secs.max(1)), pool_size)
        }
        Ok(Ok(RelayMsg::Rejected(r))) if r.code == RejectCode::RevokedCertificate => {
            return SessionEnd::Revoked(r.message);
        }
        Ok(Ok(RelayMsg::Rejected(r))) => {
            return SessionEnd::Lost(format!("the relay refused the session: {}", r.message));
        }
        Ok(Ok(other)) => {
            return SessionEnd::Lost(format!("unexpected first message from the relay: {other:?}"));
        }
        // A TLS alert here means the relay refused our certificate (e.g. its CA changed).
        Ok(Err(e)) if e.to_string().contains("alert") => {
            return SessionEnd::Revoked(format!("the relay refused this agent's certificate: {e}"));
        }
        Ok(Err(e)) => return SessionEnd::Lost(format!("waiting for the relay's welcome: {e}")),
        Err(_) => return SessionEnd::Lost("the relay did not answer the hello in 15 s".into()),
    };
    info!(session = %session_id, resource = %id.meta.resource_name, relay = %cfg.relay_url, "connected to the relay");

    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<AgentMsg>();
    let pool = Arc::new(Pool {
        cfg: cfg.clone(),
        connector: TlsConnector::from(data_cfg),
        server_name: name,
        session_id: session_id.clone(),
        target: pool_size.max(1),
        idle: AtomicU32::new(0),
        connecting: AtomicU32::new(0),
        closed: CancellationToken::new(),
        stop_streams: shutdown.child_token(),
        control: out_tx.clone(),
        active: Mutex::new(HashMap::new()),
    });
    crate::metrics::session(true);
    refill(&pool);

    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader_pool = pool.clone();
    let reader = async move {
        loop {
            match tokio::time::timeout(heartbeat * 3, wire::read_frame::<_, RelayMsg>(&mut rd)).await {
                Err(_) => {
                    return SessionEnd::Lost(format!("no word from the relay for {:?}", heartbeat * 3));
                }
                Ok(Err(e)) => return SessionEnd::Ended(format!("control connection ended: {e}")),
                Ok(Ok(RelayMsg::Ping { seq })) => {
                    let _ = out_tx.send(AgentMsg::Pong { seq });
                }
                Ok(Ok(RelayMsg::OpenData { count })) => {
                    for _ in 0..count.min(64) {
                        spawn_data_conn(&reader_pool);
                    }
                }
                Ok(Ok(RelayMsg::Rejected(r))) if r.code == RejectCode::RevokedCertificate => {
                    return SessionEnd::Revoked(r.message);
                }
                Ok(Ok(RelayMsg::Rejected(r))) => {
                    return SessionEnd::Ended(format!("the relay closed the session: {}", r.message));
                }
                Ok(Ok(RelayMsg::Pong { .. })) | Ok(Ok(RelayMsg::Welcome { .. })) => {}
            }
        }
    };
    let renew_in = Duration::from_secs(id.renew_at().saturating_sub(sluice_proto::identity::unix_now()));
    let stats_pool = pool.clone();
    let writer = async move {
        let mut tick = tokio::time::interval(heartbeat);
        tick.tick().await;
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0;
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return SessionEnd::Ended("session closed".into()) },
                _ = tick.tick() => { seq += 1; AgentMsg::Ping { seq } }
                _ = stats_tick.tick() => {
                    let streams = stats_pool.stats();
                    if streams.is_empty() { continue }
                    AgentMsg::StreamStats { streams }
                }
            };
            if let Err(e) = wire::write_frame(&mut wr, &msg).await {
                return SessionEnd::Ended(format!("writing to the relay failed: {e}"));
            }
        }
    };
    let end = tokio::select! {
        e = reader => e,
        e = writer => e,
        _ = shutdown.cancelled() => SessionEnd::Shutdown,
        _ = tokio::time::sleep(renew_in) => SessionEnd::Renew,
    };
    pool.closed.cancel();
    crate::metrics::session(false);
    if matches!(end, SessionEnd::Revoked(_)) {
        pool.stop_streams.cancel();
    }
    end
}

/// Opens data connections until idle + connecting reaches the pool target.
fn refill(pool: &Arc<Pool>) {
    while !pool.closed.is_cancelled()
        && pool.idle.load(Ordering::Relaxed) + pool.connecting.load(Ordering::Relaxed) < pool.target
    {
        spawn_data_conn(pool);
    }
}

fn spawn_data_conn(pool: &Arc<Pool>) {
    pool.connecting.fetch_add(1, Ordering::Relaxed);
    let pool = pool.clone();
    tokio::spawn(async move {
        let conn = data_conn(&pool).await;
        pool.connecting.fetch_sub(1, Ordering::Relaxed);
        let Ok(mut tls) = conn.inspect_err(|e| debug!(error = %e, "opening a data connection failed")) else {
            // Try again a little later, unless the session is over.
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => refill(&pool),
                _ = pool.closed.cancelled() => {}
            }
            return;
        };
        pool.idle.fetch_add(1, Ordering::Relaxed);
        let open = tokio::select! {
            o = wire::read_frame::<_, StreamOpen>(&mut tls) => o,
            _ = pool.closed.cancelled() => { pool.idle.fetch_sub(1, Ordering::Relaxed); return; }
        };
        pool.idle.fetch_sub(1, Ordering::Relaxed);
        match open {
            Ok(open) => {
                refill(&pool);
                let span = info_span!("stream", id = open.stream_id, client = %open.client_addr);
                serve_stream(&pool, tls, open).instrument(span).await;
            }
            Err(e) => {
                // The relay closed an idle connection (its pool was full, or it restarted).
                debug!(error = %e, "idle data connection closed by the relay");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => refill(&pool),
                    _ = pool.closed.cancelled() => {}
                }
            }
        }
    });
}

async fn data_conn(pool: &Pool) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let mut tls = dial(&pool.cfg, &pool.connector, &pool.server_name).await?;
    wire::write_frame(&mut tls, &DataHello { version: PROTOCOL_VERSION, session_id: pool.session_id.clone() })
        .await
        .map_err(|e| format!("sending the data hello: {e}"))?;
    Ok(tls)
}

/// Connects to the private service for a stream the relay opened, and moves its bytes.
async fn serve_stream(pool: &Pool, mut tls: tokio_rustls::client::TlsStream<TcpStream>, open: StreamOpen) {
    let target = format!("{}:{}", pool.cfg.app_host, pool.cfg.app_port);
    let service = match tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            crate::metrics::stream_failed("service_unreachable");
            return refuse(tls, format!("cannot connect to the private service {target}: {e}")).await;
        }
        Err(_) => {
            crate::metrics::stream_failed("service_unreachable");
            return refuse(tls, format!("connecting to the private service {target} timed out after 10 s")).await;
        }
    };
    let _ = service.set_nodelay(true);
    if let Err(e) = wire::write_frame(&mut tls, &StreamReply::Accepted).await {
        return debug!(error = %e, "the relay went away before the stream started");
    }
    debug!(stream = open.stream_id, "stream open");
    let stream = Arc::new(ActiveStream::default());
    pool.active.lock().insert(open.stream_id, stream.clone());
    crate::metrics::stream_opened(PathKind::Userspace.as_str());
    let report = datapath::run_stream(TlsStream::Client(tls), service, &stream.transfer, &pool.stop_streams).await;
    pool.active.lock().remove(&open.stream_id);
    let last = stream.stat(open.stream_id, true);
    let _ = pool.control.send(AgentMsg::StreamStats { streams: vec![last.clone()] });
    let (bytes_in, bytes_out) = (last.bytes_in, last.bytes_out);
    match report.end {
        StreamEnd::Clean => {
            crate::metrics::stream_closed("clean");
            debug!(path = report.path.as_str(), bytes_in, bytes_out, "stream closed")
        }
        end => {
            crate::metrics::stream_closed(if matches!(end, StreamEnd::Cancelled) { "cancelled" } else { "aborted" });
            info!(path = report.path.as_str(), bytes_in, bytes_out, end = %end.describe(), "stream ended abnormally")
        }
    }
}

async fn refuse(mut tls: tokio_rustls::client::TlsStream<TcpStream>, reason: String) {
    warn!(%reason, "stream refused");
    let _ = wire::write_frame(&mut tls, &StreamReply::Refused { reason }).await;
    let _ = tls.shutdown().await;
}

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
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use parking_lot::Mutex;
use sluice_datapath::{self as datapath, DataPath, PathKind, StreamEnd, Transfer, TunnelSocket};
use sluice_proto::tls;
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, AgentMsg, Capabilities, CounterSource, DataHello, PROTOCOL_VERSION, RejectCode,
    RelayMsg, StreamOpen, StreamReply, StreamStat,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsConnector, TlsStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AgentConfig;
use crate::enroll::{self, Identity};
use crate::meter::{Cookie, Meter};
use crate::service::ServiceHealth;

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

/// What data connections share.
struct Pool {
    cfg: Arc<AgentConfig>,
    /// Swapped for one with the new certificate when it is renewed.
    connector: Mutex<TlsConnector>,
    /// The private service's reachability, fed by every stream's connect.
    service: Arc<ServiceHealth>,
    /// How streams move bytes.
    data_path: Arc<DataPath>,
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
    meter: Arc<Meter>,
}

/// A running stream's counts: from the eBPF program for its registered sockets, else
/// from the copy loop.
struct ActiveStream {
    transfer: Transfer,
    /// The path the stream's bytes take.
    path: PathKind,
    meter: Arc<Meter>,
    /// The private-service socket (payload bytes of the stream).
    service: Option<Cookie>,
    /// The tunnel socket (TLS bytes).
    tunnel: Option<Cookie>,
    /// Bytes already added to the Prometheus counters.
    metered: Mutex<(u64, u64)>,
}

impl ActiveStream {
    /// (bytes in = to the service, bytes out = from the service) and who counted them.
    fn counts(&self) -> (u64, u64, CounterSource) {
        if let Some(c) = self.service.and_then(|c| self.meter.counts(c)) {
            return (c.tx_bytes, c.rx_bytes, CounterSource::Ebpf);
        }
        let (plain_to_tunnel, tunnel_to_plain) = self.transfer.get();
        (tunnel_to_plain, plain_to_tunnel, CounterSource::Userspace)
    }

    fn stat_from(
        &self,
        stream_id: u64,
        closed: bool,
        counts: (u64, u64, CounterSource),
        tunnel: Option<(u64, u64)>,
    ) -> StreamStat {
        let (bytes_in, bytes_out, counter) = counts;
        let mut m = self.metered.lock();
        crate::metrics::bytes(bytes_in.saturating_sub(m.0), bytes_out.saturating_sub(m.1));
        *m = (bytes_in.max(m.0), bytes_out.max(m.1));
        StreamStat { stream_id, bytes_in, bytes_out, path: self.path, counter, closed, tunnel_bytes: tunnel }
    }

    fn stat(&self, stream_id: u64) -> StreamStat {
        let tunnel = self.tunnel.and_then(|c| self.meter.counts(c)).map(|c| (c.rx_bytes, c.tx_bytes));
        self.stat_from(stream_id, false, self.counts(), tunnel)
    }
}

impl Pool {
    /// Stats of every running stream (and their bytes into the metrics).
    fn stats(&self) -> Vec<StreamStat> {
        self.active.lock().iter().map(|(id, s)| s.stat(*id)).collect()
    }
}

/// Connects to `target`, registering the socket with `meter` before the handshake so
/// every byte is counted. Returns the socket and its cookie (None: count in user space).
pub async fn connect_metered(target: &str, meter: Option<&Meter>) -> std::io::Result<(TcpStream, Option<Cookie>)> {
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, format!("{target} resolves to no address"));
    for addr in tokio::net::lookup_host(target).await? {
        let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        let cookie = meter.and_then(|m| m.register(sock.as_fd()));
        match sock.connect(addr).await {
            Ok(s) => return Ok((s, cookie)),
            Err(e) => {
                if let (Some(m), Some(c)) = (meter, cookie) {
                    m.unregister(c);
                }
                last = e;
            }
        }
    }
    Err(last)
}

type Tunnel = tokio_rustls::client::TlsStream<TunnelSocket>;

async fn dial(
    cfg: &AgentConfig,
    connector: &TlsConnector,
    name: &ServerName<'static>,
    meter: Option<&Meter>,
) -> Result<(Tunnel, Option<Cookie>), String> {
    let authority = cfg.relay_url.authority();
    let (tcp, cookie) = tokio::time::timeout(Duration::from_secs(10), connect_metered(&authority, meter))
        .await
        .map_err(|_| format!("connecting to the relay at {authority} timed out"))?
        .map_err(|e| format!("cannot connect to the relay at {authority}: {e}"))?;
    let forget = |why: String| {
        if let (Some(m), Some(c)) = (meter, cookie) {
            m.unregister(c);
        }
        why
    };
    let _ = tcp.set_nodelay(true);
    datapath::tune_tunnel_socket(&tcp);
    let tls = tokio::time::timeout(Duration::from_secs(15), connector.connect(name.clone(), TunnelSocket::new(tcp)))
        .await
        .map_err(|_| forget(format!("TLS handshake with the relay at {authority} timed out")))?
        .map_err(|e| {
            crate::metrics::handshake_failed();
            forget(format!("TLS handshake with the relay at {authority} failed: {e}"))
        })?;
    Ok((tls, cookie))
}

fn client_config(id: &Identity, alpn: &[u8]) -> Result<Arc<ClientConfig>, String> {
    tls::agent_session_config(id.ca(), id.chain(), id.key(), alpn)
        .map(Arc::new)
        .map_err(|e| format!("building the TLS configuration from the saved identity: {e}"))
}

/// Runs one control session until it ends.
pub async fn run(
    cfg: Arc<AgentConfig>,
    meter: Arc<Meter>,
    data_path: Arc<DataPath>,
    service: Arc<ServiceHealth>,
    id: Identity,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let id = &id;
    let name = match tls::server_name_of(&cfg.relay_url.host) {
        Ok(n) => n,
        Err(e) => return SessionEnd::Lost(e.to_string()),
    };
    let (control_cfg, data_cfg) = match (client_config(id, ALPN_CONTROL), client_config(id, ALPN_DATA)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return SessionEnd::Revoked(e),
    };
    let mut tls = match dial(&cfg, &TlsConnector::from(control_cfg), &name, None).await {
        Ok((t, _)) => t,
        Err(e) => return SessionEnd::Lost(e),
    };
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: crate::hostname(),
        capabilities: Capabilities {
            ktls: data_path.kernel_tls(),
            ebpf: meter.source() == CounterSource::Ebpf,
            renew: true,
            service_status: true,
        },
    };
    if let Err(e) = wire::write_frame(&mut tls, &hello).await {
        return SessionEnd::Lost(format!("sending hello: {e}"));
    }
    let welcome = tokio::time::timeout(Duration::from_secs(15), wire::read_frame::<_, RelayMsg>(&mut tls)).await;
    let (session_id, heartbeat, pool_size, relay_caps) = match welcome {
        Ok(Ok(RelayMsg::Welcome { session_id, heartbeat_secs, pool_size, capabilities, .. })) => {
            (session_id, Duration::from_secs(heartbeat_secs.max(1)), pool_size, capabilities)
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
        connector: Mutex::new(TlsConnector::from(data_cfg)),
        service: service.clone(),
        data_path,
        server_name: name,
        session_id: session_id.clone(),
        target: pool_size.max(1),
        idle: AtomicU32::new(0),
        connecting: AtomicU32::new(0),
        closed: CancellationToken::new(),
        stop_streams: shutdown.child_token(),
        control: out_tx.clone(),
        active: Mutex::new(HashMap::new()),
        meter,
    });
    crate::metrics::session(true);
    refill(&pool);

    let (mut rd, mut wr) = tokio::io::split(tls);
    let reader_pool = pool.clone();
    let (renewed_tx, renewed_rx) = mpsc::unbounded_channel::<RelayMsg>();
    let renewal_control = out_tx.clone();
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
                Ok(Ok(m @ (RelayMsg::CertificateRenewed { .. } | RelayMsg::RenewalRefused(_)))) => {
                    let _ = renewed_tx.send(m);
                }
                Ok(Ok(RelayMsg::Pong { .. })) | Ok(Ok(RelayMsg::Welcome { .. })) => {}
            }
        }
    };
    let renewal =
        renew_certificate(cfg.clone(), pool.clone(), id.clone(), relay_caps.renew, renewal_control, renewed_rx);
    let stats_pool = pool.clone();
    // Report the service's state now and on every change (to relays that take it).
    let mut service_rx = service.subscribe();
    if relay_caps.service_status {
        service_rx.mark_changed();
    }
    let writer = async move {
        let mut tick = tokio::time::interval(heartbeat);
        tick.tick().await;
        let mut stats_tick = tokio::time::interval(Duration::from_secs(1));
        let mut seq = 0;
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return SessionEnd::Ended("session closed".into()) },
                _ = tick.tick() => { seq += 1; AgentMsg::Ping { seq } }
                changed = service_rx.changed(), if relay_caps.service_status => {
                    if changed.is_err() { continue }
                    let s = service_rx.borrow_and_update().clone();
                    let Some(reachable) = s.reachable else { continue };
                    AgentMsg::ServiceStatus { reachable, error: s.error }
                }
                _ = stats_tick.tick() => {
                    crate::metrics::pool(stats_pool.meter.entries(), stats_pool.idle.load(Ordering::Relaxed));
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
        e = renewal => e,
    };
    pool.closed.cancel();
    crate::metrics::session(false);
    if matches!(end, SessionEnd::Revoked(_)) {
        pool.stop_streams.cancel();
    }
    end
}

/// Renews the agent's certificate over the control session two thirds into its life,
/// again and again while the session lasts; the registration JWT is not needed. Returns
/// only when the session must end: the relay cannot renew (an older relay), or it says
/// the certificate is revoked. A failed attempt is retried (sooner as expiry nears).
async fn renew_certificate(
    cfg: Arc<AgentConfig>,
    pool: Arc<Pool>,
    mut id: Identity,
    relay_renews: bool,
    control: mpsc::UnboundedSender<AgentMsg>,
    mut answers: mpsc::UnboundedReceiver<RelayMsg>,
) -> SessionEnd {
    use sluice_proto::identity::unix_now;
    let mut due = id.renew_at();
    loop {
        tokio::time::sleep(Duration::from_secs(due.saturating_sub(unix_now()))).await;
        if !relay_renews {
            return SessionEnd::Renew;
        }
        let retry_at = unix_now() + (id.meta.not_after.saturating_sub(unix_now()) / 10).clamp(1, 60);
        let csr_pem = match enroll::renewal_csr(&id) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot make a renewal request; enrolling again");
                return SessionEnd::Renew;
            }
        };
        if control.send(AgentMsg::RenewCertificate { csr_pem }).is_err() {
            return SessionEnd::Ended("session closed".into());
        }
        match tokio::time::timeout(Duration::from_secs(30), answers.recv()).await {
            Ok(Some(RelayMsg::CertificateRenewed { cert_pem })) => {
                match enroll::save_renewed(&cfg.state_dir, &id, cert_pem) {
                    Ok(new) => match client_config(&new, ALPN_DATA) {
                        Ok(c) => {
                            *pool.connector.lock() = TlsConnector::from(c);
                            info!(valid_until = new.meta.not_after, "certificate renewed over the control session");
                            id = new;
                            due = id.renew_at();
                            continue;
                        }
                        Err(e) => warn!(error = %e, "the renewed certificate does not fit this agent's key"),
                    },
                    Err(e) => warn!(error = %e, "could not take the renewed certificate"),
                }
            }
            Ok(Some(RelayMsg::RenewalRefused(r))) if r.code == RejectCode::RevokedCertificate => {
                return SessionEnd::Revoked(r.message);
            }
            Ok(Some(RelayMsg::RenewalRefused(r))) => {
                warn!(reason = %r.message, "the relay refused to renew the certificate")
            }
            Ok(_) => return SessionEnd::Ended("session closed".into()),
            Err(_) => warn!("the relay did not answer the renewal request in 30 s"),
        }
        due = retry_at;
    }
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
        let Ok((mut tls, cookie)) = conn.inspect_err(|e| debug!(error = %e, "opening a data connection failed")) else {
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
            _ = pool.closed.cancelled() => {
                pool.idle.fetch_sub(1, Ordering::Relaxed);
                forget(&pool.meter, cookie);
                return;
            }
        };
        pool.idle.fetch_sub(1, Ordering::Relaxed);
        match open {
            Ok(open) => {
                refill(&pool);
                let span = info_span!("stream", id = open.stream_id, client = %open.client_addr);
                serve_stream(&pool, tls, cookie, open).instrument(span).await;
            }
            Err(e) => {
                // The relay closed an idle connection (its pool was full, or it restarted).
                debug!(error = %e, "idle data connection closed by the relay");
                forget(&pool.meter, cookie);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => refill(&pool),
                    _ = pool.closed.cancelled() => {}
                }
            }
        }
    });
}

fn forget(meter: &Meter, cookie: Option<Cookie>) {
    if let Some(c) = cookie {
        meter.unregister(c);
    }
}

async fn data_conn(pool: &Pool) -> Result<(Tunnel, Option<Cookie>), String> {
    let connector = pool.connector.lock().clone();
    let (mut tls, cookie) = dial(&pool.cfg, &connector, &pool.server_name, Some(&pool.meter)).await?;
    let hello = DataHello { version: PROTOCOL_VERSION, session_id: pool.session_id.clone() };
    if let Err(e) = wire::write_frame(&mut tls, &hello).await {
        forget(&pool.meter, cookie);
        return Err(format!("sending the data hello: {e}"));
    }
    Ok((tls, cookie))
}

/// Waits (up to 10 s) until the peer has acknowledged everything queued on `fd`, so the
/// eBPF program has seen every byte the application wrote before the final read.
async fn drained(fd: &OwnedFd) {
    for i in 0..1000u64 {
        match crate::meter::unacked_bytes(fd.as_fd()) {
            Some(0) | None => return,
            Some(_) => tokio::time::sleep(Duration::from_millis(1 + i.min(9))).await,
        }
    }
}

/// Connects to the private service for a stream the relay opened, and moves its bytes.
async fn serve_stream(pool: &Pool, mut tls: Tunnel, tunnel_cookie: Option<Cookie>, open: StreamOpen) {
    let target = format!("{}:{}", pool.cfg.app_host, pool.cfg.app_port);
    let connect = tokio::time::timeout(Duration::from_secs(10), connect_metered(&target, Some(&pool.meter))).await;
    let (service, service_cookie) = match connect {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            crate::metrics::stream_failed("service_unreachable");
            forget(&pool.meter, tunnel_cookie);
            let why = format!("cannot connect to the private service {target}: {e}");
            pool.service.record_error(why.clone());
            return refuse(tls, why).await;
        }
        Err(_) => {
            crate::metrics::stream_failed("service_unreachable");
            forget(&pool.meter, tunnel_cookie);
            let why = format!("connecting to the private service {target} timed out after 10 s");
            pool.service.record_error(why.clone());
            return refuse(tls, why).await;
        }
    };
    pool.service.record_ok();
    let _ = service.set_nodelay(true);
    if let Err(e) = wire::write_frame(&mut tls, &StreamReply::Accepted).await {
        forget(&pool.meter, tunnel_cookie);
        forget(&pool.meter, service_cookie);
        return debug!(error = %e, "the relay went away before the stream started");
    }
    let prepared = match pool.data_path.prepare(TlsStream::Client(tls)) {
        Ok(p) => p,
        Err(e) => {
            crate::metrics::stream_failed("ktls");
            forget(&pool.meter, tunnel_cookie);
            forget(&pool.meter, service_cookie);
            datapath::reset(&service);
            return warn!(stream = open.stream_id, error = %e, "stream failed: the kernel refused the connection's TLS keys");
        }
    };
    debug!(stream = open.stream_id, path = prepared.path().as_str(), "stream open");
    // Keep the sockets open past the copy loop until the kernel has sent everything, so
    // the final eBPF counts include the last bytes (closing them here, not in the loop).
    let keep = |fd: BorrowedFd<'_>, c: Option<Cookie>| c.and_then(|_| fd.try_clone_to_owned().ok());
    let service_fd = keep(service.as_fd(), service_cookie);
    let tunnel_fd = keep(prepared.tunnel_tcp().as_fd(), tunnel_cookie);
    let stream = Arc::new(ActiveStream {
        transfer: Transfer::default(),
        path: prepared.path(),
        meter: pool.meter.clone(),
        service: service_cookie,
        tunnel: tunnel_cookie,
        metered: Mutex::new((0, 0)),
    });
    pool.active.lock().insert(open.stream_id, stream.clone());
    crate::metrics::stream_opened(prepared.path().as_str());
    let report = prepared.run(service, &stream.transfer, &pool.stop_streams).await;
    crate::metrics::userspace_copy(stream.transfer.copied());
    pool.active.lock().remove(&open.stream_id);
    if matches!(report.end, StreamEnd::Clean) {
        if let Some(fd) = &service_fd {
            drained(fd).await;
        }
        if let Some(fd) = &tunnel_fd {
            drained(fd).await;
        }
    }
    let service_final = service_cookie.and_then(|c| pool.meter.unregister(c));
    let tunnel_final = tunnel_cookie.and_then(|c| pool.meter.unregister(c)).map(|c| (c.rx_bytes, c.tx_bytes));
    drop((service_fd, tunnel_fd));
    let counts = match service_final {
        Some(c) => (c.tx_bytes, c.rx_bytes, CounterSource::Ebpf),
        None => {
            let (plain_to_tunnel, tunnel_to_plain) = stream.transfer.get();
            (tunnel_to_plain, plain_to_tunnel, CounterSource::Userspace)
        }
    };
    let last = stream.stat_from(open.stream_id, true, counts, tunnel_final);
    let _ = pool.control.send(AgentMsg::StreamStats { streams: vec![last.clone()] });
    let (bytes_in, bytes_out) = (last.bytes_in, last.bytes_out);
    let (copied_out, copied_in) = stream.transfer.get();
    match report.end {
        StreamEnd::Clean => {
            crate::metrics::stream_closed("clean");
            debug!(path = report.path.as_str(), bytes_in, bytes_out, copied_in, copied_out, counter = ?last.counter, "stream closed")
        }
        end => {
            crate::metrics::stream_closed(if matches!(end, StreamEnd::Cancelled) { "cancelled" } else { "aborted" });
            info!(path = report.path.as_str(), bytes_in, bytes_out, end = %end.describe(), "stream ended abnormally")
        }
    }
}

async fn refuse(mut tls: Tunnel, reason: String) {
    warn!(%reason, "stream refused");
    let _ = wire::write_frame(&mut tls, &StreamReply::Refused { reason }).await;
    let _ = tls.shutdown().await;
}

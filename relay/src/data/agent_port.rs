//! The one port agents dial: TLS with ALPN deciding what a connection is — enrollment
//! (server-auth TLS), a control session or a data connection (both mutual TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rustls::ServerConfig;
use rustls::server::Acceptor;
use sluice_datapath::{TrafficSecrets, TunnelSocket};
use sluice_proto::heartbeat::Heartbeat;
use sluice_proto::identity::{AgentIdentity, printable, unix_now};
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, ALPN_ENROLL, AgentMsg, Capabilities, DataHello, EnrollRequest, EnrollResponse,
    PROTOCOL_VERSION, RejectCode, Rejection, RelayMsg,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::data::registry::{AgentSession, ServiceReport, SessionInfo};
use crate::relay::Relay;
use crate::state::enrollment::{check_identity, reject};
use crate::state::store::Resource;

/// How long a peer may take for its TLS handshake or first frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

pub use crate::state::enrollment::new_id;

static REFUSALS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);
static ACCEPT_ERRORS: crate::admission::Throttle = crate::admission::Throttle::new(crate::admission::LOG_EVERY);

/// Accepts agent connections until shutdown. At most `--agent-max-handshakes`
/// connections are unauthenticated at once (a TLS handshake in progress, or an
/// enrollment, which has no client certificate); more are closed at once. A failed
/// accept (out of file descriptors) is retried with backoff, not spun.
pub async fn serve(relay: Arc<Relay>, listener: TcpListener) {
    let enroll_cfg = Arc::new(
        sluice_proto::tls::relay_enroll_config(relay.identity.server_chain.clone(), relay.identity.server_key())
            .expect("relay TLS configuration"),
    );
    let agent_cfg = Arc::new(
        sluice_proto::tls::relay_agent_config(
            relay.identity.server_chain.clone(),
            relay.identity.server_key(),
            relay.identity.ca_der.clone(),
        )
        .expect("relay mTLS configuration"),
    );
    let cap = relay.config.limits.agent_max_handshakes;
    let gate = crate::admission::Gate::new("agent", cap);
    let mut backoff = crate::admission::AcceptBackoff::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = relay.shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                backoff.after_error("agent", &e, &ACCEPT_ERRORS).await;
                continue;
            }
        };
        backoff.succeeded();
        let Some(slot) = gate.try_admit() else {
            sluice_datapath::reset(&tcp);
            crate::metrics::connection_refused("agent");
            crate::admission::log_refusal(
                &REFUSALS,
                "unauthenticated agent-port connections",
                cap,
                "--agent-max-handshakes",
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        sluice_datapath::tune_tunnel_socket(&tcp);
        let (relay, enroll_cfg, agent_cfg) = (relay.clone(), enroll_cfg.clone(), agent_cfg.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, enroll_cfg, agent_cfg)).await {
                Ok(Ok(tls)) => {
                    // An enrollment stays unauthenticated to its end; the others have
                    // proven their certificate.
                    let enrolling = tls.get_ref().1.alpn_protocol() == Some(ALPN_ENROLL);
                    let _slot = enrolling.then_some(slot);
                    dispatch(relay, tls, peer).await
                }
                Ok(Err(e)) => {
                    crate::metrics::handshake_failed();
                    info!(%peer, error = %e, "agent TLS handshake refused")
                }
                Err(_) => {
                    crate::metrics::handshake_failed();
                    info!(%peer, "agent TLS handshake timed out")
                }
            }
        });
    }
}

async fn handshake(
    tcp: TcpStream,
    enroll_cfg: Arc<ServerConfig>,
    agent_cfg: Arc<ServerConfig>,
) -> std::io::Result<TlsStream<TunnelSocket>> {
    // Every connection records its traffic secrets; only a data connection's
    // configuration hands them over (`key_log`), for kernel TLS to follow key updates.
    let secrets = Arc::new(TrafficSecrets::default());
    let start =
        LazyConfigAcceptor::new(Acceptor::default(), TunnelSocket::with_traffic_secrets(tcp, secrets.clone())).await?;
    let offers = |alpn: &[u8]| start.client_hello().alpn().is_some_and(|mut protos| protos.any(|p| p == alpn));
    let config = if offers(ALPN_ENROLL) {
        enroll_cfg
    } else if offers(ALPN_DATA) {
        let mut config = (*agent_cfg).clone();
        config.key_log = secrets;
        Arc::new(config)
    } else {
        agent_cfg
    };
    start.into_stream(config).await
}

async fn dispatch(relay: Arc<Relay>, tls: TlsStream<TunnelSocket>, peer: SocketAddr) {
    let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    match alpn.as_deref() {
        Some(ALPN_ENROLL) => enroll(relay, tls, peer).instrument(info_span!("enroll", %peer)).await,
        Some(ALPN_CONTROL) | Some(ALPN_DATA) => {
            let Some(who) = peer_identity(&tls) else {
                warn!(%peer, "client certificate has no Sluice agent identity; closing");
                return;
            };
            if alpn.as_deref() == Some(ALPN_CONTROL) {
                let span = info_span!("session", resource = %who.resource_id, agent = %who.agent_id, %peer);
                control(relay, tls, who, peer).instrument(span).await
            } else {
                data(relay, tls, who, peer).await
            }
        }
        _ => debug!(%peer, "connection without a Sluice ALPN; closing"),
    }
}

fn peer_identity(tls: &TlsStream<TunnelSocket>) -> Option<AgentIdentity> {
    let certs = tls.get_ref().1.peer_certificates()?;
    AgentIdentity::from_cert_der(certs.first()?)
}

// === Enrollment ===

async fn enroll(relay: Arc<Relay>, mut tls: TlsStream<TunnelSocket>, peer: SocketAddr) {
    // The peer is not authenticated yet: a small frame limit, and a buffer that grows
    // only as its bytes arrive.
    let read = wire::read_frame_limited(&mut tls, wire::MAX_UNAUTHENTICATED_FRAME);
    let req: EnrollRequest = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return debug!(error = %e, "bad enrollment request"),
        Err(_) => return debug!("enrollment request timed out"),
    };
    let answer = match relay.enroller().decide(&req) {
        Ok(e) => {
            crate::metrics::enrollment("enrolled");
            info!(resource = %e.resource_id, name = %e.resource_name, agent = %e.agent_id, host = %printable(&req.hostname), "agent enrolled");
            EnrollResponse::Enrolled(e)
        }
        Err(r) => {
            crate::metrics::enrollment(reject_label(r.code));
            info!(%peer, name = %printable(&req.name), code = reject_label(r.code), reason = %r.message, "enrollment refused");
            EnrollResponse::Rejected(r)
        }
    };
    let _ = wire::write_frame(&mut tls, &answer).await;
    let _ = tls.shutdown().await;
}

fn reject_label(code: RejectCode) -> &'static str {
    match code {
        RejectCode::InvalidToken => "invalid_token",
        RejectCode::ExpiredToken => "expired_token",
        RejectCode::RevokedToken => "revoked_token",
        RejectCode::Forbidden => "forbidden",
        RejectCode::RevokedCertificate => "revoked_certificate",
        RejectCode::BadRequest => "bad_request",
        RejectCode::UnsupportedVersion => "unsupported_version",
        RejectCode::Internal => "internal",
        RejectCode::Unavailable => "unavailable",
    }
}

// === Control sessions ===

async fn control(relay: Arc<Relay>, mut tls: TlsStream<TunnelSocket>, who: AgentIdentity, peer: SocketAddr) {
    let Some((resource, info)) = admit_session(&relay, &mut tls, &who, peer).await else { return };
    let (out_tx, out_rx) = mpsc::unbounded_channel::<RelayMsg>();
    let session = Arc::new(AgentSession::new(
        new_id("ses").into(),
        who.agent_id.clone(),
        resource.id.clone().into(),
        who.generation,
        info,
        out_tx,
    ));
    let welcome = RelayMsg::Welcome {
        version: PROTOCOL_VERSION,
        session_id: session.id.clone(),
        resource_id: resource.id.clone().into(),
        resource_name: resource.name.clone(),
        heartbeat_secs: relay.config.heartbeat.as_secs().max(1),
        pool_size: relay.config.pool_size,
        capabilities: Capabilities {
            renew: true,
            service_status: true,
            relays: true,
            key_updates: relay.data_path.follows_key_updates(),
            ..Default::default()
        },
        relay_id: relay.cluster.id.clone(),
        relays: relay.cluster.peers(),
    };
    if wire::write_frame(&mut tls, &welcome).await.is_err() {
        return;
    }
    register(&relay, &session, &resource);
    let why = run_session(&relay, &session, &who, tls, out_rx).await;
    relay.registry.remove(&session);
    crate::metrics::agent_sessions(&resource.id, -1.0);
    let _ = relay.store.touch_resource(&resource.id, unix_now());
    info!(session = %session.id, reason = %why, "agent session down");
}

/// Checks the certificate's identity and reads the hello; refuses (and returns `None`)
/// a revoked identity, another protocol version or anything but a hello.
async fn admit_session(
    relay: &Relay,
    tls: &mut TlsStream<TunnelSocket>,
    who: &AgentIdentity,
    peer: SocketAddr,
) -> Option<(Resource, SessionInfo)> {
    let refuse = async |tls: &mut TlsStream<TunnelSocket>, r: Rejection| {
        info!(reason = %r.message, "control session refused");
        let _ = wire::write_frame(tls, &RelayMsg::Rejected(r)).await;
        let _ = tls.shutdown().await;
    };
    let resource = match check_identity(&*relay.store, who) {
        Ok(r) => r,
        Err(r) => {
            refuse(tls, r).await;
            return None;
        }
    };
    let max = relay.config.limits.max_agents_per_resource;
    let connected = relay.registry.sessions_of(&resource.id).len();
    if connected >= max as usize {
        let r = reject(
            RejectCode::Unavailable,
            format!(
                "resource {} ({:?}) already has {connected} connected agents, the relay's limit \
                 (--max-agents-per-resource {max}); this agent retries and gets in when one of them leaves",
                resource.id, resource.name
            ),
        );
        warn!(resource = %resource.id, connected, "agent session refused: agents per resource");
        refuse(tls, r).await;
        return None;
    }
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame::<_, AgentMsg>(tls)).await {
        Ok(Ok(AgentMsg::Hello { version, .. })) if version != PROTOCOL_VERSION => {
            let r = reject(RejectCode::UnsupportedVersion, wire::version_refusal(version));
            refuse(tls, r).await;
            None
        }
        Ok(Ok(AgentMsg::Hello { agent_version, hostname, capabilities, .. })) => {
            let info = SessionInfo {
                hostname: printable(&hostname),
                agent_version: printable(&agent_version),
                peer: Some(peer),
                capabilities,
            };
            Some((resource, info))
        }
        Ok(Ok(other)) => {
            warn!(?other, "control session did not start with hello");
            None
        }
        Ok(Err(e)) => {
            debug!(error = %e, "control session closed before hello");
            None
        }
        Err(_) => {
            debug!("control session hello timed out");
            None
        }
    }
}

/// A session is up: records it, starts the resource's port with its first session, and
/// warns when another live session has the same agent identity.
fn register(relay: &Arc<Relay>, session: &Arc<AgentSession>, resource: &Resource) {
    let now = unix_now();
    let _ = relay.store.mark_agent_connected(&session.agent_id, now);
    let _ = relay.store.touch_resource(&resource.id, now);
    if relay.registry.add(session.clone()) {
        crate::data::resource_port::start(relay.clone(), resource.id.clone(), resource.name.clone(), resource.port);
    }
    crate::metrics::agent_sessions(&resource.id, 1.0);
    let info = &session.info;
    info!(
        session = %session.id, name = %resource.name, host = %info.hostname, agent_version = %info.agent_version,
        ktls = info.capabilities.ktls, ebpf = info.capabilities.ebpf, "agent session up"
    );
    let twins = relay.registry.twins_of(session);
    if !twins.is_empty() {
        let others: Vec<String> = twins
            .iter()
            .map(|t| {
                format!("{} from {} ({})", t.id, t.hostname, t.info.peer.map(|p| p.to_string()).unwrap_or_default())
            })
            .collect();
        warn!(
            agent = %session.agent_id,
            other_sessions = %others.join(", "),
            "two live sessions share one agent identity: the agent's STATE_DIR was probably copied to a second \
             host or container; give each agent its own STATE_DIR (volume) so each has its own identity"
        );
    }
}

/// Runs a live session until it ends; returns why. The reader handles the agent's
/// frames, the shared [`Heartbeat`] rule pings and declares a silent agent dead, the
/// writer sends what the session queued (pings, pongs, answers, a revocation).
async fn run_session(
    relay: &Relay,
    session: &Arc<AgentSession>,
    who: &AgentIdentity,
    tls: TlsStream<TunnelSocket>,
    mut out_rx: mpsc::UnboundedReceiver<RelayMsg>,
) -> String {
    let (mut rd, mut wr) = tokio::io::split(tls);
    let heartbeat = Mutex::new(Heartbeat::new(relay.config.heartbeat.max(Duration::from_secs(1)), Instant::now()));
    let reader = async {
        loop {
            let msg = match wire::read_frame::<_, AgentMsg>(&mut rd).await {
                Ok(m) => m,
                Err(e) => return format!("control connection ended: {e}"),
            };
            heartbeat.lock().heard(Instant::now());
            session.heard();
            if let Some(end) = on_agent_msg(relay, session, who, msg) {
                return end;
            }
        }
    };
    let mut seq = 0u64;
    let beats = Heartbeat::run(&heartbeat, || {
        seq += 1;
        session.send(RelayMsg::Ping { seq })
    });
    let writer = async {
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return "session closed".to_owned() },
                _ = session.closed.cancelled() => {
                    // Flush a pending rejection (revocation) before closing.
                    while let Ok(m) = out_rx.try_recv() { let _ = wire::write_frame(&mut wr, &m).await; }
                    let _ = wr.shutdown().await;
                    return "session closed by the relay".to_owned();
                }
                _ = relay.shutdown.cancelled() => { let _ = wr.shutdown().await; return "relay shutting down".to_owned() }
            };
            if let Err(e) = wire::write_frame(&mut wr, &msg).await {
                return format!("writing to the agent failed: {e}");
            }
        }
    };
    tokio::select! {
        w = reader => w,
        w = writer => w,
        silent = beats => match silent {
            Some(d) => format!("no word from the agent for {d:?}: declared dead"),
            None => "session closed".to_owned(),
        },
    }
}

/// Handles one frame from the agent; `Some(why)` ends the session.
fn on_agent_msg(relay: &Relay, session: &AgentSession, who: &AgentIdentity, msg: AgentMsg) -> Option<String> {
    match msg {
        AgentMsg::Ping { seq } => {
            session.send(RelayMsg::Pong { seq });
        }
        AgentMsg::Pong { .. } => {}
        AgentMsg::StreamStats { streams } => relay.streams.report(&who.agent_id, &streams),
        AgentMsg::RenewCertificate { csr_pem } => {
            session.send(renew(relay, who, &csr_pem));
        }
        AgentMsg::ServiceStatus { reachable, error } => {
            let error = error.map(|e| printable(&e));
            if reachable {
                info!("agent reports the private service reachable");
            } else {
                warn!(error = error.as_deref().unwrap_or("-"), "agent reports the private service unreachable");
            }
            *session.service.lock() = ServiceReport { reachable: Some(reachable), error, at: unix_now() };
        }
        AgentMsg::Hello { .. } => return Some("agent sent a second hello".into()),
        AgentMsg::Unknown => debug!("skipped a control message of a type this relay does not know (newer agent)"),
    }
    None
}

/// Answers a renewal request on a control session: a new certificate for the same
/// identity, if that identity is still current (resource exists, generation not rotated).
fn renew(relay: &Relay, who: &AgentIdentity, csr_pem: &str) -> RelayMsg {
    let signed = check_identity(&*relay.store, who).and_then(|_| {
        relay
            .identity
            .sign_agent_csr(csr_pem, who, relay.config.agent_cert_lifetime)
            .map_err(|m| reject(RejectCode::BadRequest, m))
    });
    match signed {
        Ok(cert_pem) => {
            crate::metrics::enrollment("renewed");
            info!("agent certificate renewed");
            RelayMsg::CertificateRenewed { cert_pem }
        }
        Err(r) => {
            crate::metrics::enrollment("renewal_refused");
            info!(reason = %r.message, "certificate renewal refused");
            RelayMsg::RenewalRefused(r)
        }
    }
}

// === Data connections ===

async fn data(relay: Arc<Relay>, mut tls: TlsStream<TunnelSocket>, who: AgentIdentity, peer: SocketAddr) {
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    crate::metrics::data_handshake(if resumed { "resumed" } else { "full" });
    let hello: DataHello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame(&mut tls)).await {
        Ok(Ok(h)) => h,
        _ => return debug!(%peer, "data connection closed before its hello"),
    };
    let Some(session) = relay.registry.session(&hello.session_id) else {
        return debug!(%peer, session = %hello.session_id, "data connection for an unknown session; closing");
    };
    if session.agent_id != who.agent_id || session.generation != who.generation {
        return warn!(%peer, agent = %who.agent_id, session = %session.id, "data connection's certificate does not match its session; closing");
    }
    if !session.park(tls) {
        debug!(session = %session.id, "surplus data connection closed");
    }
}

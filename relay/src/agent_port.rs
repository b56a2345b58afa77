//! The one port agents dial: TLS with ALPN deciding what a connection is — enrollment
//! (server-auth TLS), a control session or a data connection (both mutual TLS).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use rustls::ServerConfig;
use rustls::server::Acceptor;
use sluice_datapath::TunnelSocket;
use sluice_proto::identity::{AgentIdentity, RegistrationClaims, printable, unix_now, validate_resource_name};
use sluice_proto::wire::{
    self, ALPN_CONTROL, ALPN_DATA, ALPN_ENROLL, AgentMsg, Capabilities, DataHello, EnrollRequest, EnrollResponse,
    Enrollment, PROTOCOL_VERSION, RejectCode, Rejection, RelayMsg,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::registry::{AgentSession, ServiceReport, SessionInfo};
use crate::relay::Relay;
use crate::store::{AgentRecord, Resource, StoreError};

/// How long a peer may take for its TLS handshake or first frame.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// Makes a short random id with a readable prefix, e.g. `res_k3x9…`.
pub fn new_id(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let s: String = (0..16).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect();
    format!("{prefix}_{s}")
}

/// Accepts agent connections until shutdown.
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
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = relay.shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(error = %e, "accepting an agent connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        sluice_datapath::tune_tunnel_socket(&tcp);
        let (relay, enroll_cfg, agent_cfg) = (relay.clone(), enroll_cfg.clone(), agent_cfg.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(tcp, enroll_cfg, agent_cfg)).await {
                Ok(Ok(tls)) => dispatch(relay, tls, peer).await,
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
    let start = LazyConfigAcceptor::new(Acceptor::default(), TunnelSocket::new(tcp)).await?;
    let wants_enroll = start.client_hello().alpn().is_some_and(|mut protos| protos.any(|p| p == ALPN_ENROLL));
    start.into_stream(if wants_enroll { enroll_cfg } else { agent_cfg }).await
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

fn reject(code: RejectCode, message: impl Into<String>) -> Rejection {
    Rejection { code, message: message.into() }
}

fn internal(e: StoreError) -> Rejection {
    warn!(error = %e, "store error during enrollment");
    reject(RejectCode::Internal, "the relay could not read its store; try again later")
}

// === Enrollment ===

async fn enroll(relay: Arc<Relay>, mut tls: TlsStream<TunnelSocket>, peer: SocketAddr) {
    let req: EnrollRequest = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame(&mut tls)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return debug!(error = %e, "bad enrollment request"),
        Err(_) => return debug!("enrollment request timed out"),
    };
    let answer = match decide_enrollment(&relay, &req) {
        Ok(e) => {
            crate::metrics::enrollment("enrolled");
            info!(resource = %e.resource_id, name = %e.resource_name, agent = %e.agent_id, host = %printable(&req.hostname), "agent enrolled");
            EnrollResponse::Enrolled(e)
        }
        Err(r) => {
            crate::metrics::enrollment(reject_label(r.code));
            info!(%peer, name = %printable(&req.name), code = ?r.code, reason = %r.message, "enrollment refused");
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

/// Checks an enrollment request against the token and the store and, if it is allowed,
/// finds or creates the resource and issues the agent's certificate.
fn decide_enrollment(relay: &Relay, req: &EnrollRequest) -> Result<Enrollment, Rejection> {
    if req.version != PROTOCOL_VERSION {
        return Err(reject(
            RejectCode::UnsupportedVersion,
            format!(
                "agent protocol version {} is not supported by this relay (it speaks {PROTOCOL_VERSION}); upgrade the agent",
                req.version
            ),
        ));
    }
    let claims: RegistrationClaims = relay.signer.verify(&req.jwt)?;
    let record = relay.store.token(&claims.jti).map_err(internal)?.ok_or_else(|| {
        reject(
            RejectCode::InvalidToken,
            "the registration JWT is not known to this relay; ask its operator for a new one",
        )
    })?;
    if record.revoked_at.is_some() {
        let hint = match &claims.resource_id {
            Some(r) => format!("sluice resources registration-jwt --resource-id {r}"),
            None => "sluice resources registration-jwt".to_owned(),
        };
        return Err(reject(
            RejectCode::RevokedToken,
            format!(
                "the registration JWT was revoked (by `sluice tokens revoke`, or because the resource it was issued for \
                 was rotated or deleted); ask the operator for a new one: {hint}"
            ),
        ));
    }
    if let Some(cid) = &claims.customer_id
        && relay.store.customer(cid).map_err(internal)?.is_none()
    {
        return Err(reject(RejectCode::Forbidden, format!("customer {cid} of this registration JWT no longer exists")));
    }

    let resource: Resource = match &claims.resource_id {
        Some(rid) => {
            let r = relay.store.resource(rid).map_err(internal)?.ok_or_else(|| {
                reject(RejectCode::RevokedToken, format!("resource {rid} of this registration JWT was deleted"))
            })?;
            if r.customer_id != claims.customer_id {
                return Err(reject(
                    RejectCode::Forbidden,
                    format!(
                        "this registration JWT is for another customer than resource {rid}'s; it cannot enroll agents for it"
                    ),
                ));
            }
            if claims.generation != Some(r.generation) {
                return Err(reject(
                    RejectCode::RevokedToken,
                    format!(
                        "the registration JWT is of an older key generation of resource {rid} (rotated); ask the operator for a new one: sluice resources registration-jwt --resource-id {rid}"
                    ),
                ));
            }
            if !req.name.trim().is_empty() && req.name.trim() != r.name {
                return Err(reject(
                    RejectCode::BadRequest,
                    format!(
                        "NAME {:?} does not match resource {rid} ({:?}) this registration JWT was issued for; set NAME={} or use a customer JWT",
                        printable(&req.name),
                        r.name,
                        r.name
                    ),
                ));
            }
            r
        }
        None => {
            let name = validate_resource_name(&req.name)
                .map_err(|m| reject(RejectCode::BadRequest, format!("NAME is not valid: {m}")))?;
            let cid = claims.customer_id.as_deref();
            match relay.store.resource_by_name(cid, name).map_err(internal)? {
                Some(r) => r,
                None => {
                    let r = relay
                        .store
                        .create_resource(&new_id("res"), cid, name, relay.config.resource_ports.clone(), unix_now())
                        .map_err(|e| match e {
                            StoreError::Exhausted(m) => reject(RejectCode::Unavailable, m),
                            StoreError::Conflict(_) => {
                                reject(RejectCode::Unavailable, "the resource was being created concurrently; retry")
                            }
                            e => internal(e),
                        })?;
                    info!(resource = %r.id, name = %r.name, endpoint = %relay.endpoint(r.port), "resource created");
                    r
                }
            }
        }
    };

    // A customer or org-level JWT that enrolled agents of this resource before it was
    // rotated may have leaked with them: it stays valid for other resources only.
    if relay.store.token_use_revoked_at(&claims.jti, &resource.id).map_err(internal)?.is_some() {
        let rid = &resource.id;
        return Err(reject(
            RejectCode::RevokedToken,
            format!(
                "this registration JWT enrolled agents of resource {rid} ({:?}) before {rid} was rotated or deleted; \
                 it can no longer enroll agents for {rid} (it stays valid for other resources); issue a new one: \
                 sluice resources registration-jwt --resource-id {rid}",
                resource.name
            ),
        ));
    }

    let who =
        AgentIdentity { agent_id: new_id("agt"), resource_id: resource.id.clone(), generation: resource.generation };
    let cert_pem = relay
        .identity
        .sign_agent_csr(&req.csr_pem, &who, relay.config.agent_cert_lifetime)
        .map_err(|m| reject(RejectCode::BadRequest, m))?;
    relay.store.mark_token_used(&claims.jti, &resource.id).map_err(internal)?;
    relay
        .store
        .add_agent(&AgentRecord {
            id: who.agent_id.clone(),
            resource_id: resource.id.clone(),
            generation: resource.generation,
            hostname: req.hostname.clone(),
            enrolled_at: unix_now(),
            jti: Some(claims.jti.clone()),
        })
        .map_err(internal)?;
    Ok(Enrollment {
        resource_id: resource.id,
        resource_name: resource.name,
        customer_id: resource.customer_id,
        agent_id: who.agent_id,
        generation: who.generation,
        cert_pem,
        ca_pem: relay.identity.ca_pem.clone(),
    })
}

/// Checks a client certificate's identity against the store: the resource must exist
/// and the certificate must be of its current key generation.
fn check_identity(relay: &Relay, who: &AgentIdentity) -> Result<Resource, Rejection> {
    let r = relay.store.resource(&who.resource_id).map_err(internal)?.ok_or_else(|| {
        reject(
            RejectCode::RevokedCertificate,
            format!("resource {} was deleted; this agent's certificate is no longer valid", who.resource_id),
        )
    })?;
    if who.generation != r.generation {
        return Err(reject(
            RejectCode::RevokedCertificate,
            format!(
                "this agent's certificate is of key generation {} but resource {} was rotated to generation {}; the agent needs a new registration JWT",
                who.generation, r.id, r.generation
            ),
        ));
    }
    Ok(r)
}

// === Control sessions ===

async fn control(relay: Arc<Relay>, mut tls: TlsStream<TunnelSocket>, who: AgentIdentity, peer: SocketAddr) {
    let resource = match check_identity(&relay, &who) {
        Ok(r) => r,
        Err(r) => {
            info!(reason = %r.message, "control session refused");
            let _ = wire::write_frame(&mut tls, &RelayMsg::Rejected(r)).await;
            let _ = tls.shutdown().await;
            return;
        }
    };
    let info = match tokio::time::timeout(HANDSHAKE_TIMEOUT, wire::read_frame::<_, AgentMsg>(&mut tls)).await {
        Ok(Ok(AgentMsg::Hello { version, agent_version, hostname, capabilities })) => {
            if version != PROTOCOL_VERSION {
                let r = reject(
                    RejectCode::UnsupportedVersion,
                    format!("agent protocol version {version} is not supported (relay speaks {PROTOCOL_VERSION})"),
                );
                let _ = wire::write_frame(&mut tls, &RelayMsg::Rejected(r)).await;
                return;
            }
            SessionInfo {
                hostname: printable(&hostname),
                agent_version: printable(&agent_version),
                peer: Some(peer),
                capabilities,
            }
        }
        Ok(Ok(other)) => return warn!(?other, "control session did not start with hello"),
        Ok(Err(e)) => return debug!(error = %e, "control session closed before hello"),
        Err(_) => return debug!("control session hello timed out"),
    };
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<RelayMsg>();
    let session = Arc::new(AgentSession::new(
        new_id("ses"),
        who.agent_id.clone(),
        resource.id.clone(),
        who.generation,
        info,
        out_tx,
    ));
    let welcome = RelayMsg::Welcome {
        version: PROTOCOL_VERSION,
        session_id: session.id.clone(),
        resource_id: resource.id.clone(),
        resource_name: resource.name.clone(),
        heartbeat_secs: relay.config.heartbeat.as_secs().max(1),
        pool_size: relay.config.pool_size,
        capabilities: Capabilities { renew: true, service_status: true, ..Default::default() },
    };
    if wire::write_frame(&mut tls, &welcome).await.is_err() {
        return;
    }
    let now = unix_now();
    let _ = relay.store.mark_agent_connected(&who.agent_id, now);
    let _ = relay.store.touch_resource(&resource.id, now);
    if relay.registry.add(session.clone()) {
        crate::resource_port::start(relay.clone(), resource.id.clone(), resource.name.clone(), resource.port);
    }
    let info = &session.info;
    info!(
        session = %session.id, name = %resource.name, host = %info.hostname, agent_version = %info.agent_version,
        ktls = info.capabilities.ktls, ebpf = info.capabilities.ebpf, "agent session up"
    );
    let twins = relay.registry.twins_of(&session);
    if !twins.is_empty() {
        warn!(
            agent = %who.agent_id,
            other_sessions = %twins.iter().map(|t| format!("{} from {} ({})", t.id, t.hostname, t.info.peer.map(|p| p.to_string()).unwrap_or_default())).collect::<Vec<_>>().join(", "),
            "two live sessions share one agent identity: the agent's STATE_DIR was probably copied to a second \
             host or container; give each agent its own STATE_DIR (volume) so each has its own identity"
        );
    }

    let (mut rd, mut wr) = tokio::io::split(tls);
    let heartbeat = relay.config.heartbeat.max(Duration::from_secs(1));
    let pong_tx = session.clone();
    let stats_relay = relay.clone();
    let agent_id = who.agent_id.clone();
    let renew_who = who.clone();
    crate::metrics::agent_sessions(&resource.id, 1.0);
    // Reader: answers pings; any frame proves the agent alive.
    let reader = async move {
        loop {
            match tokio::time::timeout(heartbeat * 3, wire::read_frame::<_, AgentMsg>(&mut rd)).await {
                Err(_) => {
                    return format!("no word from the agent for {:?}: declared dead", heartbeat * 3);
                }
                Ok(Err(e)) => return format!("control connection ended: {e}"),
                Ok(Ok(AgentMsg::Ping { seq })) => {
                    pong_tx.send(RelayMsg::Pong { seq });
                }
                Ok(Ok(AgentMsg::Pong { .. })) => {}
                Ok(Ok(AgentMsg::StreamStats { streams })) => stats_relay.streams.report(&agent_id, &streams),
                Ok(Ok(AgentMsg::RenewCertificate { csr_pem })) => {
                    pong_tx.send(renew(&stats_relay, &renew_who, &csr_pem));
                }
                Ok(Ok(AgentMsg::ServiceStatus { reachable, error })) => {
                    let error = error.map(|e| printable(&e));
                    if reachable {
                        info!("agent reports the private service reachable");
                    } else {
                        warn!(error = error.as_deref().unwrap_or("-"), "agent reports the private service unreachable");
                    }
                    *pong_tx.service.lock() = ServiceReport { reachable: Some(reachable), error, at: unix_now() };
                }
                Ok(Ok(AgentMsg::Hello { .. })) => return "agent sent a second hello".into(),
            }
        }
    };
    // Writer: relays queued messages and pings.
    let closed = session.closed.clone();
    let shutdown = relay.shutdown.clone();
    let writer = async move {
        let mut tick = tokio::time::interval(heartbeat);
        tick.tick().await;
        let mut seq = 0u64;
        loop {
            let msg = tokio::select! {
                m = out_rx.recv() => match m { Some(m) => m, None => return "session closed".to_owned() },
                _ = tick.tick() => { seq += 1; RelayMsg::Ping { seq } }
                _ = closed.cancelled() => {
                    // Flush a pending rejection (revocation) before closing.
                    while let Ok(m) = out_rx.try_recv() { let _ = wire::write_frame(&mut wr, &m).await; }
                    let _ = wr.shutdown().await;
                    return "session closed by the relay".to_owned();
                }
                _ = shutdown.cancelled() => { let _ = wr.shutdown().await; return "relay shutting down".to_owned() }
            };
            if let Err(e) = wire::write_frame(&mut wr, &msg).await {
                return format!("writing to the agent failed: {e}");
            }
        }
    };
    let why = tokio::select! { w = reader => w, w = writer => w };
    relay.registry.remove(&session);
    crate::metrics::agent_sessions(&resource.id, -1.0);
    let _ = relay.store.touch_resource(&resource.id, unix_now());
    info!(session = %session.id, reason = %why, "agent session down");
}

/// Answers a renewal request on a control session: a new certificate for the same
/// identity, if that identity is still current (resource exists, generation not rotated).
fn renew(relay: &Relay, who: &AgentIdentity, csr_pem: &str) -> RelayMsg {
    let signed = check_identity(relay, who).and_then(|_| {
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

//! The control session's own conversation: hello → welcome (with a typed reading of how
//! it can fail), heartbeats by the shared [`Heartbeat`] rule, and certificate renewal.

use std::sync::Arc;
use std::time::Duration;

use rustls::AlertDescription;
use sluice_proto::wire::{self, AgentMsg, Capabilities, PROTOCOL_VERSION, RejectCode, RelayMsg, WireError};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tracing::{info, warn};

use super::SessionEnd;
use super::pool::{Pool, Tunnel};
use crate::enroll::{self, Identity};

/// How long the relay may take to answer the hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(15);

/// What the relay's welcome says about the session.
#[derive(Debug, Clone)]
pub struct Welcome {
    pub session_id: sluice_proto::identity::SessionId,
    pub heartbeat: Duration,
    pub pool_size: u32,
    /// What the relay supports beyond the baseline.
    pub relay: Capabilities,
    /// The relay's id in its cluster (empty from older relays).
    pub relay_id: String,
    /// The cluster's active relays (empty from older relays).
    pub relays: Vec<sluice_proto::wire::RelayPeer>,
}

/// Sends the hello and reads the welcome.
pub async fn hello(tls: &mut Tunnel, hostname: String, capabilities: Capabilities) -> Result<Welcome, SessionEnd> {
    let hello = AgentMsg::Hello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname,
        capabilities,
    };
    wire::write_frame(tls, &hello).await.map_err(|e| SessionEnd::Lost(format!("sending hello: {e}")))?;
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, wire::read_frame::<_, RelayMsg>(tls)).await;
    match welcome {
        Ok(Ok(RelayMsg::Welcome { session_id, heartbeat_secs, pool_size, capabilities, relay_id, relays, .. })) => {
            Ok(Welcome {
                session_id,
                heartbeat: Duration::from_secs(heartbeat_secs.max(1)),
                pool_size,
                relay: capabilities,
                relay_id,
                relays,
            })
        }
        Ok(Ok(RelayMsg::Rejected(r))) if r.code == RejectCode::RevokedCertificate => {
            Err(SessionEnd::Revoked(r.message))
        }
        Ok(Ok(RelayMsg::Rejected(r))) => Err(SessionEnd::Lost(format!("the relay refused the session: {}", r.message))),
        Ok(Ok(other)) => Err(SessionEnd::Lost(format!("unexpected first message from the relay: {other:?}"))),
        Ok(Err(e)) => Err(welcome_failure(&e)),
        Err(_) => Err(SessionEnd::Lost(format!("the relay did not answer the hello in {WELCOME_TIMEOUT:?}"))),
    }
}

/// The TLS alert the relay sent, if `e` is one.
fn received_alert(e: &WireError) -> Option<AlertDescription> {
    let WireError::Io(io) = e else { return None };
    match io.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

/// Why the welcome did not come. In TLS 1.3 the relay checks the agent's certificate
/// after the agent's side of the handshake is done, so a refusal arrives as an alert on
/// the first read. Only alerts about the certificate mean "enroll again"; anything else
/// (an internal error, a reset, a relay restarting) is a lost connection to retry with
/// the same identity.
pub fn welcome_failure(e: &WireError) -> SessionEnd {
    use AlertDescription as A;
    match received_alert(e) {
        Some(
            a @ (A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::CertificateRequired),
        ) => SessionEnd::Revoked(format!("the relay refused this agent's certificate (TLS alert {a:?})")),
        Some(a) => SessionEnd::Lost(format!("the relay ended the handshake with TLS alert {a:?}; retrying")),
        None => SessionEnd::Lost(format!("waiting for the relay's welcome: {e}")),
    }
}

/// Renews the agent's certificate over the control session two thirds into its life,
/// again and again while the session lasts; the registration JWT is not needed. Returns
/// only when the session must end: the relay cannot renew (an older relay), or it says
/// the certificate is revoked. A failed attempt is retried (sooner as expiry nears).
pub(super) async fn renew_certificate(
    state_dir: std::path::PathBuf,
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
                match enroll::save_renewed(&state_dir, &id, cert_pem) {
                    Ok(new) => match super::client_config(&new, wire::ALPN_DATA) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(a: AlertDescription) -> WireError {
        WireError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, rustls::Error::AlertReceived(a)))
    }

    #[test]
    fn only_certificate_alerts_at_welcome_mean_enroll_again() {
        for a in [AlertDescription::BadCertificate, AlertDescription::CertificateExpired, AlertDescription::UnknownCA] {
            assert!(matches!(welcome_failure(&alert(a)), SessionEnd::Revoked(_)), "{a:?}");
        }
        for a in [AlertDescription::InternalError, AlertDescription::HandshakeFailure, AlertDescription::DecodeError] {
            assert!(matches!(welcome_failure(&alert(a)), SessionEnd::Lost(_)), "{a:?} keeps the identity");
        }
        let reset = WireError::Io(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer: alert"));
        assert!(matches!(welcome_failure(&reset), SessionEnd::Lost(_)), "a message mentioning an alert is not one");
        assert!(matches!(welcome_failure(&WireError::Closed), SessionEnd::Lost(_)));
    }
}

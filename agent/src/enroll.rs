//! Enrollment and the agent's saved identity.
//!
//! The agent makes its private key locally (it never leaves the host), sends the
//! registration JWT and a CSR to the relay over TLS that trusts only the CA pinned in the
//! JWT, and saves the client certificate it gets back in `STATE_DIR` (key 0600). On later
//! starts it reuses the saved identity as long as it was made with the same JWT and is
//! not close to expiry; otherwise (or if the state was lost) it enrolls again.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sluice_proto::identity::unix_now;
use sluice_proto::tls;
use sluice_proto::wire::{self, EnrollRequest, EnrollResponse, PROTOCOL_VERSION, Rejection};
use tokio_rustls::TlsConnector;

use crate::config::AgentConfig;

const KEY_FILE: &str = "agent.key";
const CERT_FILE: &str = "agent.pem";
const CA_FILE: &str = "ca.pem";
const META_FILE: &str = "enrollment.json";

/// What the agent remembers about its enrollment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EnrollmentMeta {
    pub resource_id: sluice_proto::identity::ResourceId,
    pub resource_name: String,
    pub agent_id: sluice_proto::identity::AgentId,
    pub generation: u64,
    /// `jti` of the registration JWT used; a different JWT means "enroll again".
    pub jti: String,
    pub relay_url: String,
    /// Certificate expiry (seconds since the epoch).
    pub not_after: u64,
    pub not_before: u64,
}

/// The agent's identity: key, certificate, the relay's CA, and what they are for. Its
/// `Debug` leaves the private key out.
#[derive(Clone)]
pub struct Identity {
    pub meta: EnrollmentMeta,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .field("key_pem", &sluice_runtime::Secret::new(()))
            .field("cert_pem", &self.cert_pem)
            .field("ca_pem", &self.ca_pem)
            .finish()
    }
}

impl Identity {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        tls::key_from_pem(&self.key_pem).expect("validated at load")
    }
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        tls::certs_from_pem(&self.cert_pem).expect("validated at load")
    }
    pub fn ca(&self) -> CertificateDer<'static> {
        tls::certs_from_pem(&self.ca_pem).expect("validated at load").remove(0)
    }

    /// When to renew: two thirds into the certificate's life.
    pub fn renew_at(&self) -> u64 {
        let life = self.meta.not_after.saturating_sub(self.meta.not_before);
        self.meta.not_before + life * 2 / 3
    }
}

/// Why enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The relay refused; `rejection.code` says whether retrying can help.
    #[error("the relay refused enrollment: {0}")]
    Rejected(Rejection),
    /// The relay could not be reached or the exchange broke; retry later.
    #[error("{0}")]
    Unreachable(String),
    /// The relay is not the one the JWT pins (or TLS failed for another reason that a
    /// retry will not fix).
    #[error("{0}")]
    Trust(String),
    #[error("saving the agent's identity in the state directory failed: {0}")]
    State(String),
}

/// Why the saved identity cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NoIdentity {
    /// Nothing (complete) is saved: first start, or the state was lost.
    #[error("STATE_DIR holds no identity yet")]
    Missing,
    /// The saved identity was made for another resource, JWT or relay than the agent is
    /// configured for now (NAME changed, a state volume copied to another service, …).
    #[error("{0}")]
    Mismatch(String),
    /// The saved files are unreadable, or the certificate has expired.
    #[error("{0}")]
    Unusable(String),
}

/// Seconds before its expiry at which a saved certificate is no longer used (or a tenth
/// of its life, if that is less).
const EXPIRY_MARGIN_SECS: u64 = 30;

/// The saved identity in `cfg.state_dir` if it is complete, unexpired and made for what
/// `cfg` asks for: the same relay, the same resource (NAME, or the resource of a
/// resource JWT) and the same registration JWT. An expired JWT does not matter here: the
/// certificate is the agent's identity from enrollment on.
pub fn load(cfg: &AgentConfig) -> Result<Identity, NoIdentity> {
    let dir = &cfg.state_dir;
    let read = |f: &str| fs::read_to_string(dir.join(f)).map_err(|_| NoIdentity::Missing);
    let meta: EnrollmentMeta = serde_json::from_str(&read(META_FILE)?)
        .map_err(|e| NoIdentity::Unusable(format!("{META_FILE} in STATE_DIR is not readable: {e}")))?;
    let id = Identity { key_pem: read(KEY_FILE)?, cert_pem: read(CERT_FILE)?, ca_pem: read(CA_FILE)?, meta };
    if tls::key_from_pem(&id.key_pem).is_err()
        || tls::certs_from_pem(&id.cert_pem).is_err()
        || tls::certs_from_pem(&id.ca_pem).is_err()
    {
        return Err(NoIdentity::Unusable("the saved key or certificates are not readable PEM".into()));
    }
    let m = &id.meta;
    let made_for = format!("resource {} ({:?}) at {}", m.resource_id, m.resource_name, m.relay_url);
    if m.relay_url != cfg.relay_url.to_string() {
        return Err(NoIdentity::Mismatch(format!(
            "the saved identity was made for {made_for}, but this agent is now configured for the relay {}",
            cfg.relay_url
        )));
    }
    if !cfg.name.is_empty() && cfg.name != m.resource_name {
        return Err(NoIdentity::Mismatch(format!(
            "the saved identity was made for {made_for}, but NAME is now {:?}",
            cfg.name
        )));
    }
    if cfg.name.is_empty() && cfg.claims.resource_id.as_deref() != Some(m.resource_id.as_str()) {
        return Err(NoIdentity::Mismatch(format!(
            "the saved identity was made for {made_for}, but REGISTRATION_JWT is for resource {}",
            cfg.claims.resource_id.as_deref().unwrap_or("-")
        )));
    }
    if m.jti != cfg.claims.jti {
        return Err(NoIdentity::Mismatch(format!(
            "the saved identity was made with another registration JWT ({}) than REGISTRATION_JWT ({})",
            m.jti, cfg.claims.jti
        )));
    }
    let (not_before, not_after) = cert_validity(&id.cert_pem)
        .ok_or_else(|| NoIdentity::Unusable("the saved certificate is not readable".into()))?;
    let margin = EXPIRY_MARGIN_SECS.min(not_after.saturating_sub(not_before) / 10);
    if unix_now() + margin >= not_after {
        return Err(NoIdentity::Unusable(format!(
            "the saved certificate expired (or is about to) at {not_after} (seconds since the epoch)"
        )));
    }
    Ok(id)
}

/// A CSR for the identity's key, for renewal: the key stays on the host and stays the same.
pub fn renewal_csr(id: &Identity) -> Result<String, String> {
    let key = KeyPair::from_pem(&id.key_pem).map_err(|e| format!("reading the saved key: {e}"))?;
    CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("making the renewal CSR: {e}"))
}

/// Checks a renewed certificate (readable, for the same agent, resource and generation)
/// and saves it in place of the old one. Returns the updated identity.
pub fn save_renewed(dir: &Path, id: &Identity, cert_pem: String) -> Result<Identity, String> {
    let der = tls::certs_from_pem(&cert_pem)
        .ok()
        .and_then(|mut c| (!c.is_empty()).then(|| c.remove(0)))
        .ok_or("the relay sent an unreadable certificate")?;
    let who = sluice_proto::identity::AgentIdentity::from_cert_der(&der)
        .ok_or("the renewed certificate has no agent identity")?;
    if who.agent_id != id.meta.agent_id
        || who.resource_id != id.meta.resource_id
        || who.generation != id.meta.generation
    {
        return Err(format!("the renewed certificate is for {}, not for this agent", who.to_uri()));
    }
    let (not_before, not_after) = cert_validity(&cert_pem).ok_or("the renewed certificate has no validity")?;
    let mut new = id.clone();
    new.cert_pem = cert_pem;
    new.meta.not_before = not_before;
    new.meta.not_after = not_after;
    // The key is unchanged: writing the certificate, then the metadata, keeps every
    // intermediate state usable (metadata validity is informational; load reads the cert).
    write_private(&dir.join(CERT_FILE), &new.cert_pem).map_err(|e| format!("saving the renewed certificate: {e}"))?;
    write_private(&dir.join(META_FILE), &serde_json::to_string_pretty(&new.meta).expect("serializable"))
        .map_err(|e| format!("saving the enrollment metadata: {e}"))?;
    Ok(new)
}

fn write_private(path: &PathBuf, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

fn cert_validity(pem: &str) -> Option<(u64, u64)> {
    let der = tls::certs_from_pem(pem).ok()?.remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp().max(0) as u64, v.not_after.timestamp().max(0) as u64))
}

/// Enrolls with the relay and saves the new identity.
pub async fn enroll(cfg: &AgentConfig) -> Result<Identity, EnrollError> {
    let key = KeyPair::generate().map_err(|e| EnrollError::State(format!("generating a key: {e}")))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrollError::State(format!("making the CSR: {e}")))?;
    let client_cfg = tls::agent_enroll_config(&cfg.claims.ca_pin).map_err(|e| EnrollError::Trust(e.to_string()))?;
    let server_name = tls::server_name_of(&cfg.relay_url.host).map_err(|e| EnrollError::Trust(e.to_string()))?;
    let authority = cfg.relay_url.authority();

    let tcp = crate::egress::connect_relay(&authority, cfg.proxy())
        .await
        .map_err(|e| EnrollError::Unreachable(e.to_string()))?;
    let handshake = TlsConnector::from(Arc::new(client_cfg)).connect(server_name, tcp);
    let limit = crate::session::pool::RELAY_HANDSHAKE_TIMEOUT;
    let handshake = tokio::time::timeout(limit, handshake).await.map_err(|_| {
        EnrollError::Unreachable(format!(
            "the TLS handshake with the relay at {authority} timed out after {} s: something accepted the \
             connection but does not speak TLS to us (a proxy or firewall that holds connections open, or \
             another service on that port); check SLUICE_URL or the registration JWT's relay address, and \
             any proxy in between (`sluice-agent doctor` tests each step)",
            limit.as_secs()
        ))
    })?;
    let mut tls = handshake.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("pinned") || msg.contains("certificate") {
            EnrollError::Trust(format!("the relay at {authority} is not trusted: {msg}"))
        } else {
            EnrollError::Unreachable(format!("TLS with the relay at {authority} failed: {msg}"))
        }
    })?;
    let req = EnrollRequest {
        version: PROTOCOL_VERSION,
        jwt: cfg.registration_jwt().to_owned(),
        name: cfg.name.clone(),
        csr_pem: csr,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: crate::hostname(),
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), async {
        wire::write_frame(&mut tls, &req).await?;
        wire::read_frame::<_, EnrollResponse>(&mut tls).await
    })
    .await
    .map_err(|_| EnrollError::Unreachable("the relay did not answer the enrollment in 30 s".into()))?
    .map_err(|e| EnrollError::Unreachable(format!("enrollment exchange with the relay failed: {e}")))?;
    let e = match answer {
        EnrollResponse::Enrolled(e) => e,
        EnrollResponse::Rejected(r) => return Err(EnrollError::Rejected(r)),
    };
    let (not_before, not_after) = cert_validity(&e.cert_pem)
        .ok_or_else(|| EnrollError::Trust("the relay sent an unreadable certificate".into()))?;
    let id = Identity {
        meta: EnrollmentMeta {
            resource_id: e.resource_id,
            resource_name: e.resource_name,
            agent_id: e.agent_id,
            generation: e.generation,
            jti: cfg.claims.jti.clone(),
            relay_url: cfg.relay_url.to_string(),
            not_after,
            not_before,
        },
        key_pem: key.serialize_pem(),
        cert_pem: e.cert_pem,
        ca_pem: e.ca_pem,
    };
    save(&cfg.state_dir, &id).map_err(|e| EnrollError::State(e.to_string()))?;
    Ok(id)
}

fn save(dir: &Path, id: &Identity) -> std::io::Result<()> {
    write_private(&dir.join(KEY_FILE), &id.key_pem)?;
    write_private(&dir.join(CERT_FILE), &id.cert_pem)?;
    write_private(&dir.join(CA_FILE), &id.ca_pem)?;
    write_private(&dir.join(META_FILE), &serde_json::to_string_pretty(&id.meta).expect("serializable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_leaves_the_private_key_out() {
        let id = Identity {
            meta: EnrollmentMeta {
                resource_id: "res_1".into(),
                resource_name: "db".into(),
                agent_id: "agt_1".into(),
                generation: 1,
                jti: "j".into(),
                relay_url: "https://relay:443".into(),
                not_after: 2,
                not_before: 1,
            },
            key_pem: "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n".into(),
            cert_pem: "cert".into(),
            ca_pem: "ca".into(),
        };
        let shown = format!("{id:?}");
        assert!(!shown.contains("c2VjcmV0") && shown.contains("redacted") && shown.contains("cert"), "{shown}");
    }
}

//! TLS configurations for both ends of the tunnel, in one place so both agree.
//!
//! Every configuration is TLS 1.3 only, prefers AES-128-GCM (the cheapest AEAD with
//! AES-NI, and one the kernel's TLS offload supports) and allows secret extraction
//! (what kernel TLS offload needs).
//!
//! Resumption, for data connections only: the relay hands out TLS 1.3 session tickets
//! (stateless, encrypted under a key that lives only in its memory and rotates every
//! 6 hours) on mutually authenticated connections, and the agent's data configuration
//! ([`ALPN_DATA`]) resumes with them. A resumed handshake skips both certificate
//! signatures and chain checks — two thirds of a handshake's public-key work — but
//! still runs a fresh (EC)DHE exchange (rustls resumes with `psk_dhe_ke` only), so each
//! data connection keeps forward secrecy, and never sends 0-RTT data. The relay still
//! learns the agent's certificate from the ticket, and a data connection is accepted
//! only for a live control session of that same agent and key generation — control
//! sessions always run a full handshake — so revocation and renewal work as before.
//!
//! Trust: the relay runs its own CA. Agents trust exactly that CA: on first contact by
//! its SHA-256 pin from the registration JWT ([`agent_enroll_config`]), afterwards by
//! the CA certificate saved at enrollment ([`agent_session_config`]). The relay accepts
//! control and data connections only with a client certificate issued by its CA
//! ([`relay_agent_config`]).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CipherSuiteCommon, ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig, SignatureScheme,
    SupportedCipherSuite, Tls13CipherSuite,
};

use crate::identity::ca_pin;
use crate::wire::{ALPN_CONTROL, ALPN_DATA, ALPN_ENROLL};

/// The crypto provider: aws-lc-rs with TLS 1.3 suites, AES-128-GCM first.
///
/// With [`KEY_UPDATE_RECORDS_ENV`] set, the suites' confidentiality limits are lowered
/// to its value (see there).
pub fn provider() -> Arc<CryptoProvider> {
    let mut p = aws_lc_rs::default_provider();
    p.cipher_suites = suites().to_vec();
    Arc::new(p)
}

/// Testing knob: `SLUICE_TLS_KEY_UPDATE_RECORDS=N` makes this process's user-space TLS
/// send a KeyUpdate (asking the peer for one back) after every N records it sends on one
/// key, instead of at the cipher's confidentiality limit (2^24 records for AES-GCM:
/// 256 GiB in full records). It lets the key-update path of kernel TLS
/// (docs/ktls.md, "Key updates") be exercised with megabytes. Not for production.
pub const KEY_UPDATE_RECORDS_ENV: &str = "SLUICE_TLS_KEY_UPDATE_RECORDS";

/// The lowered record limit from [`KEY_UPDATE_RECORDS_ENV`], if set to a positive number
/// (read once per process: streams ask for it as they start).
pub fn key_update_records() -> Option<u64> {
    static RECORDS: OnceLock<Option<u64>> = OnceLock::new();
    *RECORDS.get_or_init(|| std::env::var(KEY_UPDATE_RECORDS_ENV).ok()?.trim().parse().ok().filter(|n| *n > 0))
}

/// The TLS 1.3 suites in preference order, with limits lowered by the testing knob
/// (decided once per process: the suites must live for the whole run).
fn suites() -> &'static [SupportedCipherSuite] {
    use aws_lc_rs::cipher_suite::*;
    static SUITES: OnceLock<Vec<SupportedCipherSuite>> = OnceLock::new();
    SUITES.get_or_init(|| {
        let stock = [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256];
        match key_update_records() {
            None => stock.to_vec(),
            Some(limit) => stock.iter().map(|s| with_record_limit(*s, limit)).collect(),
        }
    })
}

/// `suite` with its confidentiality limit lowered to `limit` records (never raised).
fn with_record_limit(suite: SupportedCipherSuite, limit: u64) -> SupportedCipherSuite {
    match suite {
        SupportedCipherSuite::Tls13(s) => {
            let common =
                CipherSuiteCommon { confidentiality_limit: limit.min(s.common.confidentiality_limit), ..s.common };
            // Leaked once per suite and process (see `suites`).
            SupportedCipherSuite::Tls13(Box::leak(Box::new(Tls13CipherSuite { common, ..*s })))
        }
        other => other,
    }
}

/// Parses every certificate in a PEM text.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| Error::General(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(Error::General("no certificate in PEM".into()));
    }
    Ok(certs)
}

/// Parses a private key (PKCS#8, SEC1 or PKCS#1) from PEM.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| Error::General(format!("bad private key PEM: {e}")))
}

fn server_base(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<ServerConfig, rustls::WantsVerifier>, Error> {
    ServerConfig::builder_with_provider(provider).with_protocol_versions(&[&rustls::version::TLS13])
}

fn tune_server(mut c: ServerConfig, alpn: &[&[u8]]) -> ServerConfig {
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    c.send_tls13_tickets = 0;
    c.enable_secret_extraction = true;
    c
}

/// Session tickets a relay sends after each agent handshake: one for the data
/// connection that replaces this one, one spare for a burst.
pub const TICKETS_PER_HANDSHAKE: usize = 2;
/// Tickets an agent keeps (rustls keeps at most 8 per relay name).
const AGENT_TICKET_CACHE: usize = 64;

/// The relay's configuration for enrollment connections: server-authenticated only.
pub fn relay_enroll_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, Error> {
    let c = server_base(provider())?.with_no_client_auth().with_single_cert(chain, key)?;
    Ok(tune_server(c, &[ALPN_ENROLL]))
}

/// The relay's configuration for control and data connections: a client certificate
/// issued by `ca` is required.
pub fn relay_agent_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
) -> Result<ServerConfig, Error> {
    let p = provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), p.clone())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))?;
    let c = server_base(p)?.with_client_cert_verifier(verifier).with_single_cert(chain, key)?;
    let mut c = tune_server(c, &[ALPN_CONTROL, ALPN_DATA]);
    c.ticketer = aws_lc_rs::Ticketer::new()?;
    c.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(c)
}

fn tune_client(mut c: ClientConfig, alpn: &[u8]) -> ClientConfig {
    c.alpn_protocols = vec![alpn.to_vec()];
    c.resumption = Resumption::disabled();
    c.enable_secret_extraction = true;
    c
}

/// The agent's configuration for enrollment: trusts a server chain only if it contains
/// the CA whose SHA-256 is `pin` and the server certificate verifies against that CA.
pub fn agent_enroll_config(pin: &str) -> Result<ClientConfig, Error> {
    let p = provider();
    let verifier = Arc::new(PinnedCaVerifier { pin: pin.to_ascii_lowercase(), provider: p.clone() });
    let c = ClientConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(tune_client(c, ALPN_ENROLL))
}

/// The agent's mutual-TLS configuration for a control (`alpn` = [`ALPN_CONTROL`]) or
/// data ([`ALPN_DATA`]) connection.
pub fn agent_session_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<ClientConfig, Error> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let c = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let mut c = tune_client(c, alpn);
    if alpn == ALPN_DATA {
        c.resumption = Resumption::in_memory_sessions(AGENT_TICKET_CACHE);
    }
    Ok(c)
}

/// Verifies a relay's certificate against the CA pinned in a registration JWT.
#[derive(Debug)]
struct PinnedCaVerifier {
    pin: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let ca = intermediates.iter().find(|c| ca_pin(c) == self.pin).ok_or_else(|| {
            Error::General(
                "the relay's certificate chain does not contain the CA pinned in the registration \
                 JWT: this is not the relay that issued the token (check SLUICE_URL)"
                    .into(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(format!("server verifier: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The host name a URL like `https://host:port` names, as a TLS server name.
pub fn server_name_of(host: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(host.to_owned()).map_err(|_| Error::General(format!("{host:?} is not a valid host name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_limit_is_lowered_never_raised() {
        let stock = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let limit = |s: SupportedCipherSuite| s.tls13().unwrap().common.confidentiality_limit;
        assert_eq!(limit(stock), 1 << 24);
        let lowered = with_record_limit(stock, 256);
        assert_eq!(limit(lowered), 256);
        assert_eq!(lowered.suite(), stock.suite(), "same suite, only the limit differs");
        assert_eq!(limit(with_record_limit(stock, u64::MAX)), 1 << 24);
    }
}

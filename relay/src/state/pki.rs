//! The relay's own identity material in its data directory: the CA that signs agent
//! certificates, the server certificate agents verify, the registration-JWT signing key,
//! and the admin token.
//!
//! Created on first start (files 0600 in a 0700 directory), reused afterwards. The server
//! certificate is re-issued at every start from the CA, so a changed `--public-url` needs
//! no manual step and the CA pin in already-issued JWTs stays valid.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rand::RngCore;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sluice_proto::identity::{AgentIdentity, ca_pin};

use crate::state::data_dir::io_failure;
use time::{Duration, OffsetDateTime};

/// The shortest certificate lifetime the relay accepts (tests shorten it to this range).
pub const MIN_AGENT_CERT_SECS: u64 = 20;

/// File names inside the data directory.
pub mod files {
    pub const CA_CERT: &str = "ca.pem";
    pub const CA_KEY: &str = "ca.key";
    pub const JWT_KEY: &str = "jwt-signing.key";
    pub const ADMIN_TOKEN: &str = "admin-token";
    pub const ADMIN_URL: &str = "admin-url";
    pub const DATABASE: &str = "sluice.db";
    /// Held locked (`flock`) by the running relay: one relay per data directory.
    pub const LOCK: &str = crate::state::data_dir::LOCK_FILE;
}

/// The relay's CA, server certificate and secrets, loaded from the data directory.
pub struct RelayIdentity {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    /// SHA-256 pin of the CA, carried in every registration JWT.
    pub ca_pin: String,
    ca: Issuer<'static, KeyPair>,
    /// `[server certificate, CA]`: the CA travels in the chain so a new agent can pin it.
    pub server_chain: Vec<CertificateDer<'static>>,
    server_key_der: Vec<u8>,
    /// HMAC key of registration JWTs (only the relay signs and verifies them).
    pub jwt_key: Vec<u8>,
    pub admin_token: String,
    /// True when this start created the identity (the admin token is new).
    pub created: bool,
}

/// Public parts only: the keys, the JWT key and the admin token stay out of logs.
impl std::fmt::Debug for RelayIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = sluice_runtime::Secret::new(());
        f.debug_struct("RelayIdentity")
            .field("ca_pin", &self.ca_pin)
            .field("ca_pem", &self.ca_pem)
            .field("ca_key", &hidden)
            .field("server_key", &hidden)
            .field("jwt_key", &hidden)
            .field("admin_token", &hidden)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

impl RelayIdentity {
    /// Loads the identity from `dir`, creating what is missing. `server_names` are the
    /// DNS names / IP addresses agents may use to reach the relay.
    pub fn load_or_create(dir: &Path, server_names: &[String]) -> Result<Self> {
        ensure_private_dir(dir)?;
        let ca_cert_path = dir.join(files::CA_CERT);
        let ca_key_path = dir.join(files::CA_KEY);
        let created = !ca_cert_path.exists();
        if created {
            if ca_key_path.exists() {
                bail!(
                    "{} exists but {} does not: the data directory is damaged; restore it from backup or \
                     start with an empty --data-dir",
                    ca_key_path.display(),
                    ca_cert_path.display()
                );
            }
            let key = KeyPair::generate().context("generating the CA key")?;
            let mut params = CertificateParams::default();
            params.distinguished_name = dn("Sluice relay CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
            params.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
            let cert = params.self_signed(&key).context("self-signing the CA")?;
            write_secret(&ca_key_path, key.serialize_pem().as_bytes())?;
            write_secret(&ca_cert_path, cert.pem().as_bytes())?;
        }
        let ca_pem = read_secret(&ca_cert_path)?;
        let ca_key = KeyPair::from_pem(&read_secret(&ca_key_path)?)
            .with_context(|| format!("{} is not a valid private key", ca_key_path.display()))?;
        let ca = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
            .with_context(|| format!("{} is not a valid CA certificate", ca_cert_path.display()))?;
        let ca_der = sluice_proto::tls::certs_from_pem(&ca_pem)?.remove(0);

        let jwt_key = load_or_create_secret(&dir.join(files::JWT_KEY), || {
            let mut k = [0u8; 32];
            rand::rng().fill_bytes(&mut k);
            hex::encode(k)
        })?;
        let admin_token_path = dir.join(files::ADMIN_TOKEN);
        let admin_created = !admin_token_path.exists();
        let admin_token = load_or_create_secret(&admin_token_path, || {
            let mut k = [0u8; 24];
            rand::rng().fill_bytes(&mut k);
            format!("sluice_admin_{}", hex::encode(k))
        })?;

        // A fresh server certificate for the names in use now.
        let server_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(server_names.to_vec()).context("server certificate names")?;
        params.distinguished_name = dn("Sluice relay");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        let server_cert = params.signed_by(&server_key, &ca)?;

        Ok(RelayIdentity {
            ca_pin: ca_pin(&ca_der),
            server_chain: vec![server_cert.der().clone(), ca_der.clone()],
            ca_der,
            ca_pem,
            ca,
            server_key_der: server_key.serialize_der(),
            jwt_key: hex::decode(jwt_key.trim()).context("the JWT signing key file is not hex")?,
            admin_token: admin_token.trim().to_owned(),
            created: created || admin_created,
        })
    }

    /// A further server certificate from the relay's CA for `names` (e.g. the admin API
    /// over TLS): the chain (leaf, CA) and its key, valid for a year.
    pub fn issue_server_cert(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec()).context("server certificate names")?;
        params.distinguished_name = dn("Sluice relay admin API");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        params.not_after = OffsetDateTime::now_utc() + Duration::days(365);
        let cert = params.signed_by(&key, &self.ca)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.ca_der.clone()], key))
    }

    /// The server's private key for rustls.
    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    /// Issues an agent client certificate for the public key in `csr_pem`. Only the key is
    /// taken from the CSR: names, usages and validity are the relay's.
    ///
    /// The certificate is valid for `lifetime` from now, backdated by up to five minutes
    /// (a quarter of the lifetime at most) for clocks that run a little behind.
    pub fn sign_agent_csr(
        &self,
        csr_pem: &str,
        who: &AgentIdentity,
        lifetime: std::time::Duration,
    ) -> Result<String, String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| format!("the certificate signing request is not valid: {e}"))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&who.agent_id);
        params.subject_alt_names =
            vec![SanType::URI(Ia5String::try_from(who.to_uri()).map_err(|e| format!("identity URI: {e}"))?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let life = Duration::try_from(lifetime).map_err(|e| format!("certificate lifetime: {e}"))?;
        let now = OffsetDateTime::now_utc();
        let backdate: Duration = life / 4;
        params.not_before = now - backdate.min(Duration::minutes(5));
        params.not_after = now + life;
        let signed = CertificateSigningRequestParams { params, public_key: csr.public_key };
        signed.signed_by(&self.ca).map(|c| c.pem()).map_err(|e| format!("signing the certificate: {e}"))
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Creates `dir` (and parents) if missing and makes it 0700.
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_failure("create the data directory", dir, &e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| io_failure("make private (mode 0700)", dir, &e))?;
    Ok(())
}

/// Writes a secret file atomically with mode 0600. An error names the file, the cause
/// and what to do; a half-written temporary file is removed.
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let written = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_failure("create", &tmp, &e))
        .and_then(|mut f| f.write_all(contents).and_then(|()| f.sync_all()).map_err(|e| io_failure("write", path, &e)))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| io_failure("write", path, &e)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Reads a secret file, refusing one that others can read.
pub fn read_secret(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).map_err(|e| io_failure("read", path, &e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{} is readable by other users (mode {:o}); run `chmod 600 {}`",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        );
    }
    fs::read_to_string(path).map_err(|e| io_failure("read", path, &e))
}

fn load_or_create_secret(path: &Path, make: impl FnOnce() -> String) -> Result<String> {
    if !path.exists() {
        write_secret(path, make().as_bytes())?;
    }
    read_secret(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_created_once_with_private_files_and_signs_csrs() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let names = vec!["localhost".to_owned()];
        let first = RelayIdentity::load_or_create(&data, &names).unwrap();
        assert!(first.created);
        for f in [files::CA_CERT, files::CA_KEY, files::JWT_KEY, files::ADMIN_TOKEN] {
            let mode = fs::metadata(data.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert_eq!(fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);
        let second = RelayIdentity::load_or_create(&data, &names).unwrap();
        assert!(!second.created);
        assert_eq!(first.ca_pin, second.ca_pin);
        assert_eq!(first.admin_token, second.admin_token);
        let shown = format!("{second:?}");
        let key_b64 = fs::read_to_string(data.join(files::CA_KEY)).unwrap().lines().nth(1).unwrap().to_owned();
        for secret in [second.admin_token.as_str(), &hex::encode(&second.jwt_key), &key_b64] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(shown.contains(&second.ca_pin) && shown.contains("redacted"), "{shown}");

        let agent_key = KeyPair::generate().unwrap();
        let csr = CertificateParams::default().serialize_request(&agent_key).unwrap().pem().unwrap();
        let who = AgentIdentity { agent_id: "agt_x".into(), resource_id: "res_y".into(), generation: 4 };
        let pem = second.sign_agent_csr(&csr, &who, std::time::Duration::from_secs(3600)).unwrap();
        let der = sluice_proto::tls::certs_from_pem(&pem).unwrap().remove(0);
        assert_eq!(AgentIdentity::from_cert_der(&der), Some(who));
        assert!(
            second
                .sign_agent_csr(
                    "not a csr",
                    &AgentIdentity::from_uri("urn:sluice:agent:a:resource:b:generation:1").unwrap(),
                    std::time::Duration::from_secs(3600)
                )
                .is_err()
        );
    }

    #[test]
    fn world_readable_secret_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        fs::write(&p, "x").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}

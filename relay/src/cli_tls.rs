//! The admin CLI's HTTP client, for `http://` and `https://` admin URLs: an admin API
//! served over TLS (`sluice serve --admin-tls`, `--admin-tls-cert`) or behind a TLS
//! reverse proxy.
//!
//! Trusted: the system's roots, the CA of a relay on this host (its data directory's
//! `ca.pem`, which signs the `--admin-tls` certificate), and `--admin-ca FILE`
//! (`SLUICE_ADMIN_CA`). A certificate none of them vouches for fails the call with what
//! to pass.

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::cli::AdminConn;
use crate::state::pki::files;

/// The admin CLI's client type.
pub type AdminHttp = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `http://` and `https://` admin URLs, trusting the roots above.
pub fn admin_http(conn: &AdminConn) -> Result<AdminHttp> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    // A relay on this host: its CA (unreadable by this user: simply not added).
    if let Ok(pem) = std::fs::read_to_string(conn.data_dir.join(files::CA_CERT)) {
        for cert in sluice_proto::tls::certs_from_pem(&pem).unwrap_or_default() {
            let _ = roots.add(cert);
        }
    }
    if let Some(ca) = &conn.admin_ca {
        let pem = std::fs::read_to_string(ca)
            .with_context(|| format!("reading --admin-ca {} (SLUICE_ADMIN_CA)", ca.display()))?;
        let certs = sluice_proto::tls::certs_from_pem(&pem)
            .map_err(|e| anyhow::anyhow!("--admin-ca {}: {e}; expected PEM CA certificates", ca.display()))?;
        for cert in certs {
            roots.add(cert).with_context(|| format!("--admin-ca {}: not a usable CA certificate", ca.display()))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let https = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// Why a call did not reach the admin API, from the whole error chain (the client's own
/// message is only "client error (Connect)"), with what to do for TLS failures.
pub fn describe_failure(e: &(dyn std::error::Error + 'static), base: &str) -> String {
    let mut chain = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    chain.dedup();
    let what = chain.join(": ");
    if what.contains("certificate") || what.contains("UnknownIssuer") {
        format!(
            "the admin API at {base} presented a TLS certificate this CLI does not trust ({what}): pass the CA that \
             signed it with --admin-ca FILE (SLUICE_ADMIN_CA) — for a relay started with --admin-tls that is its data \
             directory's ca.pem"
        )
    } else if base.starts_with("https://") && (what.contains("InvalidContentType") || what.contains("corrupt message"))
    {
        format!(
            "the admin API at {base} does not speak TLS ({what}): use an http:// admin URL, or start the relay with \
             --admin-tls"
        )
    } else {
        format!("cannot reach the relay's admin API at {base}: {what}; is `sluice serve` running there?")
    }
}

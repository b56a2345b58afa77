//! The admin API over TLS: `--admin-tls` (a certificate from the relay's CA) and
//! `--admin-tls-cert`/`--admin-tls-key` (the operator's own), the CLI over https://
//! trusting the data directory's CA or `--admin-ca`, and clear failures for plain HTTP
//! to the TLS port, an untrusted certificate, and https:// to a plain-HTTP relay.

use std::path::Path;
use std::process::{Command, Output};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sluice_e2e::{Relay, bin, http_get, test_dir};

/// `sluice customers list` from a host without the relay's data directory.
fn list_from_elsewhere(dir: &Path, token: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin("sluice"));
    cmd.args(["customers", "list", "--admin-token", token, "--data-dir"]).arg(dir.join("nowhere")).args(args);
    cmd.env_remove("SLUICE_ADMIN_CA");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A CA (its PEM) and a certificate it signed for localhost and 127.0.0.1 (chain PEM, key PEM).
fn own_pki() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca.pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), leaf.pem(), key.serialize_pem())
}

#[test]
fn the_admin_api_over_tls_and_what_the_cli_says_when_it_does_not_fit() {
    let dir = test_dir("admin-tls");
    let relay = Relay::start_with(&dir.path().join("tls"), &["--admin-tls"]);
    let url = std::fs::read_to_string(relay.data_dir().join("admin-url")).unwrap().trim().to_owned();
    assert!(url.starts_with("https://"), "{url}");
    let token = std::fs::read_to_string(relay.data_dir().join("admin-token")).unwrap().trim().to_owned();
    let ca = relay.data_dir().join("ca.pem");

    // On the relay's host: the data directory gives the URL, the token and the CA.
    relay.create_customer("acme");
    // Elsewhere: the URL, the token and the relay's CA (flag or environment).
    let out = list_from_elsewhere(dir.path(), &token, &["--admin-url", &url, "--admin-ca", ca.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("acme"));
    let out =
        list_from_elsewhere(dir.path(), &token, &["--admin-url", &url], &[("SLUICE_ADMIN_CA", ca.to_str().unwrap())]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Without the CA, or with another one: refused, naming the problem and the fix.
    let (other_ca, _, _) = own_pki();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).unwrap();
    for extra in [vec!["--admin-url", &url], vec!["--admin-url", &url, "--admin-ca", other.to_str().unwrap()]] {
        let out = list_from_elsewhere(dir.path(), &token, &extra, &[]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{extra:?} worked");
        assert!(err.contains("TLS certificate this CLI does not trust") && err.contains("--admin-ca"), "{err}");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }

    // Plain HTTP to the TLS port: a 400 saying to use https://.
    let plain = url.replace("https://", "http://");
    let out = list_from_elsewhere(dir.path(), &token, &["--admin-url", &plain], &[]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("served over TLS") && err.contains("https://") && err.contains("400"), "{err}");
    let (status, body) = http_get(url.trim_start_matches("https://"), "/healthz").unwrap();
    assert_eq!(status, 400, "{body}");

    // The operator's own certificate and key.
    let (own_ca, chain, key) = own_pki();
    let files = dir.path().join("pki");
    std::fs::create_dir_all(&files).unwrap();
    for (name, pem) in [("ca.pem", &own_ca), ("admin.pem", &chain), ("admin.key", &key)] {
        std::fs::write(files.join(name), pem).unwrap();
    }
    let own = Relay::start_with(
        &dir.path().join("own"),
        &[
            "--admin-tls-cert",
            files.join("admin.pem").to_str().unwrap(),
            "--admin-tls-key",
            files.join("admin.key").to_str().unwrap(),
        ],
    );
    let own_url = std::fs::read_to_string(own.data_dir().join("admin-url")).unwrap().trim().to_owned();
    let own_token = std::fs::read_to_string(own.data_dir().join("admin-token")).unwrap().trim().to_owned();
    let out = list_from_elsewhere(
        dir.path(),
        &own_token,
        &["--admin-url", &own_url, "--admin-ca", files.join("ca.pem").to_str().unwrap()],
        &[],
    );
    assert!(out.status.success(), "{}\n{}", stderr(&out), own.log());
    // Its own data directory's CA did not sign this one: the CLI there needs --admin-ca.
    let out = own.cli(&["customers", "list"]);
    assert!(stderr(&out).contains("does not trust"), "{}", stderr(&out));

    // https:// to a plain-HTTP relay.
    let plain_relay = Relay::start(&dir.path().join("plain"));
    let plain_url = format!("https://127.0.0.1:{}", plain_relay.admin_port);
    let plain_token = std::fs::read_to_string(plain_relay.data_dir().join("admin-token")).unwrap();
    let out = list_from_elsewhere(dir.path(), plain_token.trim(), &["--admin-url", &plain_url], &[]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("does not speak TLS") || err.contains("cannot reach"), "{err}");
}

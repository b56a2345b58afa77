//! `sluice-agent doctor` finds what a customer would otherwise guess at: one test per
//! check, each showing the PASS and a FAIL, against a real relay where the check talks
//! to one (and against a plain HTTP server and a TLS server of another CA where the
//! relay is not what answers).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use sluice_e2e::{Relay, bin, free_port, test_dir, wait_for};

/// Runs `sluice-agent doctor` with only `env` (and `extra` flags); returns its exit code
/// and what it printed.
fn doctor(env: &[(&str, &str)], extra: &[&str]) -> (i32, String) {
    let out = Command::new(bin("sluice-agent"))
        .arg("doctor")
        .args(extra)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("eyJ"), "the doctor never prints the JWT:\n{text}");
    (out.status.code().unwrap_or(-1), format!("{text}{err}"))
}

/// The line of `check` (with its `fix:` line when there is one).
fn line<'a>(out: &'a str, check: &str) -> &'a str {
    let at =
        out.find(&format!("  {check}: ")).map(|i| i - 4).unwrap_or_else(|| panic!("no line for {check:?} in:\n{out}"));
    let rest = &out[at..];
    let end = rest.find("\n").map(|i| i + 1).unwrap_or(rest.len());
    let end = if rest[end..].starts_with("      fix: ") {
        end + rest[end..].find('\n').unwrap_or(rest.len() - end)
    } else {
        end
    };
    rest[..end].trim_end()
}

fn assert_line(out: &str, check: &str, verdict: &str, wants: &[&str]) {
    let l = line(out, check);
    assert!(l.starts_with(verdict), "{check} should be {verdict}:\n{out}");
    for w in wants {
        assert!(l.contains(w), "{check}: {l:?} should mention {w:?}\n--- all ---\n{out}");
    }
}

/// A registration JWT's claims, unsigned: enough for the checks that never reach a
/// relay (the agent cannot verify signatures; only the relay can).
fn unsigned_jwt(relay_url: &str) -> String {
    let claims = serde_json::json!({
        "iss": "sluice-relay", "aud": "sluice-agent-registration", "jti": "jti_test", "iat": 1,
        "customer_id": "cus_test", "relay_url": relay_url, "ca_pin": "00"
    });
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!("{}.{}.sig", b.encode(b"{}"), b.encode(claims.to_string()))
}

/// An agent's environment for `NAME=name` with its own STATE_DIR under `dir`.
fn agent_env(dir: &Path, name: &str, app_port: u16, jwt: &str) -> Vec<(String, String)> {
    vec![
        ("APP_HOST".into(), "127.0.0.1".into()),
        ("APP_PORT".into(), app_port.to_string()),
        ("NAME".into(), name.into()),
        ("REGISTRATION_JWT".into(), jwt.into()),
        ("STATE_DIR".into(), dir.join(format!("state-{name}")).display().to_string()),
    ]
}

fn with<'a>(env: &'a [(String, String)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut out: Vec<(&str, &str)> =
        env.iter().filter(|(k, _)| !more.iter().any(|(m, _)| m == k)).map(|(k, v)| (k.as_str(), v.as_str())).collect();
    out.extend_from_slice(more);
    out
}

/// A relay with one customer; returns it and a JWT of that customer.
fn relay_and_jwt(dir: &Path) -> (Relay, String, String) {
    let relay = Relay::start(dir);
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    (relay, customer, jwt)
}

/// A closed port: bound once, then released.
fn closed_port() -> u16 {
    free_port()
}

#[test]
fn configuration_names_every_missing_or_bad_variable() {
    let dir = test_dir("doctor-config");
    let (code, out) = doctor(&[("APP_PORT", "70000")], &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(
        &out,
        "configuration",
        "FAIL",
        &["APP_HOST is not set", "APP_PORT=\"70000\"", "REGISTRATION_JWT is not set", "fix:"],
    );
    assert_line(&out, "relay DNS", "SKIP", &["configuration"]);
    assert_line(&out, "private service", "SKIP", &["configuration"]);

    let env = agent_env(dir.path(), "orders-db", 5432, &unsigned_jwt("https://127.0.0.1:1"));
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "configuration", "PASS", &["APP_HOST=127.0.0.1", "APP_PORT=5432", "NAME=\"orders-db\""]);

    // JSON for support: the same findings, one object each.
    let (_, json) = doctor(&with(&env, &[]), &["--output", "json"]);
    let findings: Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(findings.as_array().unwrap().len(), 8, "{json}");
    assert_eq!(findings[0]["check"], "configuration");
    assert_eq!(findings[0]["status"], "PASS");
}

#[test]
fn registration_jwt_says_for_whom_and_when_it_expired() {
    let dir = test_dir("doctor-jwt");
    let (relay, customer, jwt) = relay_and_jwt(dir.path());
    let env = agent_env(dir.path(), "orders-db", 5432, &jwt);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "registration JWT", "PASS", &[&relay.public_url(), &customer, "never expires"]);

    let short = relay.cli_ok(&["resources", "registration-jwt", "--customer-id", &customer, "--expires-in", "1"]);
    let env = agent_env(dir.path(), "orders-db", 5432, &short);
    let out = wait_for(Duration::from_secs(30), "the short JWT to expire", || {
        let (code, out) = doctor(&with(&env, &[]), &[]);
        (code == 1 && line(&out, "registration JWT").starts_with("FAIL")).then_some(out)
    })
    .unwrap();
    assert_line(&out, "registration JWT", "FAIL", &["expired", "ago", &customer, "fix: ask the platform operator"]);
    assert_line(&out, "enrollment", "SKIP", &["REGISTRATION_JWT"]);
}

#[test]
fn saved_identity_absent_present_and_made_for_another_name() {
    let dir = test_dir("doctor-identity");
    let (_relay, _, jwt) = relay_and_jwt(dir.path());
    let env = agent_env(dir.path(), "orders-db", 5432, &jwt);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "saved identity", "SKIP", &["will enroll on first start", "writable by uid"]);

    let (_, out) = doctor(&with(&env, &[]), &["--enroll"]);
    assert_line(&out, "enrollment", "PASS", &["enrolled as agent"]);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "saved identity", "PASS", &["\"orders-db\"", "certificate valid until", "writable by uid"]);

    // The same STATE_DIR under another NAME (a volume reused for another service).
    let (code, out) = doctor(&with(&env, &[("NAME", "billing-db")]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(
        &out,
        "saved identity",
        "FAIL",
        &["NAME is now \"billing-db\"", "fix: give each agent its own STATE_DIR"],
    );
    assert_line(&out, "enrollment", "SKIP", &["does not fit"]);
}

#[test]
fn relay_dns_lists_the_addresses_or_says_it_cannot_resolve() {
    let dir = test_dir("doctor-dns");
    let (relay, _, jwt) = relay_and_jwt(dir.path());
    let env = agent_env(dir.path(), "orders-db", 5432, &jwt);
    let by_name = format!("https://localhost:{}", relay.agent_port);
    let (_, out) = doctor(&with(&env, &[("SLUICE_URL", &by_name)]), &[]);
    assert_line(&out, "relay DNS", "PASS", &["localhost resolves to", "127.0.0.1"]);
    assert_line(&out, "registration JWT", "PASS", &[&format!("SLUICE_URL makes the agent dial {by_name} instead")]);

    let (code, out) = doctor(&with(&env, &[("SLUICE_URL", "https://relay.doctor-test.invalid:443")]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "relay DNS", "FAIL", &["cannot resolve relay.doctor-test.invalid", "fix:"]);
    assert_line(&out, "relay TCP", "SKIP", &["DNS"]);
    assert_line(&out, "relay TLS", "SKIP", &["TCP"]);
}

#[test]
fn relay_tcp_connects_or_says_refused() {
    let dir = test_dir("doctor-tcp");
    let (relay, _, jwt) = relay_and_jwt(dir.path());
    let env = agent_env(dir.path(), "orders-db", 5432, &jwt);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "relay TCP", "PASS", &[&format!("connected to 127.0.0.1:{}", relay.agent_port)]);

    let closed = format!("https://127.0.0.1:{}", closed_port());
    let (code, out) = doctor(&with(&env, &[("SLUICE_URL", &closed)]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "relay TCP", "FAIL", &["refused", "fix: check that the relay runs"]);
    assert_line(&out, "relay TLS", "SKIP", &["TCP"]);
}

/// Answers every connection with an HTTP 400, as a web server does to a TLS hello.
fn plain_http_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    port
}

/// A TLS 1.3 server for 127.0.0.1 whose certificate another CA ("Not The Relay CA") issued.
fn tls_server_of_another_ca() -> u16 {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name = DistinguishedName::new();
    ca_params.distinguished_name.push(DnType::CommonName, "Not The Relay CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "impostor.example");
    let cert = params.signed_by(&key, &issuer).unwrap();
    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(sluice_proto::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let config = Arc::new(config);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for tcp in l.incoming().flatten() {
            let config = config.clone();
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 64];
                let _ = tls.read(&mut buf);
            });
        }
    });
    port
}

#[test]
fn relay_tls_trusts_the_pinned_ca_and_says_what_answered_instead() {
    let dir = test_dir("doctor-tls");
    let (_relay, _, jwt) = relay_and_jwt(dir.path());
    let env = agent_env(dir.path(), "orders-db", 5432, &jwt);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "relay TLS", "PASS", &["TLSv1.3", "the pinned CA vouches for it"]);

    let http = format!("https://127.0.0.1:{}", plain_http_server());
    let (code, out) = doctor(&with(&env, &[("SLUICE_URL", &http)]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "relay TLS", "FAIL", &["plain HTTP", "HTTP/1.1 400 Bad Request", "fix: point SLUICE_URL"]);
    assert_line(&out, "relay TCP", "PASS", &[]);

    let other = format!("https://127.0.0.1:{}", tls_server_of_another_ca());
    let (code, out) = doctor(&with(&env, &[("SLUICE_URL", &other)]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(
        &out,
        "relay TLS",
        "FAIL",
        &["impostor.example", "issued by \"CN=Not The Relay CA\"", "not vouched for by the CA pinned", "fix:"],
    );
}

#[test]
fn session_opens_with_the_saved_identity_and_enrollment_reports_a_refusal() {
    let dir = test_dir("doctor-session");
    let relay = Relay::start(dir.path());
    let customer = relay.create_customer("acme");
    let issued: Value = serde_json::from_str(&relay.cli_ok(&[
        "resources",
        "registration-jwt",
        "--output",
        "json",
        "--customer-id",
        &customer,
    ]))
    .unwrap();
    let (jwt, jti) = (issued["jwt"].as_str().unwrap(), issued["jti"].as_str().unwrap());
    let env = agent_env(dir.path(), "orders-db", 5432, jwt);

    // Without an identity the doctor does not enroll unless asked.
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "enrollment", "SKIP", &["--enroll"]);
    let (code, out) = doctor(&with(&env, &[]), &["--enroll"]);
    assert_line(&out, "enrollment", "PASS", &["enrolled as agent", "\"orders-db\""]);
    assert!(!out.contains("FAIL  relay"), "{out}");
    let _ = code;

    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "session", "PASS", &["the relay welcomed agent", "\"orders-db\"", "session ses_"]);

    // Rotating the resource revokes its certificates: the session is refused.
    let rid = relay.resource("orders-db").unwrap()["id"].as_str().unwrap().to_owned();
    relay.cli_ok(&["resources", "registration-jwt", "--resource-id", &rid, "--rotate"]);
    let (code, out) = doctor(&with(&env, &[]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "session", "FAIL", &["fix: the agent enrolls again"]);

    // A revoked JWT: enrolling (a fresh STATE_DIR) is refused, and the doctor says so.
    relay.cli_ok(&["tokens", "revoke", jti]);
    let env = agent_env(dir.path(), "billing-db", 5432, jwt);
    let (code, out) = doctor(&with(&env, &[]), &["--enroll"]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "enrollment", "FAIL", &["the relay refused REGISTRATION_JWT", "fix: ask the platform operator"]);
}

#[test]
fn private_service_accepts_or_the_doctor_says_why_not() {
    let dir = test_dir("doctor-service");
    let jwt = unsigned_jwt("https://127.0.0.1:1");
    let service = TcpListener::bind("127.0.0.1:0").unwrap();
    let open = service.local_addr().unwrap().port();
    let env = agent_env(dir.path(), "orders-db", open, &jwt);
    let (_, out) = doctor(&with(&env, &[]), &[]);
    assert_line(&out, "private service", "PASS", &[&format!("127.0.0.1:{open} accepts TCP connections")]);

    let env = agent_env(dir.path(), "orders-db", closed_port(), &jwt);
    let (code, out) = doctor(&with(&env, &[("APP_HOST", "localhost")]), &[]);
    assert_eq!(code, 1, "{out}");
    assert_line(&out, "private service", "FAIL", &["cannot connect to localhost:", "fix:"]);
    // In a container (this test may run in one) the hint names the way out.
    let l = line(&out, "private service");
    if Path::new("/.dockerenv").exists() || Path::new("/run/.containerenv").exists() {
        assert!(l.contains("host.docker.internal") && l.contains("the container itself"), "{l}");
    }
}

//! Strings from the network reach neither the log nor the store raw: enrollment requests
//! with forged log lines, terminal escapes, or megabytes of NAME or hostname (issue #11
//! rows 2, 4 and 5).

use std::sync::Arc;

use rustls::pki_types::ServerName;
use sluice_e2e::{Relay, test_dir};
use sluice_proto::tls;
use sluice_proto::wire::{self, EnrollRequest, EnrollResponse, PROTOCOL_VERSION, RejectCode};
use tokio::net::TcpStream;

/// The CA pin of the relay under test (what a JWT would carry).
fn pin(relay: &Relay) -> String {
    let pem = std::fs::read_to_string(relay.data_dir().join("ca.pem")).unwrap();
    let der = tls::certs_from_pem(&pem).unwrap().remove(0);
    sluice_proto::identity::ca_pin(&der)
}

/// Sends one enrollment request as raw bytes of a frame; `None` when the relay closed
/// the connection without an answer.
async fn enroll_raw(relay: &Relay, req: &EnrollRequest) -> Option<EnrollResponse> {
    let tcp = TcpStream::connect(("127.0.0.1", relay.agent_port)).await.unwrap();
    let cfg = Arc::new(tls::agent_enroll_config(&pin(relay)).unwrap());
    let mut t =
        tokio_rustls::TlsConnector::from(cfg).connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await.unwrap();
    // write_frame refuses > 1 MiB itself; frame by hand to send what an attacker would.
    let body = serde_json::to_vec(req).unwrap();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    use tokio::io::AsyncWriteExt;
    let _ = t.write_all(&frame).await;
    let _ = t.flush().await;
    tokio::time::timeout(std::time::Duration::from_secs(20), wire::read_frame::<_, EnrollResponse>(&mut t))
        .await
        .unwrap()
        .ok()
}

fn request(jwt: &str, name: &str, hostname: &str) -> EnrollRequest {
    let key = rcgen::KeyPair::generate().unwrap();
    EnrollRequest {
        version: PROTOCOL_VERSION,
        jwt: jwt.into(),
        name: name.into(),
        csr_pem: rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap(),
        agent_version: "test".into(),
        hostname: hostname.into(),
    }
}

fn store_bytes(relay: &Relay) -> u64 {
    ["sluice.db", "sluice.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(relay.data_dir().join(f)).ok())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_log_lines_and_escapes_in_a_name_never_reach_the_log() {
    let dir = test_dir("hostile-name");
    let relay = Relay::start(dir.path());
    let evil = "db\n2026-01-01T00:00:00Z  INFO sluice_relay: admin token is 1234\u{1b}[2J\u{1b}[31m";
    let answer = enroll_raw(&relay, &request("not.a.jwt", evil, "host\nINFO forged host")).await;
    assert!(matches!(&answer, Some(EnrollResponse::Rejected(r)) if r.code == RejectCode::InvalidToken), "{answer:?}");
    // A megabyte of NAME is not even read: the frame is over the unauthenticated limit.
    let huge = "n".repeat(1 << 20);
    assert!(enroll_raw(&relay, &request("not.a.jwt", &huge, "h")).await.is_none(), "closed without an answer");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = relay.log();
    assert!(!log.contains('\u{1b}'), "no terminal escape reaches the log");
    assert!(!log.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")), "no forged line in the log:\n{log}");
    assert!(!log.lines().any(|l| l.starts_with("INFO forged")), "no forged line in the log:\n{log}");
    assert!(log.len() < 64 << 10, "the log did not grow with the attacker's bytes: {} bytes", log.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_hostnames_are_capped_before_the_store() {
    let dir = test_dir("hostile-hostname");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    // Warm the store up (first resource, WAL file), then measure.
    assert!(matches!(enroll_raw(&relay, &request(&jwt, "db", "h")).await, Some(EnrollResponse::Enrolled(_))));
    let before = store_bytes(&relay);
    let long_host = "h".repeat(60 << 10);
    for _ in 0..5 {
        let a = enroll_raw(&relay, &request(&jwt, "db", &long_host)).await;
        assert!(matches!(a, Some(EnrollResponse::Enrolled(_))), "{a:?}");
    }
    let grew = store_bytes(&relay).saturating_sub(before);
    assert!(grew < 100 << 10, "5 enrollments with 60 KiB host names grew the store by {grew} bytes");
    let log = relay.log();
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2048, "no log line carries the host name whole ({longest} bytes)");
}

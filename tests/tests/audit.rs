//! The audit trail: exactly one record per admin action (refused ones too) and per
//! stream, with the exact bytes each way, in the store (`sluice audit`) and in the
//! `--audit-log` file alike; and no secret — admin token, API tokens, registration
//! JWTs, the CA key — in the audit trail or the relay's log.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use serde_json::Value;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};

/// What the test service sends each client before reading it to its end.
const GREETING: usize = 5000;
/// What each client sends.
const SENT: usize = 1234;

/// A private service that sends [`GREETING`] bytes, reads the client to its end, and
/// closes: the two directions carry different counts.
fn greeting_service() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            std::thread::spawn(move || {
                let _ = conn.write_all(&[b'g'; GREETING]);
                let _ = std::io::copy(&mut conn, &mut std::io::sink());
            });
        }
    });
    port
}

/// One platform job's stream: sends [`SENT`] bytes, reads everything back.
fn one_stream(endpoint: &str) -> usize {
    let mut s = TcpStream::connect(endpoint).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&[b'c'; SENT]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got.len()
}

fn audit(relay: &Relay, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["audit", "--output", "json"];
    args.extend_from_slice(extra);
    serde_json::from_str::<Value>(&relay.cli_ok(&args)).unwrap().as_array().unwrap().clone()
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_record_per_admin_action_and_per_stream_with_exact_bytes() {
    let dir = test_dir("audit-records");
    let sink = dir.path().join("audit.jsonl");
    let relay = Relay::start_with(dir.path(), &["--audit-log", sink.to_str().unwrap()]);
    let service = greeting_service();

    // Admin actions: four that change something, one refused; reads are not recorded.
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let op = relay.cli_ok(&["api-tokens", "create", "--role", "operator"]);
    let out = relay.cli(&["customers", "create", "mallory", "--admin-token", &op]);
    assert!(!out.status.success());
    let agent = Agent::for_service(dir.path(), "db", service, &jwt);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    let jti = serde_json::from_str::<Value>(&relay.cli_ok(&["tokens", "list", "-o", "json"])).unwrap()[0]["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    relay.cli_ok(&["tokens", "revoke", &jti]);

    // Two streams.
    let endpoint = relay.endpoint("db");
    assert_eq!(one_stream(&endpoint), GREETING);
    assert_eq!(one_stream(&endpoint), GREETING);

    let records = wait_for(Duration::from_secs(20), "two stream records", || {
        let all = audit(&relay, &[]);
        (of_kind(&all, "stream").len() >= 2).then_some(all)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    let admin = of_kind(&records, "admin");
    let actions: Vec<(&str, u64)> =
        admin.iter().map(|r| (r["action"].as_str().unwrap(), r["status"].as_u64().unwrap())).collect();
    assert_eq!(
        actions,
        [
            ("create_customer", 201),
            ("issue_registration_jwt", 200),
            ("create_api_token", 201),
            ("create_customer", 403),
            ("revoke_registration_jwt", 200),
        ],
        "{records:#?}"
    );
    assert_eq!(admin[0]["target"].as_str(), Some(cid.as_str()));
    assert_eq!((admin[0]["token_id"].as_str(), admin[0]["role"].as_str()), (Some("bootstrap"), Some("admin")));
    assert_eq!(admin[3]["role"].as_str(), Some("operator"));
    assert!(admin[3]["error"].as_str().unwrap().contains("may not create customer"), "{}", admin[3]);
    assert_eq!(admin[4]["target"].as_str(), Some(jti.as_str()));
    assert!(admin.iter().all(|r| r["source"].as_str().unwrap().starts_with("127.0.0.1:")), "{admin:#?}");

    let streams = of_kind(&records, "stream");
    assert_eq!(streams.len(), 2, "{records:#?}");
    for s in &streams {
        assert_eq!(
            (s["bytes_in"].as_u64(), s["bytes_out"].as_u64()),
            (Some(SENT as u64), Some(GREETING as u64)),
            "{s}"
        );
        assert_eq!(s["resource_name"], "db");
        assert_eq!(s["end"], "clean", "{s}");
        assert!(s["client_addr"].as_str().unwrap().starts_with("127.0.0.1:"), "{s}");
        assert!(s["lease_id"].is_null());
        assert!(s["started_at_ms"].as_u64() <= s["ended_at_ms"].as_u64());
    }
    // Filtered by resource: the streams (by name) only.
    assert_eq!(audit(&relay, &["--resource", "db"]).len(), 2);

    // The sink holds the same records, one JSON line each, and is private.
    let lines: Vec<Value> =
        std::fs::read_to_string(&sink).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids = |v: &[Value]| {
        let mut ids: Vec<String> = v.iter().map(|r| r["id"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    assert_eq!(ids(&lines), ids(&records));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sink).unwrap().permissions().mode() & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_the_audit_trail_or_the_log() {
    let dir = test_dir("audit-secrets");
    let sink = dir.path().join("audit.jsonl");
    let mut relay = Relay::start_with(dir.path(), &["--audit-log", sink.to_str().unwrap()]);
    // The first start prints the admin token once, on purpose; everything below runs on
    // a second start, whose log must hold no secret at all.
    relay.restart();
    let service = greeting_service();
    let data = relay.data_dir();
    let admin_token = std::fs::read_to_string(data.join("admin-token")).unwrap().trim().to_owned();
    let ca_key = std::fs::read_to_string(data.join("ca.key")).unwrap();

    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let second_jwt = relay.customer_jwt(&cid);
    let agent = Agent::for_service(dir.path(), "db", service, &jwt);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    let rid = relay.resource("db").unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(one_stream(&relay.endpoint("db")), GREETING);
    let rotated: Value = serde_json::from_str(&relay.cli_ok(&[
        "resources",
        "registration-jwt",
        "--resource-id",
        &rid,
        "--rotate",
        "--output",
        "json",
    ]))
    .unwrap();
    let op = relay.cli_ok(&["api-tokens", "create", "--role", "operator", "--name", "on-call"]);
    let cust = relay.cli_ok(&["api-tokens", "create", "--role", "customer", "--customer-id", &cid]);
    relay.cli_ok(&["resources", "list", "--admin-token", &op]);
    relay.cli_ok(&["tokens", "list", "--admin-token", &cust]);
    let _ = relay.cli(&["customers", "create", "x", "--admin-token", &cust]);
    let _ = relay.cli(&["resources", "list", "--admin-token", "sluice_tok_wrong"]);
    let rotated_jwt = rotated["jwt"].as_str().unwrap().to_owned();
    let records = wait_for(Duration::from_secs(20), "the stream record", || {
        let text = relay.cli_ok(&["audit", "--output", "json"]);
        text.contains("\"kind\": \"stream\"").then_some(text)
    })
    .unwrap();

    let secrets: Vec<(&str, String)> = vec![
        ("admin token", admin_token),
        ("operator API token", op),
        ("customer API token", cust),
        ("registration JWT", jwt),
        ("second registration JWT", second_jwt),
        ("rotated registration JWT", rotated_jwt),
        // A line of the key's base64 body: any copy of the key holds it.
        ("CA key", ca_key.lines().nth(1).unwrap().to_owned()),
    ];
    let sink_text = std::fs::read_to_string(&sink).unwrap();
    assert!(sink_text.lines().count() >= 8, "{sink_text}");
    let log = relay.log();
    for (what, secret) in &secrets {
        assert!(secret.len() >= 32, "{what}: {secret}");
        for (place, text) in
            [("the audit trail", &records), ("the --audit-log file", &sink_text), ("the relay's log", &log)]
        {
            assert!(!text.contains(secret.as_str()), "the {what} appears in {place}");
        }
        // Nor the JWT's signature alone.
        if let Some(sig) = secret.rsplit('.').next().filter(|s| s.len() >= 32 && secret.contains('.')) {
            assert!(
                !records.contains(sig) && !sink_text.contains(sig) && !log.contains(sig),
                "{what}'s signature leaked"
            );
        }
    }
}

//! Credentials that live as long as they should: the registration JWT is for joining
//! only — an enrolled agent restarts and renews its certificate without it — and a saved
//! identity made for another NAME is not silently reused.

use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn echo_through(endpoint: &str) -> String {
    let mut s = TcpStream::connect(endpoint).await.unwrap();
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut back)).await.unwrap().unwrap();
    back
}

fn count(log: &str, what: &str) -> usize {
    log.matches(what).count()
}

/// A JWT that expires seconds after enrollment: the agent renews over its control session
/// (twice, with a 30 s certificate) and restarts from STATE_DIR without the JWT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_agent_renews_and_restarts_after_its_jwt_expired() {
    let dir = test_dir("renewal");
    let relay = Relay::start_with(dir.path(), &["--agent-cert-lifetime", "30s"]);
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    let jwt = relay.cli_ok(&["resources", "registration-jwt", "--customer-id", &cid, "--expires-in", "12s"]);
    let env = [
        ("APP_HOST", "127.0.0.1".to_owned()),
        ("APP_PORT", echo.port().to_string()),
        ("NAME", "orders-db".to_owned()),
        ("REGISTRATION_JWT", jwt.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let agent = Agent::start(dir.path(), "a", &env);
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    let agent_id = relay.cli_ok(&["agents", "list", "--columns", "Id"]).lines().nth(1).unwrap().trim().to_owned();

    // Renewed over the session: a 30 s certificate is renewed about 17 s after issue.
    wait_for(Duration::from_secs(60), "the first renewal", || {
        (count(&agent.proc.log_text(), "certificate renewed over the control session") >= 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agent.proc.log_text(), relay.log()));
    drop(agent);

    // The JWT has expired by now (12 s); the restarted agent needs only its STATE_DIR.
    let claims_exp = {
        use base64::Engine;
        let payload = jwt.split('.').nth(1).unwrap();
        let c: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        c["exp"].as_u64().unwrap()
    };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(now > claims_exp, "the JWT must have expired before the restart");
    let agent = Agent::start(dir.path(), "a", &env);
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("orders-db");
    assert_eq!(echo_through(&ep).await, "still here");
    let again = relay.cli_ok(&["agents", "list", "--columns", "Id"]).lines().nth(1).unwrap().trim().to_owned();
    assert_eq!(again, agent_id, "same identity after the restart: no second enrollment");
    let log = agent.proc.log_text();
    assert_eq!(count(&log, "enrolled"), 0, "the restart did not enroll: {log}");

    // And renews again with the JWT long expired.
    wait_for(Duration::from_secs(60), "a renewal after the restart", || {
        (count(&agent.proc.log_text(), "certificate renewed over the control session") >= 1).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", agent.proc.log_text(), relay.log()));
    assert_eq!(echo_through(&ep).await, "still here");

    // A fresh STATE_DIR with the expired JWT is refused at once, saying why.
    let out = std::process::Command::new(sluice_e2e::bin("sluice-agent"))
        .env_clear()
        .envs(env.iter().copied())
        .env("STATE_DIR", dir.path().join("fresh-state"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("expired") && err.contains("STATE_DIR"), "{err}");
}

/// Changing NAME while reusing STATE_DIR enrolls afresh: the new backend becomes the new
/// resource instead of being served under the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_identity_for_another_name_is_not_reused() {
    let dir = test_dir("identity-mismatch");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let state = [("APP_HOST", "127.0.0.1"), ("REGISTRATION_JWT", jwt.as_str())];
    let port = echo.port().to_string();
    let mut env = state.to_vec();
    env.extend([("APP_PORT", port.as_str()), ("NAME", "billing-db")]);
    let agent = Agent::start(dir.path(), "shared", &env);
    relay.wait_status("billing-db", "AVAILABLE", Some(&agent));
    drop(agent);

    let mut env = state.to_vec();
    env.extend([("APP_PORT", port.as_str()), ("NAME", "crm-db")]);
    let agent = Agent::start(dir.path(), "shared", &env);
    relay.wait_status("crm-db", "AVAILABLE", Some(&agent));
    relay.wait_status("billing-db", "UNAVAILABLE", Some(&agent));
    let log = agent.proc.log_text();
    assert!(log.contains("NAME is now \"crm-db\"") && log.contains("enrolling afresh"), "{log}");
}

//! The admin CLI end to end: registration, status, rotation, deletion, auth errors.

use std::process::Command;
use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, bin, test_dir};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_jwt_to_available_and_listing() {
    let dir = test_dir("cli-list");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    assert!(cid.starts_with("cus_"), "customers create prints only the id: {cid:?}");
    let listed = relay.cli_ok(&["customers", "list", "--columns", "Id,Name"]);
    assert!(listed.starts_with("Id") && listed.contains(&cid) && listed.contains("acme"), "{listed}");
    assert!(!listed.contains("Created"), "--columns limits the columns: {listed}");

    let jwt = relay.customer_jwt(&cid);
    assert_eq!(jwt.split('.').count(), 3, "registration-jwt prints only the JWT: {jwt:?}");
    let agent = Agent::for_service(dir.path(), "orders-db", echo.port(), &jwt);
    relay.wait_status("orders-db", "AVAILABLE", Some(&agent));

    let table = relay.cli_ok(&["resources", "list"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Name", "Status", "Customer"]);
    assert!(table.contains("orders-db") && table.contains("AVAILABLE") && table.contains("acme"), "{table}");
    let ext = relay.cli_ok(&["resources", "list", "--extended"]);
    for col in ["Id", "CustomerId", "Endpoint", "Agents", "Last seen"] {
        assert!(ext.lines().next().unwrap().contains(col), "--extended shows {col}: {ext}");
    }
    let r = relay.resource("orders-db").unwrap();
    assert_eq!(r["agents"], 1);
    assert_eq!(r["customer_id"], cid.as_str());

    // A second agent with the same NAME and customer joins the same resource.
    let agent2 = Agent::start(
        dir.path(),
        "second",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "orders-db"),
            ("REGISTRATION_JWT", &jwt),
        ],
    );
    sluice_e2e::wait_for(Duration::from_secs(20), "two agents on one resource", || {
        (relay.resource("orders-db").unwrap()["agents"] == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", relay.log(), agent2.proc.log_text()));
    let list: serde_json::Value =
        serde_json::from_str(&relay.cli_ok(&["resources", "list", "--output", "json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "same NAME + customer is one resource");

    // Endpoint by name and by id agree; delete closes the port.
    let ep = relay.endpoint("orders-db");
    assert_eq!(relay.cli_ok(&["resources", "endpoint", r["id"].as_str().unwrap()]), ep);
    let out = relay.cli(&["resources", "delete", r["id"].as_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(relay.resource("orders-db").is_none());
    sluice_e2e::wait_for(Duration::from_secs(5), "the deleted resource's port to close", || {
        std::net::TcpStream::connect(&ep).is_err().then_some(())
    })
    .unwrap();
    let missing = relay.cli(&["resources", "endpoint", "orders-db"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no resource with id or name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_revokes_old_jwt_and_cuts_off_connected_agents() {
    let dir = test_dir("cli-rotate");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    let old_jwt = relay.customer_jwt(&cid);
    let mut agent = Agent::for_service(dir.path(), "db", echo.port(), &old_jwt);
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    let rid = relay.resource("db").unwrap()["id"].as_str().unwrap().to_owned();
    let ep = relay.endpoint("db");
    // An open stream is cut off too.
    let mut open = TcpStream::connect(&ep).await.unwrap();

    let out = relay.cli(&["resources", "registration-jwt", "--resource-id", &rid, "--rotate"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let new_jwt = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 agent(s) disconnected"));

    // The connected agent is cut off; it tries to re-enroll with its old JWT and stops
    // with a clear error.
    let code = agent.proc.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(1), "agent must stop after revocation:\n{}", agent.proc.log_text());
    assert!(agent.proc.log_text().contains("revoked"), "{}", agent.proc.log_text());
    relay.wait_status("db", "UNAVAILABLE", None);
    let mut buf = [0u8; 1];
    let cut = tokio::time::timeout(Duration::from_secs(5), tokio::io::AsyncReadExt::read(&mut open, &mut buf)).await;
    assert!(matches!(cut, Ok(Ok(0)) | Ok(Err(_))), "open stream is cut: {cut:?}");

    // A fresh agent of the same resource with the old (customer) JWT is refused with a
    // clear, one-line error: the JWT may have leaked with the rotated resource's host.
    let mut fresh = Agent::start(
        dir.path(),
        "db-fresh",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "db"),
            ("REGISTRATION_JWT", &old_jwt),
        ],
    );
    assert_eq!(fresh.proc.wait_exit(Duration::from_secs(20)), Some(1));
    let log = fresh.proc.log_text();
    assert!(
        log.contains(&format!(
            "error: the relay refused this agent: this registration JWT enrolled agents of resource {rid} (\"db\") \
             before {rid} was rotated or deleted; it can no longer enroll agents for {rid}"
        )),
        "{log}"
    );

    // The new JWT works (NAME may be omitted: the JWT names the resource).
    let new_agent = Agent::start(
        dir.path(),
        "db-new",
        &[("APP_HOST", "127.0.0.1"), ("APP_PORT", &echo.port().to_string()), ("REGISTRATION_JWT", &new_jwt)],
    );
    relay.wait_status("db", "AVAILABLE", Some(&new_agent));
    assert_eq!(relay.resource("db").unwrap()["generation"], 2);
}

#[test]
fn bad_admin_token_is_401_with_a_clear_message() {
    let dir = test_dir("cli-auth");
    let relay = Relay::start(dir.path());
    let out = Command::new(bin("sluice"))
        .args(["customers", "list", "--admin-url", &format!("http://127.0.0.1:{}", relay.admin_port)])
        .args(["--admin-token", "wrong", "--data-dir", "/nonexistent"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("401") && err.contains("admin token is wrong"), "{err}");

    let out = Command::new(bin("sluice"))
        .args(["customers", "list", "--data-dir", "/nonexistent"])
        .env_remove("SLUICE_ADMIN_URL")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot find the relay"));

    let out = Command::new(bin("sluice"))
        .args(["customers", "list", "--admin-url", "http://127.0.0.1:1", "--admin-token", "x"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the relay's admin API"));

    // Token for nothing, token for a non-existent customer: refused with a hint.
    let none = relay.cli(&["resources", "registration-jwt"]);
    assert!(String::from_utf8_lossy(&none.stderr).contains("say who the token is for"));
    let ghost = relay.cli(&["resources", "registration-jwt", "--customer-id", "cus_nope"]);
    assert!(String::from_utf8_lossy(&ghost.stderr).contains("no customer with id cus_nope"));
}

#[test]
fn agent_rejects_bad_configuration_before_touching_the_network() {
    let dir = test_dir("agent-config");
    let run = |env: &[(&str, &str)]| {
        let mut c = Command::new(bin("sluice-agent"));
        c.env_clear().env("STATE_DIR", dir.path().join("state"));
        for (k, v) in env {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = run(&[("APP_PORT", "5432"), ("NAME", "x"), ("REGISTRATION_JWT", "a.b.c")]);
    assert_eq!(code, Some(2));
    assert_eq!(
        err.trim(),
        "sluice-agent: error: APP_HOST is not set: it must be the host name or IP of the private service"
    );
    let (code, err) = run(&[("APP_HOST", "db"), ("APP_PORT", "99999"), ("NAME", "x"), ("REGISTRATION_JWT", "a.b.c")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("APP_PORT=\"99999\" is not a TCP port"), "{err}");
    let (code, err) = run(&[("APP_HOST", "db"), ("APP_PORT", "1"), ("NAME", "x"), ("REGISTRATION_JWT", "garbage")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("REGISTRATION_JWT is not usable"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

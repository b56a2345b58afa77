//! Registration JWTs live as long as they should: rotating or deleting one resource
//! revokes that resource's credentials only, and operators list and revoke JWTs one by one.

use std::time::Duration;

use serde_json::Value;
use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};

/// `sluice resources registration-jwt …` as JSON (jwt, jti, …).
fn issue(relay: &Relay, args: &[&str]) -> Value {
    let mut all = vec!["resources", "registration-jwt", "--output", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&relay.cli_ok(&all)).unwrap()
}

fn agent_env<'a>(name: &'a str, port: &'a str, jwt: &'a str) -> [(&'a str, &'a str); 4] {
    [("APP_HOST", "127.0.0.1"), ("APP_PORT", port), ("NAME", name), ("REGISTRATION_JWT", jwt)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_one_resource_leaves_the_customer_jwt_valid_for_the_others() {
    let dir = test_dir("tokens-rotate-scope");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let port = echo.port().to_string();
    let cid = relay.create_customer("acme");
    let issued = issue(&relay, &["--customer-id", &cid]);
    let (jwt, jti) = (issued["jwt"].as_str().unwrap(), issued["jti"].as_str().unwrap());

    // One customer JWT enrolls the agents of two resources.
    let mut agent_a = Agent::for_service(dir.path(), "a", echo.port(), jwt);
    let agent_b = Agent::for_service(dir.path(), "b", echo.port(), jwt);
    relay.wait_status("a", "AVAILABLE", Some(&agent_a));
    relay.wait_status("b", "AVAILABLE", Some(&agent_b));
    let rid_a = relay.resource("a").unwrap()["id"].as_str().unwrap().to_owned();
    let rid_b = relay.resource("b").unwrap()["id"].as_str().unwrap().to_owned();
    let resource_jwt = issue(&relay, &["--resource-id", &rid_a]);

    // Rotate A: the output says exactly what was revoked.
    let out = relay.cli(&["resources", "registration-jwt", "--resource-id", &rid_a, "--rotate", "--output", "json"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rotated["revoked_resource_jwts"], serde_json::json!([resource_jwt["jti"]]), "{rotated}");
    assert_eq!(rotated["blocked_for_resource_jwts"], serde_json::json!([jti]), "{rotated}");
    assert!(
        stderr.contains(&format!(
            "Revoked 1 registration JWT(s) issued for {rid_a}: {}",
            resource_jwt["jti"].as_str().unwrap()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "1 customer JWT(s) that enrolled agents of {rid_a} can no longer enroll agents for {rid_a} (they stay \
             valid for other resources): {jti}"
        )),
        "{stderr}"
    );
    // A's agent is cut off and cannot come back with the customer JWT.
    assert_eq!(agent_a.proc.wait_exit(Duration::from_secs(20)), Some(1), "{}", agent_a.proc.log_text());

    // B's agent restarts with an empty state directory (a new replica, a lost volume):
    // it enrolls again with the same customer JWT and comes up.
    drop(agent_b);
    std::fs::remove_dir_all(dir.path().join("agent-b-state")).unwrap();
    relay.wait_status("b", "UNAVAILABLE", None);
    let agent_b = Agent::for_service(dir.path(), "b", echo.port(), jwt);
    wait_for(Duration::from_secs(20), "B's agent to enroll again", || {
        agent_b.proc.log_text().contains("enrolled").then_some(())
    })
    .unwrap_or_else(|e| {
        panic!("{e}\n--- agent log ---\n{}\n--- relay log ---\n{}", agent_b.proc.log_text(), relay.log())
    });
    relay.wait_status("b", "AVAILABLE", Some(&agent_b));
    assert_eq!(relay.resource("b").unwrap()["id"], rid_b.as_str(), "same resource, same port");

    // An agent for A with the same customer JWT is refused, and told what to do.
    let mut again = Agent::start(dir.path(), "a-again", &agent_env("a", &port, jwt));
    assert_eq!(again.proc.wait_exit(Duration::from_secs(20)), Some(1));
    let log = again.proc.log_text();
    assert!(
        log.contains(&format!(
            "this registration JWT enrolled agents of resource {rid_a} (\"a\") before {rid_a} was rotated or \
             deleted; it can no longer enroll agents for {rid_a} (it stays valid for other resources); issue a new \
             one: sluice resources registration-jwt --resource-id {rid_a}"
        )),
        "{log}"
    );
    // The resource JWT issued by the rotation enrolls A's agents.
    let new_a = Agent::start(dir.path(), "a-new", &agent_env("a", &port, rotated["jwt"].as_str().unwrap()));
    relay.wait_status("a", "AVAILABLE", Some(&new_a));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_resource_leaves_the_customer_jwt_valid_for_a_new_one_of_that_name() {
    let dir = test_dir("tokens-delete-scope");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let agent = Agent::for_service(dir.path(), "a", echo.port(), &jwt);
    relay.wait_status("a", "AVAILABLE", Some(&agent));
    let rid = relay.resource("a").unwrap()["id"].as_str().unwrap().to_owned();
    relay.cli_ok(&["resources", "delete", &rid]);
    drop(agent);
    std::fs::remove_dir_all(dir.path().join("agent-a-state")).unwrap();

    // The same NAME now makes a new resource (new id), which the customer JWT may enroll.
    let agent = Agent::for_service(dir.path(), "a", echo.port(), &jwt);
    relay.wait_status("a", "AVAILABLE", Some(&agent));
    assert_ne!(relay.resource("a").unwrap()["id"], rid.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_listed_and_revoked_one_by_one() {
    let dir = test_dir("tokens-list-revoke");
    let relay = Relay::start(dir.path());
    let echo = echo_server().await;
    let port = echo.port().to_string();
    let cid = relay.create_customer("acme");
    let other = relay.create_customer("globex");
    let first = issue(&relay, &["--customer-id", &cid]);
    let second = issue(&relay, &["--customer-id", &cid]);
    let (jti1, jti2) = (first["jti"].as_str().unwrap(), second["jti"].as_str().unwrap());
    issue(&relay, &["--customer-id", &other]);

    let agent = Agent::start(dir.path(), "x", &agent_env("x", &port, first["jwt"].as_str().unwrap()));
    relay.wait_status("x", "AVAILABLE", Some(&agent));

    // The table: both of acme's JWTs, with how many agents enrolled with each.
    let table = relay.cli_ok(&["tokens", "list", "--customer-id", &cid]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["Id", "Customer", "Resource", "Created", "Expires", "Agents", "Revoked"], "{table}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "only acme's JWTs: {table}");
    assert_eq!((rows[0][0], rows[0][1], rows[0][2]), (jti1, "acme", "-"), "{table}");
    assert_eq!(rows[0][rows[0].len() - 2..], ["1", "-"], "{table}");
    assert_eq!(rows[1][0], jti2, "{table}");
    assert_eq!(rows[1][rows[1].len() - 2..], ["0", "-"], "{table}");
    let json: Value = serde_json::from_str(&relay.cli_ok(&["tokens", "list", "-o", "json"])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 3, "all customers' JWTs without --customer-id: {json}");
    assert_eq!(json[0]["jti"], jti1);
    assert_eq!(json[0]["agents"], 1);
    assert_eq!(json[0]["revoked_at"], Value::Null);

    // Revoke the first: the output says what it does and does not do.
    let out = relay.cli(&["tokens", "revoke", jti1]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    let rid = relay.resource("x").unwrap()["id"].as_str().unwrap().to_owned();
    assert!(stderr.contains(&format!("Revoked registration JWT {jti1}: no agent can enroll with it any more")));
    assert!(stderr.contains("stay connected: revoking a JWT does not disconnect them"), "{stderr}");
    assert!(stderr.contains(&format!("sluice resources registration-jwt --resource-id {rid} --rotate")), "{stderr}");
    // Its agent stays up.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(relay.status("x").as_deref(), Some("AVAILABLE"));
    let json: Value = serde_json::from_str(&relay.cli_ok(&["tokens", "list", "-o", "json"])).unwrap();
    assert!(json[0]["revoked_at"].is_u64() && json[1]["revoked_at"].is_null(), "{json}");

    // A new agent with the revoked JWT is refused; the other JWT still enrolls.
    let mut refused = Agent::start(dir.path(), "y1", &agent_env("y", &port, first["jwt"].as_str().unwrap()));
    assert_eq!(refused.proc.wait_exit(Duration::from_secs(20)), Some(1));
    let log = refused.proc.log_text();
    assert!(log.contains("the relay refused this agent: the registration JWT was revoked"), "{log}");
    let ok = Agent::start(dir.path(), "y2", &agent_env("y", &port, second["jwt"].as_str().unwrap()));
    relay.wait_status("y", "AVAILABLE", Some(&ok));

    // Revoking again says so; JSON works; an unknown id is a clear 404.
    let again: Value = serde_json::from_str(&relay.cli_ok(&["tokens", "revoke", jti1, "-o", "json"])).unwrap();
    assert_eq!(again["newly_revoked"], false, "{again}");
    let out = relay.cli(&["tokens", "revoke", jti1]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("was already revoked"), "{out:?}");
    let out = relay.cli(&["tokens", "revoke", "jwt_nope"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no registration JWT with id jwt_nope; see `sluice tokens list`") && err.contains("404"),
        "{err}"
    );
    let out = relay.cli(&["tokens", "list", "--customer-id", "cus_nope"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no customer with id cus_nope"), "{out:?}");
}

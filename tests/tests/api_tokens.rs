//! Scoped API tokens: each role can do its job and nothing more (operator, platform,
//! customer), a customer token never sees or touches another customer's resources,
//! registration JWTs or agents, and revoked or expired tokens are refused.

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, test_dir};

/// A relay with two customers, A and B, each with one resource (`db-a`, `db-b`) served
/// by a live agent.
struct Tenants {
    relay: Relay,
    a: String,
    b: String,
    /// Registration JWT ids of A and B.
    jti_a: String,
    jti_b: String,
    rid_a: String,
    rid_b: String,
    _agents: Vec<Agent>,
    _dir: tempfile::TempDir,
}

impl Tenants {
    async fn start(label: &str) -> Tenants {
        let dir = test_dir(label);
        let relay = Relay::start(dir.path());
        let echo = echo_server().await;
        let (a, b) = (relay.create_customer("tenant-a"), relay.create_customer("tenant-b"));
        let issue = |cid: &str| -> Value {
            serde_json::from_str(&relay.cli_ok(&[
                "resources",
                "registration-jwt",
                "--customer-id",
                cid,
                "--output",
                "json",
            ]))
            .unwrap()
        };
        let (ja, jb) = (issue(&a), issue(&b));
        let agents = vec![
            Agent::for_service(dir.path(), "db-a", echo.port(), ja["jwt"].as_str().unwrap()),
            Agent::for_service(dir.path(), "db-b", echo.port(), jb["jwt"].as_str().unwrap()),
        ];
        relay.wait_status("db-a", "AVAILABLE", Some(&agents[0]));
        relay.wait_status("db-b", "AVAILABLE", Some(&agents[1]));
        let id = |name: &str| relay.resource(name).unwrap()["id"].as_str().unwrap().to_owned();
        Tenants {
            rid_a: id("db-a"),
            rid_b: id("db-b"),
            jti_a: ja["jti"].as_str().unwrap().to_owned(),
            jti_b: jb["jti"].as_str().unwrap().to_owned(),
            a,
            b,
            relay,
            _agents: agents,
            _dir: dir,
        }
    }

    /// Creates an API token as the bootstrap admin; returns the token.
    fn token(&self, args: &[&str]) -> String {
        let mut all = vec!["api-tokens", "create"];
        all.extend_from_slice(args);
        self.relay.cli_ok(&all)
    }
}

/// Runs the CLI with `token` instead of the data directory's admin token.
fn as_token(relay: &Relay, token: &str, args: &[&str]) -> Output {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--admin-token", token]);
    relay.cli(&all)
}

fn ok(relay: &Relay, token: &str, args: &[&str]) -> String {
    let out = as_token(relay, token, args);
    assert!(out.status.success(), "{args:?} should work: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts the call fails with `status` (e.g. "403"); returns its error text.
fn refused(relay: &Relay, token: &str, args: &[&str], status: &str) -> String {
    let out = as_token(relay, token, args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should be refused, printed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(&format!("({status} ")), "{args:?} should be {status}: {err}");
    err
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{e}: {s}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reads_rotates_and_drains_but_cannot_create_customers_or_tokens() {
    let t = Tenants::start("api-tokens-operator").await;
    let op = t.token(&["--role", "operator", "--name", "on-call"]);
    let r = &t.relay;
    // Reads everything.
    assert_eq!(json(&ok(r, &op, &["resources", "list", "-o", "json"])).as_array().unwrap().len(), 2);
    assert_eq!(json(&ok(r, &op, &["tokens", "list", "-o", "json"])).as_array().unwrap().len(), 2);
    assert_eq!(json(&ok(r, &op, &["agents", "list", "-o", "json"])).as_array().unwrap().len(), 2);
    assert_eq!(json(&ok(r, &op, &["customers", "list", "-o", "json"])).as_array().unwrap().len(), 2);
    ok(r, &op, &["relays", "list"]);
    ok(r, &op, &["audit"]);
    // Rotates and revokes.
    ok(r, &op, &["resources", "registration-jwt", "--resource-id", &t.rid_a, "--rotate"]);
    ok(r, &op, &["tokens", "revoke", &t.jti_b]);
    // Creates and deletes nothing, manages no API token.
    let err = refused(r, &op, &["customers", "create", "mallory"], "403");
    assert!(err.contains("role operator") && err.contains("may not create customer"), "{err}");
    refused(r, &op, &["api-tokens", "create", "--role", "admin"], "403");
    refused(r, &op, &["api-tokens", "revoke", "tok_x"], "403");
    refused(r, &op, &["resources", "registration-jwt", "--customer-id", &t.a], "403");
    refused(r, &op, &["resources", "delete", &t.rid_b], "403");
    assert!(r.resource("db-b").is_some(), "the operator's delete changed nothing");
    assert_eq!(json(&r.cli_ok(&["customers", "list", "-o", "json"])).as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_reads_resources_and_endpoints_but_not_jwts_agents_or_rotation() {
    let t = Tenants::start("api-tokens-platform").await;
    let p = t.token(&["--role", "platform", "--name", "job-runner"]);
    let r = &t.relay;
    assert_eq!(json(&ok(r, &p, &["resources", "list", "-o", "json"])).as_array().unwrap().len(), 2);
    let endpoint = ok(r, &p, &["resources", "endpoint", "db-a"]);
    assert_eq!(endpoint.trim(), r.endpoint("db-a"));
    let err = refused(r, &p, &["tokens", "list"], "403");
    assert!(err.contains("role platform") && err.contains("create, list and delete endpoint leases"), "{err}");
    refused(r, &p, &["resources", "registration-jwt", "--resource-id", &t.rid_a, "--rotate"], "403");
    refused(r, &p, &["resources", "registration-jwt", "--customer-id", &t.a], "403");
    refused(r, &p, &["agents", "list"], "403");
    refused(r, &p, &["customers", "create", "mallory"], "403");
    refused(r, &p, &["resources", "delete", &t.rid_a], "403");
    refused(r, &p, &["audit"], "403");
    refused(r, &p, &["api-tokens", "list"], "403");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_token_sees_and_manages_only_its_own_customer() {
    let t = Tenants::start("api-tokens-customer").await;
    let ta = t.token(&["--role", "customer", "--customer-id", &t.a]);
    let r = &t.relay;
    // Lists are filtered to A's.
    let resources = json(&ok(r, &ta, &["resources", "list", "-o", "json"]));
    let names: Vec<&str> = resources.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["db-a"]);
    let jwts = json(&ok(r, &ta, &["tokens", "list", "-o", "json"]));
    let jtis: Vec<&str> = jwts.as_array().unwrap().iter().map(|x| x["jti"].as_str().unwrap()).collect();
    assert_eq!(jtis, [t.jti_a.as_str()]);
    let agents = json(&ok(r, &ta, &["agents", "list", "-o", "json"]));
    let of: Vec<&str> = agents.as_array().unwrap().iter().map(|x| x["resource_name"].as_str().unwrap()).collect();
    assert_eq!(of, ["db-a"]);
    let customers = json(&ok(r, &ta, &["customers", "list", "-o", "json"]));
    assert_eq!(customers.as_array().unwrap().len(), 1);
    // B's things are answered as if they did not exist.
    refused(r, &ta, &["resources", "endpoint", "db-b"], "404");
    refused(r, &ta, &["resources", "endpoint", &t.rid_b], "404");
    refused(r, &ta, &["resources", "endpoint", "db-b", "--customer-id", &t.b], "404");
    refused(r, &ta, &["tokens", "list", "--customer-id", &t.b], "404");
    refused(r, &ta, &["tokens", "revoke", &t.jti_b], "404");
    refused(r, &ta, &["resources", "registration-jwt", "--customer-id", &t.b], "404");
    refused(r, &ta, &["resources", "registration-jwt", "--resource-id", &t.rid_b, "--rotate"], "404");
    refused(r, &ta, &["resources", "delete", &t.rid_b], "404");
    refused(r, &ta, &["resources", "registration-jwt", "--org-only"], "403");
    // Nothing of B's changed.
    let b_jwts = json(&r.cli_ok(&["tokens", "list", "--customer-id", &t.b, "-o", "json"]));
    assert!(b_jwts[0]["revoked_at"].is_null(), "{b_jwts}");
    assert!(r.resource("db-b").is_some());
    // Nor may it manage customers or API tokens.
    refused(r, &ta, &["customers", "create", "mallory"], "403");
    refused(r, &ta, &["api-tokens", "create", "--role", "customer", "--customer-id", &t.a], "403");
    // Its own: issue, rotate, revoke, delete.
    let issued = json(&ok(r, &ta, &["resources", "registration-jwt", "-o", "json"]));
    assert_eq!(issued["customer_id"].as_str(), Some(t.a.as_str()));
    ok(r, &ta, &["resources", "registration-jwt", "--resource-id", &t.rid_a, "--rotate"]);
    ok(r, &ta, &["tokens", "revoke", issued["jti"].as_str().unwrap()]);
    ok(r, &ta, &["resources", "delete", &t.rid_a]);
    // Gone by id: db-a's agent still holds a valid customer-wide JWT and may enroll a new
    // db-a (with a new id) as soon as it is cut off, so the name alone proves nothing.
    let left = json(&r.cli_ok(&["resources", "list", "-o", "json"]));
    assert!(left.as_array().unwrap().iter().all(|x| x["id"] != t.rid_a.as_str()), "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_expired_and_unknown_tokens_are_refused() {
    let dir = test_dir("api-tokens-revoked");
    let r = Relay::start(dir.path());
    let created = json(&r.cli_ok(&["api-tokens", "create", "--role", "operator", "-o", "json"]));
    let (token, id) = (created["token"].as_str().unwrap(), created["id"].as_str().unwrap());
    ok(&r, token, &["resources", "list"]);
    // The list never shows a token or its hash.
    let list = r.cli_ok(&["api-tokens", "list", "-o", "json"]);
    assert!(!list.contains(token) && !list.contains("hash"), "{list}");
    r.cli_ok(&["api-tokens", "revoke", id]);
    let err = refused(&r, token, &["resources", "list"], "401");
    assert!(err.contains(&format!("API token {id} was revoked")) && err.contains("ask an admin"), "{err}");

    let short = r.cli_ok(&["api-tokens", "create", "--role", "platform", "--expires-in", "2s"]);
    ok(&r, &short, &["resources", "list"]);
    std::thread::sleep(Duration::from_secs(4));
    let err = refused(&r, &short, &["resources", "list"], "401");
    assert!(err.contains("expired"), "{err}");

    let err = refused(&r, "sluice_tok_0000", &["resources", "list"], "401");
    assert!(err.contains("admin token is wrong") && err.contains("sluice api-tokens create"), "{err}");
    // The bootstrap admin token keeps working.
    r.cli_ok(&["api-tokens", "list"]);
    // A customer token needs its customer; other roles take none.
    let out = r.cli(&["api-tokens", "create", "--role", "customer"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --customer-id"));
    let out = r.cli(&["api-tokens", "create", "--role", "platform", "--customer-id", "cus_x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only for --role customer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_relay_is_refused_by_every_relay_at_once() {
    let dir = test_dir("api-tokens-cluster");
    let c = sluice_e2e::cluster::Cluster::start(dir.path(), 2, &[]);
    let (one, two) = (&c.relays[0], &c.relays[1]);
    let token = one.cli_ok(&["api-tokens", "create", "--role", "operator"]);
    ok(two, &token, &["resources", "list"]);
    let id = json(&one.cli_ok(&["api-tokens", "list", "-o", "json"]))[0]["id"].as_str().unwrap().to_owned();
    one.cli_ok(&["api-tokens", "revoke", &id]);
    // No wait: the other relay reads the token from the shared store on every request.
    let err = refused(two, &token, &["resources", "list"], "401");
    assert!(err.contains("was revoked"), "{err}");
    // Both relays' records are in the one audit trail.
    let records = json(&two.cli_ok(&["audit", "-o", "json"]));
    let seen: Vec<(&str, u64)> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(seen, [("create_api_token", 201), ("revoke_api_token", 200), ("GET /v1/resources", 401)], "{records:#}");
}

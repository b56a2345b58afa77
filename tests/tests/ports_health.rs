//! Status that tells the truth: a resource whose port another process holds is
//! PORT_BLOCKED (with the reason) until the relay binds it; health and readiness of relay
//! and agent; `--version` names the commit and build date; every metric has `# HELP`,
//! and `/metrics` names the build and the resources.
//!
//! Waits are generous (up to 60 s): the tests must hold on a loaded, slow machine.

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, bin, free_port, http_get, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GENEROUS: Duration = Duration::from_secs(60);

/// The value of the sample whose line starts with `series` (name and labels, exactly).
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Names of the `sluice_` series in a Prometheus text page that have no `# HELP` line.
fn undescribed(metrics: &str) -> Vec<String> {
    let described: HashSet<&str> =
        metrics.lines().filter_map(|l| l.strip_prefix("# HELP ")?.split_whitespace().next()).collect();
    let mut missing: Vec<String> = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_"))
        .map(|l| l.split(['{', ' ']).next().unwrap())
        .filter(|name| !described.contains(name))
        .map(str::to_owned)
        .collect();
    missing.dedup();
    missing
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_resource_port_is_port_blocked_until_the_relay_binds_it() {
    let dir = test_dir("port-blocked");
    let echo = echo_server().await;
    // One resource port, so the resource's port is known before the agent registers.
    let relay = Relay::start_with_resource_ports(dir.path(), 1);
    let port = relay.ports.0;
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let cid = relay.create_customer("acme");
    let agent = Agent::for_service(dir.path(), "squatted", echo.port(), &relay.customer_jwt(&cid));
    let logs =
        |e: String| panic!("{e}\n--- relay log ---\n{}\n--- agent log ---\n{}", relay.log(), agent.proc.log_text());

    let r = wait_for(GENEROUS, "the resource to be PORT_BLOCKED", || {
        relay.resource("squatted").filter(|r| r["status"] == "PORT_BLOCKED")
    })
    .unwrap_or_else(|e| panic!("{}", logs(e)));
    assert_eq!(r["agents"], 1, "the agent is connected: {r}");
    let why = r["port_error"].as_str().unwrap_or_else(|| panic!("a PORT_BLOCKED resource says why: {r}"));
    assert!(why.starts_with(&format!("127.0.0.1:{port}: ")), "{why}");
    assert!(why.contains("another process holds the port") && why.contains("retries"), "{why}");
    let table = relay.cli_ok(&["resources", "list"]);
    assert!(table.contains("PORT_BLOCKED"), "{table}");
    let extended = relay.cli_ok(&["resources", "list", "--extended"]);
    assert!(extended.lines().next().unwrap().contains("Port error"), "{extended}");
    assert!(extended.contains("another process holds the port"), "--extended shows the reason: {extended}");

    // Metrics: blocked, and the relay keeps trying (several failures, one log line).
    let rid = r["id"].as_str().unwrap().to_owned();
    let admin = format!("127.0.0.1:{}", relay.admin_port);
    let blocked = format!("sluice_relay_resource_port_blocked{{resource=\"{rid}\"}}");
    let failures = format!("sluice_relay_resource_port_bind_failures_total{{resource=\"{rid}\"}}");
    wait_for(GENEROUS, "three failed binds", || {
        let m = http_get(&admin, "/metrics").ok()?.1;
        (sample(&m, &blocked) == Some(1.0) && sample(&m, &failures)? >= 3.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{}", logs(format!("{e}\n{}", http_get(&admin, "/metrics").unwrap().1))));
    assert_eq!(relay.log().matches("cannot listen on the resource's port").count(), 1, "logged once per state change");

    // The squatter leaves: the relay binds the port and the tunnel works.
    drop(squatter);
    let r = wait_for(GENEROUS, "the resource to be AVAILABLE", || {
        relay.resource("squatted").filter(|r| r["status"] == "AVAILABLE")
    })
    .unwrap_or_else(|e| panic!("{}", logs(e)));
    assert!(r["port_error"].is_null(), "{r}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(b"through at last").await.unwrap();
    let mut got = [0u8; 15];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"through at last");
    let m = http_get(&admin, "/metrics").unwrap().1;
    assert_eq!(sample(&m, &blocked), Some(0.0), "{m}");
    assert!(relay.log().contains("resource port listening at last"), "{}", relay.log());
}

#[test]
fn relay_health_and_readiness_answer_without_a_token() {
    let dir = test_dir("relay-health");
    let relay = Relay::start(dir.path());
    let admin = format!("127.0.0.1:{}", relay.admin_port);
    for path in ["/healthz", "/readyz", "/v1/health"] {
        let (code, body) = http_get(&admin, path).unwrap();
        assert_eq!(code, 200, "GET {path}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(v["status"] == "ok" || v["status"] == "ready", "{path}: {body}");
    }
    // The rest of the API still wants the token.
    assert_eq!(http_get(&admin, "/v1/resources").unwrap().0, 401);
}

#[test]
fn agent_readyz_follows_the_control_session() {
    let dir = test_dir("agent-ready");
    let mut relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    relay.stop();
    let health = format!("127.0.0.1:{}", free_port());
    // A listening "service", so the resource is AVAILABLE (not SERVICE_UNREACHABLE).
    let service = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = Agent::start(
        dir.path(),
        "probed",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &service.local_addr().unwrap().port().to_string()),
            ("NAME", "probed"),
            ("REGISTRATION_JWT", &jwt),
            ("SLUICE_METRICS_LISTEN", &health),
        ],
    );
    let readyz = |want: u16, what: &str| {
        wait_for(GENEROUS, what, || http_get(&health, "/readyz").ok().filter(|(code, _)| *code == want))
            .unwrap_or_else(|e| panic!("{e}\n--- agent log ---\n{}", agent.proc.log_text()))
    };

    // The relay is down: alive, not ready, and it says why.
    wait_for(GENEROUS, "the agent's health listener", || http_get(&health, "/healthz").ok().filter(|r| r.0 == 200))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    let (_, body) = readyz(503, "readyz 503 while the relay is unreachable");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["reason"].as_str().unwrap().contains("no control session"), "{body}");

    relay.restart();
    readyz(200, "readyz 200 once the session is up");
    relay.wait_status("probed", "AVAILABLE", Some(&agent));

    relay.stop();
    let (_, body) = readyz(503, "readyz 503 after the relay is gone");
    assert!(body.contains("no control session"), "{body}");
    let (code, metrics) = http_get(&health, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(metrics.contains("sluice_agent_sessions 0"), "{metrics}");
    assert_eq!(http_get(&health, "/nope").unwrap().0, 404);
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    for b in ["sluice", "sluice-agent"] {
        let out = Command::new(bin(b)).arg("--version").output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        // e.g. "sluice 0.1.0 (commit 7d5082f, built 2026-11-30)"
        let rest = text.strip_prefix(&format!("{b} {} (commit ", env!("CARGO_PKG_VERSION"))).unwrap_or_else(|| {
            panic!("{b} --version: {text:?}");
        });
        let (commit, rest) = rest.split_once(", built ").unwrap_or_else(|| panic!("{b} --version: {text:?}"));
        assert!(commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit()), "{b}: commit {commit:?}");
        let date = rest.trim_end().strip_suffix(')').unwrap_or_else(|| panic!("{b} --version: {text:?}"));
        let parts: Vec<&str> = date.split('-').collect();
        assert!(
            parts.len() == 3
                && [4, 2, 2].iter().zip(&parts).all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_digit())),
            "{b}: build date {date:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_and_name_the_build_and_the_resources() {
    let dir = test_dir("metrics-info");
    let echo = echo_server().await;
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("Café Zürich & Co");
    let agent_metrics = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start(
        dir.path(),
        "described",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "orders.db-1"),
            ("REGISTRATION_JWT", &relay.customer_jwt(&cid)),
            ("SLUICE_METRICS_LISTEN", &agent_metrics),
        ],
    );
    relay.wait_status("orders.db-1", "AVAILABLE", Some(&agent));
    let rid = relay.resource("orders.db-1").unwrap()["id"].as_str().unwrap().to_owned();
    // A stream, so the stream metrics exist too.
    let mut s = TcpStream::connect(relay.endpoint("orders.db-1")).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    drop(s);

    let admin = format!("127.0.0.1:{}", relay.admin_port);
    let (code, m) = http_get(&admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(undescribed(&m), Vec::<String>::new(), "every relay metric has # HELP:\n{m}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(m.lines().any(|l| l.starts_with(&format!("sluice_build_info{{version=\"{version}\",commit=\"")) && l.ends_with(" 1")), "{m}");
    let info = format!("sluice_resource_info{{resource=\"{rid}\",name=\"orders.db-1\",customer=\"{cid}\"}}");
    assert_eq!(sample(&m, &info), Some(1.0), "{m}");
    prometheus_parse::Scrape::parse(m.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text");

    let (code, a) = http_get(&agent_metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(undescribed(&a), Vec::<String>::new(), "every agent metric has # HELP:\n{a}");
    assert!(a.lines().any(|l| l.starts_with("sluice_agent_build_info{") && l.ends_with(" 1")), "{a}");

    // A deleted resource leaves the list at once.
    relay.cli_ok(&["resources", "delete", &rid]);
    let m = http_get(&admin, "/metrics").unwrap().1;
    assert_eq!(sample(&m, &info), None, "{m}");
}

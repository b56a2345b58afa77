//! Per-customer quotas (issue #11 rows 3 and 5): one customer replaying its registration
//! JWT cannot take the port range, the agents or the certificates every other customer
//! needs. Each limit is a `sluice serve` flag, set low here so real agents reach it.

use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};

/// An agent of `name` with its own state directory `label` (so several can share a NAME).
fn agent(dir: &std::path::Path, label: &str, name: &str, port: u16, jwt: &str) -> Agent {
    Agent::start(
        dir,
        label,
        &[("APP_HOST", "127.0.0.1"), ("APP_PORT", &port.to_string()), ("NAME", name), ("REGISTRATION_JWT", jwt)],
    )
}

fn connected_agents(relay: &Relay, name: &str) -> u64 {
    relay.resource(name).and_then(|r| r["agents"].as_u64()).unwrap_or(0)
}

/// Row 3: a customer JWT replayed with new NAMEs filled the global port range, and the
/// next customer's first agent was told "retry later" forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_customer_cannot_take_the_port_range_from_another() {
    let dir = test_dir("quota-resources");
    let relay = Relay::start_with_ports_and(dir.path(), 4, &["--max-resources-per-customer", "3"]);
    let echo = echo_server().await;
    let greedy = relay.create_customer("Greedy");
    let jwt = relay.customer_jwt(&greedy);
    let mut held = Vec::new();
    for i in 1..=3 {
        let name = format!("greedy-{i}");
        let a = agent(dir.path(), &name, &name, echo.port(), &jwt);
        relay.wait_status(&name, "AVAILABLE", Some(&a));
        held.push(a);
    }
    let mut fourth = agent(dir.path(), "greedy-4", "greedy-4", echo.port(), &jwt);
    let code = fourth.proc.wait_exit(Duration::from_secs(60));
    let log = fourth.proc.log_text();
    assert_eq!(code, Some(1), "a quota refusal is final for the agent: {log}\n--- relay ---\n{}", relay.log());
    assert!(log.contains("already has 3 resources") && log.contains("--max-resources-per-customer 3"), "{log}");
    assert!(relay.resource("greedy-4").is_none(), "no fourth resource was created");

    // The last port is still there for another customer.
    let other = relay.create_customer("Other");
    let b = agent(dir.path(), "other-1", "other-1", echo.port(), &relay.customer_jwt(&other));
    relay.wait_status("other-1", "AVAILABLE", Some(&b));
}

/// Row 5: one JWT replayed 300 times gave 300 agents and 300 certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_jwt_enrolls_a_bounded_number_of_agents_per_hour() {
    let dir = test_dir("quota-enrollments");
    let relay = Relay::start_with(dir.path(), &["--max-enrollments-per-jwt-per-hour", "2"]);
    let echo = echo_server().await;
    let customer = relay.create_customer("Replay");
    let jwt = relay.customer_jwt(&customer);
    let first = agent(dir.path(), "r1", "replayed", echo.port(), &jwt);
    relay.wait_status("replayed", "AVAILABLE", Some(&first));
    let second = agent(dir.path(), "r2", "replayed", echo.port(), &jwt);
    wait_for(Duration::from_secs(30), "two agents", || (connected_agents(&relay, "replayed") == 2).then_some(()))
        .unwrap();
    // A third (and a fourth, under another NAME) is refused; it retries, never enrolled.
    let mut third = agent(dir.path(), "r3", "replayed", echo.port(), &jwt);
    let mut fourth = agent(dir.path(), "r4", "another", echo.port(), &jwt);
    for a in [&third, &fourth] {
        wait_for(Duration::from_secs(30), "the refusal in the agent's log", || {
            a.proc.log_text().contains("--max-enrollments-per-jwt-per-hour 2").then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}\n--- relay ---\n{}", a.proc.log_text(), relay.log()));
    }
    assert!(third.proc.is_running() && fourth.proc.is_running(), "refused agents retry with backoff");
    for a in [&third, &fourth] {
        assert!(!a.proc.log_text().contains("connected to the relay"), "{}", a.proc.log_text());
    }
    assert!(relay.resource("another").is_none(), "no resource is created for a JWT over its rate");
    let tokens = relay.cli_ok(&["tokens", "list", "--columns", "Agents"]);
    assert_eq!(tokens.lines().nth(1).map(str::trim), Some("2"), "two agents on record for the JWT:\n{tokens}");
    assert!(relay.log().contains("enrollment refused: this JWT's enrollments per hour"), "{}", relay.log());
    third.proc.kill();
    fourth.proc.kill();
    drop((first, second));
}

/// A resource's agent group is bounded; the agent over the cap gets in when one leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_per_resource_are_capped_and_the_next_gets_in_when_one_leaves() {
    let dir = test_dir("quota-agents");
    let relay = Relay::start_with(dir.path(), &["--max-agents-per-resource", "2"]);
    let echo = echo_server().await;
    let customer = relay.create_customer("Group");
    let jwt = relay.customer_jwt(&customer);
    let mut a1 = agent(dir.path(), "g1", "group", echo.port(), &jwt);
    relay.wait_status("group", "AVAILABLE", Some(&a1));
    let _a2 = agent(dir.path(), "g2", "group", echo.port(), &jwt);
    wait_for(Duration::from_secs(30), "two agents", || (connected_agents(&relay, "group") == 2).then_some(())).unwrap();
    let a3 = agent(dir.path(), "g3", "group", echo.port(), &jwt);
    wait_for(Duration::from_secs(30), "the third agent refused", || {
        a3.proc.log_text().contains("--max-agents-per-resource 2").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- relay ---\n{}", a3.proc.log_text(), relay.log()));
    assert_eq!(connected_agents(&relay, "group"), 2);
    a1.proc.kill();
    wait_for(Duration::from_secs(60), "the third agent in", || {
        (connected_agents(&relay, "group") == 2 && a3.proc.log_text().contains("connected to the relay")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- relay ---\n{}", a3.proc.log_text(), relay.log()));
}

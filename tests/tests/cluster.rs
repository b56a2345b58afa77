//! Several relays sharing one real PostgreSQL (started by the test), agents holding a
//! session to every relay: failover when a relay or an agent dies under load, drain for
//! an upgrade, revocation reaching every relay, and concurrent enrollment through two
//! relays.
//!
//! Platform clients here behave like libpq with several hosts: they try the relays'
//! endpoints in turn and take the first that accepts (a TCP load balancer does the
//! same with health checks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_e2e::cluster::Cluster;
use sluice_e2e::load::{Exchange, ExchangeError, exchange, exchange_server};
use sluice_e2e::{Agent, split_endpoint, test_dir, wait_for};

/// Starts an agent for resource `name` of the exchange service, dialing `url`.
fn agent(dir: &std::path::Path, label: &str, name: &str, port: u16, jwt: &str, env: &[(&str, &str)]) -> Agent {
    let port = port.to_string();
    let mut all =
        vec![("APP_HOST", "127.0.0.1"), ("APP_PORT", port.as_str()), ("NAME", name), ("REGISTRATION_JWT", jwt)];
    all.extend_from_slice(env);
    Agent::start(dir, label, &all)
}

/// Agent sessions each relay holds, in relay order (asked through relay `via`).
fn sessions_per_relay(c: &Cluster, via: usize) -> Vec<Option<u64>> {
    let out = c.relays[via].cli(&["relays", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (0..c.relays.len())
        .map(|i| {
            let id = c.id_of(i);
            list.as_array()?.iter().find(|r| r["id"] == id.as_str())?["agents"].as_u64()
        })
        .collect()
}

/// The resource's port (the same on every relay).
fn resource_port(c: &Cluster, via: usize, name: &str) -> u16 {
    let r = c.relays[via].resource(name).unwrap_or_else(|| panic!("no resource {name}\n{}", c.logs()));
    split_endpoint(r["endpoint"].as_str().unwrap()).1
}

/// One client stream tried on the relays in turn from `first`: the first relay that
/// accepts the connection carries it.
async fn stream_via_any(endpoints: &[String], first: usize, ex: Exchange) -> Result<usize, ExchangeError> {
    let mut last = None;
    for k in 0..endpoints.len() {
        let i = (first + k) % endpoints.len();
        match exchange(&endpoints[i], ex, || async {}).await {
            Ok(_) => return Ok(i),
            Err(ExchangeError::Failed(m)) if m.starts_with("connect:") => last = Some(ExchangeError::Failed(m)),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap())
}

#[derive(Debug, Clone)]
struct Outcome {
    started: Duration,
    result: Result<usize, ExchangeError>,
}

/// Three relays, two agents of one resource, 8 clients streaming throughout; one relay
/// and then one agent are SIGKILLed. Streams in flight through the killed process fail
/// visibly; every stream started after the failover bound succeeds; nothing is corrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_relay_and_an_agent_killed_under_load_lose_only_their_streams_in_flight() {
    let dir = test_dir("cluster-failover");
    let mut c = Cluster::start(dir.path(), 3, &[]);
    let service = exchange_server().await;
    let customer = c.relays[0].create_customer("acme");
    let jwt = c.relays[0].customer_jwt(&customer);
    let mut a1 = agent(dir.path(), "a1", "orders", service.port(), &jwt, &[]);
    let a2 = agent(dir.path(), "a2", "orders", service.port(), &jwt, &[]);
    wait_for(Duration::from_secs(60), "both agents on all three relays", || {
        (sessions_per_relay(&c, 0) == [Some(2), Some(2), Some(2)]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- a1 ---\n{}", c.logs(), a1.proc.log_text()));
    let table = c.relays[0].cli_ok(&["resources", "list"]);
    assert!(table.contains("2/2/2"), "resources list shows the agents on each relay:\n{table}");
    let endpoints = Arc::new(c.endpoints(resource_port(&c, 0, "orders")));

    let t0 = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let turn = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for k in 0..8u64 {
        let (endpoints, stop, turn) = (endpoints.clone(), stop.clone(), turn.clone());
        clients.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 20_000 {
                n += 1;
                let seed = k * 1_000_000 + n;
                let ex =
                    Exchange { up: 1 + seed % 48_000, up_seed: seed, down: 1 + (seed * 7) % 96_000, down_seed: !seed };
                let started = t0.elapsed();
                let first = turn.fetch_add(1, Ordering::Relaxed) as usize % endpoints.len();
                out.push(Outcome { started, result: stream_via_any(&endpoints, first, ex).await });
            }
            out
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let relay_killed = t0.elapsed();
    c.relays[1].stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let agent_killed = t0.elapsed();
    a1.proc.kill();
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all: Vec<Outcome> = Vec::new();
    for cl in clients {
        all.extend(cl.await.unwrap());
    }

    let corrupted: Vec<_> = all.iter().filter(|o| matches!(o.result, Err(ExchangeError::Corrupted(_)))).collect();
    assert!(corrupted.is_empty(), "corrupted streams: {corrupted:?}");
    let failed: Vec<&Outcome> = all.iter().filter(|o| o.result.is_err()).collect();
    // Every failure is a stream in flight when a process died, or started within the
    // failover bound after it.
    // A failure belongs to the last kill before it started (with 1 s of slack: a stream
    // that began just before the kill was in flight); the bound is the latest start
    // after that kill.
    let slack = Duration::from_secs(1);
    let kill_of = |o: &Outcome| if o.started + slack >= agent_killed { agent_killed } else { relay_killed };
    let bound = |kill: Duration| {
        failed
            .iter()
            .filter(|o| o.started + slack >= relay_killed && kill_of(o) == kill)
            .map(|o| o.started.saturating_sub(kill))
            .max()
    };
    let after_relay = bound(relay_killed);
    let after_agent = bound(agent_killed);
    let before = failed.iter().filter(|o| o.started + Duration::from_secs(1) < relay_killed).count();
    let per_relay = |i: usize| all.iter().filter(|o| matches!(o.result, Ok(r) if r == i)).count();
    eprintln!(
        "streams: {} ok, {} failed ({} before any kill); failover bound after the relay kill: {:?}, after the agent \
         kill: {:?}; ok per relay: {}/{}/{}",
        all.len() - failed.len(),
        failed.len(),
        before,
        after_relay,
        after_agent,
        per_relay(0),
        per_relay(1),
        per_relay(2)
    );
    for f in &failed {
        eprintln!("  failed at {:?}: {:?}", f.started, f.result);
    }
    assert_eq!(before, 0, "no stream fails before anything is killed\n{}", c.logs());
    // Generous bounds (a busy machine at half speed): what was in flight, plus a
    // stream open that found a dead agent's pooled connection and moved on.
    for (what, b) in [("relay", after_relay), ("agent", after_agent)] {
        assert!(b.is_none_or(|b| b < Duration::from_secs(5)), "streams kept failing {b:?} after the {what} was killed");
    }
    let late = all.iter().filter(|o| o.started > agent_killed + Duration::from_secs(5)).count();
    assert!(late > 0, "streams ran after the failover window");
    assert!(per_relay(1) > 0 && per_relay(0) > 0 && per_relay(2) > 0, "every relay carried streams");
    assert_eq!(c.relays[0].status("orders").as_deref(), Some("AVAILABLE"));
    assert_eq!(c.relays[2].status("orders").as_deref(), Some("AVAILABLE"));
    // The killed relay's heartbeat stopped: it leaves the set (and the agent's sessions).
    wait_for(Duration::from_secs(40), "the killed relay to leave the set", || {
        (c.active_ids(0).len() == 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    eprintln!("the killed relay left the set {:?} after the kill", t0.elapsed() - relay_killed);
    drop(a2);
}

/// `sluice relays drain ID` given to relay 1 drains relay 2 while a 1 GiB transfer runs
/// through relay 1 and a 544 MiB one through relay 2: both complete, relay 2 takes no new
/// stream, leaves the agents' set and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_relay_finishes_its_streams_takes_no_new_ones_and_exits_0() {
    let dir = test_dir("cluster-drain");
    let mut c = Cluster::start(dir.path(), 3, &["--drain-timeout", "120s"]);
    let service = exchange_server().await;
    let customer = c.relays[0].create_customer("acme");
    let jwt = c.relays[0].customer_jwt(&customer);
    let a = agent(dir.path(), "a", "files", service.port(), &jwt, &[]);
    wait_for(Duration::from_secs(60), "the agent on all three relays", || {
        (sessions_per_relay(&c, 0) == [Some(1), Some(1), Some(1)]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- agent ---\n{}", c.logs(), a.proc.log_text()));
    let port = resource_port(&c, 0, "files");
    let (via1, via2) = (c.endpoint(0, port), c.endpoint(1, port));
    let big = tokio::spawn(async move {
        exchange(&via1, Exchange { up: 16 << 20, up_seed: 1, down: 1 << 30, down_seed: 2 }, || async {}).await
    });
    let small = tokio::spawn({
        let via2 = via2.clone();
        async move {
            exchange(&via2, Exchange { up: 32 << 20, up_seed: 3, down: 512 << 20, down_seed: 4 }, || async {}).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id2 = c.id_of(1);
    c.relays[0].cli_ok(&["relays", "drain", &id2]);
    // Within a membership interval relay 2 closes its ports: new streams are refused
    // there from then on (clients go to the other relays).
    wait_for(Duration::from_secs(20), "relay 2 to refuse new streams", || {
        std::net::TcpStream::connect(&via2).is_err().then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    for _ in 0..20 {
        assert!(std::net::TcpStream::connect(&via2).is_err(), "a new stream landed on the draining relay");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let small = small.await.unwrap();
    assert!(small.is_ok(), "the stream through the draining relay: {small:?}\n{}", c.logs());
    let code = c.relays[1].proc.as_mut().unwrap().wait_exit(Duration::from_secs(120));
    assert_eq!(code, Some(0), "the drained relay exits 0\n{}", c.logs());
    let big = big.await.unwrap();
    assert!(big.is_ok(), "the 1 GiB transfer through relay 1: {big:?}\n{}", c.logs());
    wait_for(Duration::from_secs(30), "two relays left in the set", || (c.active_ids(0).len() == 2).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let log = a.proc.log_text();
    assert!(log.contains("no longer in the set"), "the agent let go of the drained relay:\n{log}");
    // Whether the 544 MiB stream was still running when the drain began depends on the
    // machine's speed: either way the relay said how it ended.
    let log2 = c.relays[1].log();
    assert!(log2.contains("drained: every stream finished") || log2.contains("draining: no stream active"), "{log2}");
    // The upgraded relay takes its place: the agent follows without a restart.
    let new = c.add_relay();
    wait_for(Duration::from_secs(30), "the agent on the new relay", || {
        (sessions_per_relay(&c, 0)[new] == Some(1)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- agent ---\n{}", c.logs(), a.proc.log_text()));
    let fresh =
        exchange(&c.endpoint(new, port), Exchange { up: 1 << 20, up_seed: 5, down: 1 << 20, down_seed: 6 }, || async {
        })
        .await;
    assert!(fresh.is_ok(), "a stream through the new relay: {fresh:?}");
}

/// A rotation given to relay 1 cuts an agent that holds a session only to relay 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_on_one_relay_cuts_the_agent_on_another_within_the_bound() {
    let dir = test_dir("cluster-rotate");
    let c = Cluster::start(dir.path(), 3, &[]);
    let service = exchange_server().await;
    let customer = c.relays[0].create_customer("acme");
    let jwt = c.relays[0].customer_jwt(&customer);
    let url3 = c.relays[2].public_url();
    let a = agent(dir.path(), "a", "crm", service.port(), &jwt, &[("SLUICE_URL", &url3), ("SLUICE_MAX_RELAYS", "1")]);
    wait_for(Duration::from_secs(60), "the agent on relay 3 only", || {
        (sessions_per_relay(&c, 0) == [Some(0), Some(0), Some(1)]).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- agent ---\n{}", c.logs(), a.proc.log_text()));
    let rid = c.relays[0].resource("crm").unwrap()["id"].as_str().unwrap().to_owned();
    let rotated = Instant::now();
    c.relays[0].cli_ok(&["resources", "registration-jwt", "--resource-id", &rid, "--rotate"]);
    let cut = wait_for(Duration::from_secs(30), "relay 3 to cut the agent", || {
        let log = c.relays[2].log();
        log.contains("cut agent sessions revoked through the store").then(|| rotated.elapsed())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n--- agent ---\n{}", c.logs(), a.proc.log_text()));
    eprintln!("rotation on relay 1 reached the agent's session on relay 3 after {cut:?}");
    // One membership interval (2 s) plus a busy machine's slack.
    assert!(cut < Duration::from_secs(15), "{cut:?}");
    wait_for(Duration::from_secs(20), "the agent to be told", || {
        a.proc.log_text().contains("refused this agent's certificate").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- agent ---\n{}", a.proc.log_text()));
}

/// Agents enrolling at once through two relays, three NAMEs between them: one resource
/// per NAME, each with its own port, every agent connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollments_racing_through_two_relays_make_one_resource_per_name() {
    let dir = test_dir("cluster-race");
    let c = Cluster::start(dir.path(), 2, &[]);
    let service = exchange_server().await;
    let customer = c.relays[0].create_customer("acme");
    let jwt = c.relays[0].customer_jwt(&customer);
    let urls = [c.relays[0].public_url(), c.relays[1].public_url()];
    let agents: Vec<Agent> = (0..8)
        .map(|i| {
            let name = format!("db-{}", i % 3);
            let env = [("SLUICE_URL", urls[i % 2].as_str()), ("SLUICE_MAX_RELAYS", "1")];
            agent(dir.path(), &format!("a{i}"), &name, service.port(), &jwt, &env)
        })
        .collect();
    let list = wait_for(Duration::from_secs(60), "8 agents connected", || {
        let out = c.relays[0].cli_ok(&["resources", "list", "--output", "json"]);
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let on_0 = list.as_array().unwrap().iter().map(|r| r["agents"].as_u64().unwrap()).sum::<u64>();
        let out1 = c.relays[1].cli_ok(&["resources", "list", "--output", "json"]);
        let list1: serde_json::Value = serde_json::from_str(&out1).unwrap();
        let on_1 = list1.as_array().unwrap().iter().map(|r| r["agents"].as_u64().unwrap()).sum::<u64>();
        (on_0 + on_1 == 8).then_some(list)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let resources = list.as_array().unwrap();
    let mut names: Vec<&str> = resources.iter().map(|r| r["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["db-0", "db-1", "db-2"], "one resource per NAME");
    let mut ports: Vec<u16> = resources.iter().map(|r| split_endpoint(r["endpoint"].as_str().unwrap()).1).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3, "distinct ports: {resources:?}");
    drop(agents);
}

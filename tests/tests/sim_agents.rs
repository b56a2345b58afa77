//! Simulated agents against a real relay (`sluice_e2e::sim`): a smoke test that keeps
//! the simulator working, and the measurement behind docs/scaling.md ("Cost per agent
//! and per stream"), run by `cargo xtask sim-agents`.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sluice_e2e::load::{fd_count, raise_own_fd_limit, rss_kib};
use sluice_e2e::sim::{self, Sim, SimIdentity, Snapshot, Target};
use sluice_e2e::{Relay, http_get, test_dir};

/// Polls `f` every 100 ms (without blocking the runtime the simulated agents run on)
/// until it is true; panics naming `what` after `timeout`.
async fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relay's resources as `sluice resources list --output json` shows them (a blocking
/// CLI call, moved off the runtime's worker).
fn resource_list(relay: &Relay) -> Vec<Value> {
    tokio::task::block_in_place(|| {
        let v: Value = serde_json::from_str(&relay.cli_ok(&["resources", "list", "--output", "json"])).unwrap();
        v.as_array().unwrap().clone()
    })
}

/// The relay's `/metrics` text.
fn metrics_text(relay: &Relay) -> String {
    let admin = format!("127.0.0.1:{}", relay.admin_port);
    tokio::task::block_in_place(|| http_get(&admin, "/metrics").map(|(_, b)| b).unwrap_or_default())
}

/// Sum of one metric over its labels on the relay's `/metrics`.
fn metric_sum(relay: &Relay, name: &str) -> f64 {
    metrics_text(relay)
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

fn flags_with(extra: &[&str], flags: &[String]) -> Vec<String> {
    flags.iter().cloned().chain(extra.iter().map(|s| s.to_string())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_simulated_agents_are_welcomed_heartbeat_and_carry_streams() {
    const AGENTS: usize = 20;
    const POOL: u64 = 4;
    let dir = test_dir("sim-smoke");
    let flags = sim::relay_flags(AGENTS, AGENTS, 8, POOL as u32, 1);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let relay = Relay::start_with_ports_and(dir.path(), AGENTS as u16, &flags);
    let jwt = tokio::task::block_in_place(|| {
        let cid = relay.create_customer("sim");
        relay.customer_jwt(&cid)
    });
    let names: Vec<String> = (0..AGENTS).map(|i| sim::resource_name(i, 1)).collect();
    let ids = sim::enroll_all(&jwt, &names, 8).await.unwrap_or_else(|e| panic!("{e}\n--- relay ---\n{}", relay.log()));

    let sim = Sim::new(Target::of_jwt(&jwt).unwrap());
    let started = sim.start(&ids, 8).await;
    assert_eq!(started.ready, AGENTS, "{started:?}\n--- relay ---\n{}", relay.log());
    // The pools fill right after the welcomes (each data connection is its own handshake):
    // wait for them rather than catch the last ones in flight on a busy machine.
    wait_until(Duration::from_secs(60), "every pool full", || sim.counters.snapshot().idle == AGENTS as u64 * POOL)
        .await;

    // The relay sees each simulated agent: its resource AVAILABLE with one agent.
    wait_until(Duration::from_secs(60), "every simulated agent's resource AVAILABLE", || {
        let list = resource_list(&relay);
        list.iter().filter(|r| r["status"] == "AVAILABLE" && r["agents"] == 1).count() == AGENTS
    })
    .await;
    assert_eq!(metric_sum(&relay, "sluice_relay_agent_sessions"), AGENTS as f64);

    // Heartbeats both ways (1 s here): three rounds from the relay, answered.
    wait_until(Duration::from_secs(60), "three pings from the relay to every session, answered", || {
        let s = sim.counters.snapshot();
        s.pongs_to_relay >= 3 * AGENTS as u64 && s.pongs_from_relay >= 3 * AGENTS as u64
    })
    .await;

    // Streams through the relay reach the in-process echo; each taken data connection is
    // replaced, and ends with its stream.
    let endpoints: Vec<String> =
        resource_list(&relay).iter().map(|r| r["endpoint"].as_str().unwrap().to_owned()).collect();
    let held = sim::hold_streams(&endpoints, 10, 10).await;
    assert!(held.failed.is_empty(), "{:?}\n--- relay ---\n{}", held.failed, relay.log());
    assert_eq!(sim.counters.snapshot().streams_active, 10);
    wait_until(Duration::from_secs(60), "pools refilled while the streams run", || {
        sim.counters.snapshot().idle == AGENTS as u64 * POOL
    })
    .await;
    drop(held);
    wait_until(Duration::from_secs(60), "the ten streams to end", || sim.counters.snapshot().streams_done == 10).await;

    let s = sim.counters.snapshot();
    assert_eq!((s.welcomed, s.refused, s.lost), (AGENTS as u64, 0, 0), "ended: {:?}", sim.ended());
    assert!(s.stats_to_relay >= 10, "a final stream stat per stream: {s:?}");
}

// === measurement (cargo xtask sim-agents) ===

/// What `cargo xtask sim-agents` asks for, from its environment variables.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    /// Agent counts to measure at, ascending (`SLUICE_SIM_AGENTS`, e.g. `500,2000`).
    steps: Vec<usize>,
    /// Streams held open at the last step (`SLUICE_SIM_STREAMS`).
    streams: usize,
    /// The relay's `--pool-size` (`SLUICE_SIM_POOL`).
    pool: u32,
    /// The relay's `--heartbeat-secs` (`SLUICE_SIM_HEARTBEAT_SECS`).
    heartbeat_secs: u64,
    /// Seconds CPU and messages are counted over at each step (`SLUICE_SIM_WINDOW_SECS`).
    window_secs: u64,
    /// Agents per resource (`SLUICE_SIM_AGENTS_PER_RESOURCE`).
    per_resource: usize,
    /// Agents connecting at once.
    parallel: usize,
}

impl Plan {
    fn from_env() -> Plan {
        let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.into());
        let num = |k: &str, d: &str| var(k, d).parse::<u64>().unwrap_or_else(|_| panic!("{k} must be a number"));
        let mut steps: Vec<usize> = var("SLUICE_SIM_AGENTS", "500,2000")
            .split(',')
            .map(|s| s.trim().parse().expect("SLUICE_SIM_AGENTS: counts separated by commas"))
            .collect();
        steps.sort_unstable();
        steps.dedup();
        Plan {
            steps,
            streams: num("SLUICE_SIM_STREAMS", "1000") as usize,
            pool: num("SLUICE_SIM_POOL", "4") as u32,
            heartbeat_secs: num("SLUICE_SIM_HEARTBEAT_SECS", "10"),
            window_secs: num("SLUICE_SIM_WINDOW_SECS", "60"),
            per_resource: num("SLUICE_SIM_AGENTS_PER_RESOURCE", "1").max(1) as usize,
            parallel: 32,
        }
    }
}

/// The relay (and the simulator) at one point of the run.
#[derive(Debug, Clone, Copy, Serialize)]
struct Sample {
    relay_rss_kib: u64,
    relay_fds: usize,
    relay_cpu_secs: f64,
    sim_rss_kib: u64,
    sim_cpu_secs: f64,
    counters: Snapshot,
    at: f64,
}

fn sample(pid: u32, sim: &Sim, t0: Instant) -> Sample {
    let me = std::process::id();
    Sample {
        relay_rss_kib: rss_kib(pid),
        relay_fds: fd_count(pid),
        relay_cpu_secs: sim::cpu_secs(pid),
        sim_rss_kib: rss_kib(me),
        sim_cpu_secs: sim::cpu_secs(me),
        counters: sim.counters.snapshot(),
        at: t0.elapsed().as_secs_f64(),
    }
}

/// One measured state: what the relay holds at its end, and rates over the window.
#[derive(Debug, Clone, Serialize)]
struct Row {
    what: String,
    agents: usize,
    streams: usize,
    relay_rss_mib: f64,
    relay_fds: usize,
    /// Relay CPU over the window, percent of one core.
    relay_cpu_pct: f64,
    /// Control frames per second, relay → agents and agents → relay.
    msgs_from_relay_per_s: f64,
    msgs_to_relay_per_s: f64,
    sim_rss_mib: f64,
    sim_cpu_pct: f64,
    sessions_in_relay_metrics: f64,
    /// Size of one `/metrics` answer (per-resource series grow with the resources).
    metrics_kib: f64,
}

async fn measure_window(what: &str, agents: usize, streams: usize, relay: &Relay, sim: &Sim, plan: &Plan) -> Row {
    let pid = relay.proc.as_ref().unwrap().child.id();
    let t0 = Instant::now();
    let a = sample(pid, sim, t0);
    tokio::time::sleep(Duration::from_secs(plan.window_secs)).await;
    let b = sample(pid, sim, t0);
    let secs = b.at - a.at;
    let d = b.counters - a.counters;
    Row {
        what: what.into(),
        agents,
        streams,
        relay_rss_mib: b.relay_rss_kib as f64 / 1024.0,
        relay_fds: b.relay_fds,
        relay_cpu_pct: 100.0 * (b.relay_cpu_secs - a.relay_cpu_secs) / secs,
        msgs_from_relay_per_s: d.from_relay as f64 / secs,
        msgs_to_relay_per_s: d.to_relay as f64 / secs,
        sim_rss_mib: b.sim_rss_kib as f64 / 1024.0,
        sim_cpu_pct: 100.0 * (b.sim_cpu_secs - a.sim_cpu_secs) / secs,
        sessions_in_relay_metrics: metric_sum(relay, "sluice_relay_agent_sessions"),
        metrics_kib: metrics_text(relay).len() as f64 / 1024.0,
    }
}

/// The cost of what changed from `a` to `b`, per unit (`per` agents or streams).
#[derive(Debug, Clone, Serialize)]
struct Slope {
    from: String,
    to: String,
    per: &'static str,
    rss_kib: f64,
    fds: f64,
    /// Relay CPU, milliseconds per second (= ‰ of a core) per unit.
    cpu_ms_per_s: f64,
    msgs_from_relay_per_s: f64,
    msgs_to_relay_per_s: f64,
}

fn slope(a: &Row, b: &Row, units: f64, per: &'static str) -> Slope {
    Slope {
        from: a.what.clone(),
        to: b.what.clone(),
        per,
        rss_kib: (b.relay_rss_mib - a.relay_rss_mib) * 1024.0 / units,
        fds: (b.relay_fds as f64 - a.relay_fds as f64) / units,
        cpu_ms_per_s: 10.0 * (b.relay_cpu_pct - a.relay_cpu_pct) / units,
        msgs_from_relay_per_s: (b.msgs_from_relay_per_s - a.msgs_from_relay_per_s) / units,
        msgs_to_relay_per_s: (b.msgs_to_relay_per_s - a.msgs_to_relay_per_s) / units,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement of minutes: cargo xtask sim-agents [--agents N,…] [--streams M] [--pool N]"]
async fn measure_relay_cost_per_agent_and_stream() {
    let plan = Plan::from_env();
    let n = *plan.steps.last().expect("at least one agent count");
    let resources = n.div_ceil(plan.per_resource);
    assert!(resources <= 30_000, "{resources} resources need as many ports; at most 30,000 here");
    let fd_limit = raise_own_fd_limit();
    // The simulator holds what the relay holds for the agents (a control session and the
    // pool each) plus the platform side of every stream; the relay, as much plus its
    // resource listeners and the other end of each stream.
    let need = n as u64 * (1 + u64::from(plan.pool)) + 2 * plan.streams as u64 + resources as u64 + 512;
    assert!(
        need <= fd_limit,
        "{n} agents with a pool of {} and {} streams need about {need} descriptors, more than this process's \
         limit of {fd_limit} (the relay has the same hard limit): raise it (ulimit -Hn, LimitNOFILE=) or \
         simulate fewer agents",
        plan.pool,
        plan.streams
    );
    println!("sim-agents plan: {}", serde_json::to_string(&plan).unwrap());

    let dir = test_dir("sim-agents");
    let flags = sim::relay_flags(n, resources, plan.parallel, plan.pool, plan.heartbeat_secs);
    let flags = flags_with(&["--log", "info"], &flags);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    println!("relay flags raised for the run: {}", flags.join(" "));
    let relay = Relay::start_with_ports_and(dir.path(), resources as u16, &flags);
    let pid = relay.proc.as_ref().unwrap().child.id();
    let jwt = tokio::task::block_in_place(|| {
        let cid = relay.create_customer("sim");
        relay.customer_jwt(&cid)
    });

    // Identities: the first agent of each resource creates it, the others join.
    let t = Instant::now();
    let cpu_before = sim::cpu_secs(pid);
    let names: Vec<String> = (0..n).map(|i| sim::resource_name(i, plan.per_resource)).collect();
    let firsts: Vec<String> = names.iter().step_by(plan.per_resource).cloned().collect();
    let mut ids: Vec<SimIdentity> = sim::enroll_all(&jwt, &firsts, 16).await.unwrap_or_else(|e| panic!("{e}"));
    let rest: Vec<String> =
        names.iter().enumerate().filter(|(i, _)| i % plan.per_resource != 0).map(|(_, n)| n.clone()).collect();
    ids.extend(sim::enroll_all(&jwt, &rest, 16).await.unwrap_or_else(|e| panic!("{e}")));
    let enroll_secs = t.elapsed().as_secs_f64();
    let enroll_cpu_ms = 1000.0 * (sim::cpu_secs(pid) - cpu_before) / n as f64;
    println!(
        "enrolled {n} agents over {resources} resources in {enroll_secs:.1} s (16 at a time); relay CPU \
         {enroll_cpu_ms:.2} ms per enrollment"
    );

    let (drops_before, aborts_before) = (sim::backlog_drops(), sim::tcp_aborts_on_timeout());
    let sim = Sim::new(Target::of_jwt(&jwt).unwrap());
    let settle = Duration::from_secs((2 * plan.heartbeat_secs).max(5));
    tokio::time::sleep(settle).await;
    let mut rows = vec![measure_window("relay, no agent", 0, 0, &relay, &sim, &plan).await];
    let mut connect = Vec::new();
    let mut have = 0;
    for &step in &plan.steps {
        let cpu_before = sim::cpu_secs(pid);
        let started = sim.start(&ids[have..step], plan.parallel).await;
        // The relay's CPU for one agent's arrival: the control session's and the pool's
        // mutual-TLS handshakes, the hello, the store writes, the resource port.
        let connect_cpu_ms = 1000.0 * (sim::cpu_secs(pid) - cpu_before) / (step - have) as f64;
        println!(
            "{step} agents: {} more ready in {:.1} s ({} failed{}); relay CPU {connect_cpu_ms:.2} ms per agent \
             (control session + {} pooled connections)",
            started.ready,
            started.secs,
            started.failed,
            if started.reasons.is_empty() { String::new() } else { format!(": {:?}", started.reasons) },
            plan.pool
        );
        assert_eq!(started.failed, 0, "agents that did not come up: {started:?}");
        connect.push((step, started.secs, connect_cpu_ms));
        have = step;
        tokio::time::sleep(settle).await;
        rows.push(measure_window(&format!("{step} idle agents"), step, 0, &relay, &sim, &plan).await);
    }

    let mut streams_held = 0;
    if plan.streams > 0 {
        // Only through resources whose port listens: on a shared machine another process
        // may hold a port of the range (the resource is then PORT_BLOCKED).
        let list = resource_list(&relay);
        let endpoints: Vec<String> = list
            .iter()
            .filter(|r| r["status"] == "AVAILABLE")
            .map(|r| r["endpoint"].as_str().unwrap().to_owned())
            .collect();
        if endpoints.len() < list.len() {
            println!(
                "{} of {} resources not AVAILABLE (their port held by another process?)",
                list.len() - endpoints.len(),
                list.len()
            );
        }
        let t = Instant::now();
        let held = sim::hold_streams(&endpoints, plan.streams, 64).await;
        streams_held = held.streams.len();
        println!(
            "{streams_held} streams open (one echoed byte each) in {:.1} s; {} failed{}",
            t.elapsed().as_secs_f64(),
            held.failed.len(),
            if held.failed.is_empty() {
                String::new()
            } else {
                format!(", e.g. {:?}", &held.failed[..held.failed.len().min(5)])
            }
        );
        let pool_full = n as u64 * u64::from(plan.pool);
        wait_until(Duration::from_secs(120), "the pools refilled", || sim.counters.snapshot().idle >= pool_full).await;
        tokio::time::sleep(settle).await;
        rows.push(
            measure_window(&format!("{n} agents, {streams_held} streams"), n, streams_held, &relay, &sim, &plan).await,
        );
        drop(held);
    }

    let end = sim.counters.snapshot();
    println!("\nsimulator counters at the end: {}", serde_json::to_string(&end).unwrap());
    println!(
        "\n| state | relay RSS MiB | relay fds | relay CPU % of a core | control msgs/s relay→agents | agents→relay | sessions (relay metrics) | /metrics KiB | simulator RSS MiB | simulator CPU % |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.1} | {} | {:.2} | {:.1} | {:.1} | {} | {:.0} | {:.1} | {:.1} |",
            r.what,
            r.relay_rss_mib,
            r.relay_fds,
            r.relay_cpu_pct,
            r.msgs_from_relay_per_s,
            r.msgs_to_relay_per_s,
            r.sessions_in_relay_metrics,
            r.metrics_kib,
            r.sim_rss_mib,
            r.sim_cpu_pct
        );
    }
    let mut slopes = Vec::new();
    let idle: Vec<&Row> = rows.iter().filter(|r| r.streams == 0).collect();
    for w in idle.windows(2) {
        slopes.push(slope(w[0], w[1], (w[1].agents - w[0].agents) as f64, "agent"));
    }
    if idle.len() > 2 {
        slopes.push(slope(idle[0], idle[idle.len() - 1], idle[idle.len() - 1].agents as f64, "agent"));
    }
    if plan.streams > 0 {
        slopes.push(slope(idle[idle.len() - 1], &rows[rows.len() - 1], streams_held.max(1) as f64, "stream"));
    }
    println!("\n| from → to | per | relay RSS KiB | relay fds | relay CPU ms/s | msgs/s relay→agent | agent→relay |");
    println!("|---|---|---|---|---|---|---|");
    for s in &slopes {
        println!(
            "| {} → {} | {} | {:.1} | {:.2} | {:.4} | {:.3} | {:.3} |",
            s.from, s.to, s.per, s.rss_kib, s.fds, s.cpu_ms_per_s, s.msgs_from_relay_per_s, s.msgs_to_relay_per_s
        );
    }
    let report = serde_json::json!({
        "plan": plan, "enroll_secs": enroll_secs, "enroll_cpu_ms": enroll_cpu_ms, "connect_secs_cpu_ms": connect, "rows": rows, "slopes": slopes, "end": end,
    });
    println!("\nsim-agents result: {report}");
    let mut failed_by_reason = std::collections::BTreeMap::<String, f64>::new();
    for l in metrics_text(&relay).lines().filter(|l| l.starts_with("sluice_relay_streams_failed_total{")) {
        let reason = l.split("reason=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        *failed_by_reason.entry(reason.to_owned()).or_default() +=
            l.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    }
    println!("streams the relay counted as failed, by reason: {failed_by_reason:?}");
    println!(
        "machine-wide during the run: {} packets dropped at a full input backlog (net.core.netdev_max_backlog), \
         {} TCP connections aborted on timeout (keepalive or retransmission)",
        sim::backlog_drops() - drops_before,
        sim::tcp_aborts_on_timeout() - aborts_before
    );
    let warnings: Vec<String> =
        relay.log().lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).take(20).map(String::from).collect();
    println!(
        "relay warnings and errors (first 20): {}",
        if warnings.is_empty() { "none".into() } else { warnings.join("\n") }
    );
    assert_eq!((end.refused, end.lost), (0, 0), "sessions refused or lost: {:?}", sim.ended());
}

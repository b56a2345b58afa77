//! Bounded resources (issue #11 row 1): a flood of unfinished HTTP requests on the admin
//! listener, with the relay held to 400 file descriptors, must not take the descriptors
//! the agent and resource ports need; the relay closes stalled admin connections after
//! its header-read timeout, and a stalled request body after its idle timeout.
//!
//! Waits are generous (up to 60 s): the tests must hold on a loaded, slow machine.

use std::process::Command;
use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, free_port, http_get, split_endpoint, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const GENEROUS: Duration = Duration::from_secs(60);
/// The relay's descriptor limit during the flood (soft and hard).
const FD_LIMIT: u32 = 400;
/// Stalled admin connections the attacker opens: far more than the relay may hold.
const STALLED: usize = 1000;
const ADMIN_CAP: &str = "32";
const HEADER_TIMEOUT_SECS: u64 = 30;

/// The relay's descriptors now.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Sets `pid`'s soft and hard RLIMIT_NOFILE (after the relay raised its own at start).
fn limit_fds(pid: u32, n: u32) {
    let out = Command::new("prlimit").arg("--pid").arg(pid.to_string()).arg(format!("--nofile={n}:{n}")).output();
    let out = out.expect("prlimit (util-linux) is needed for this test");
    assert!(out.status.success(), "prlimit: {}", String::from_utf8_lossy(&out.stderr));
}

/// One echo round trip through a resource's port, within `GENEROUS`.
async fn echo_round_trip(endpoint: &str) -> Result<(), String> {
    let (host, port) = split_endpoint(endpoint);
    let trip = async {
        let mut s = TcpStream::connect((host.as_str(), port)).await.map_err(|e| format!("connect: {e}"))?;
        s.write_all(b"ping").await.map_err(|e| format!("write: {e}"))?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.map_err(|e| format!("read: {e}"))?;
        if &got == b"ping" { Ok(()) } else { Err(format!("echoed {got:?}")) }
    };
    tokio::time::timeout(GENEROUS, trip).await.unwrap_or_else(|_| Err("no echo within 60 s".into()))
}

/// An admin connection that sends half a request line and stalls (slowloris).
async fn stall(admin_port: u16) -> Option<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", admin_port)).await.ok()?;
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n").await;
    Some(s)
}

/// Waits until the relay closed each connection (EOF or reset); how many it did not
/// close within `within`.
async fn still_open_after(conns: Vec<TcpStream>, within: Duration) -> usize {
    let mut waits = JoinSet::new();
    for mut c in conns {
        waits.spawn(async move {
            let mut buf = [0u8; 1024];
            let closed = async {
                loop {
                    match c.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {} // an answer (e.g. 408) before the close
                    }
                }
            };
            tokio::time::timeout(within, closed).await.is_err()
        });
    }
    waits.join_all().await.into_iter().filter(|open| *open).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_admin_connections_leave_the_agent_and_resource_ports_working() {
    let dir = test_dir("limits-admin-flood");
    let relay = Relay::start_with(
        dir.path(),
        &[
            "--admin-max-connections",
            ADMIN_CAP,
            "--admin-header-timeout-secs",
            &HEADER_TIMEOUT_SECS.to_string(),
            "--agent-max-handshakes",
            "32",
            "--max-streams-per-resource",
            "64",
        ],
    );
    let pid = relay.proc.as_ref().unwrap().child.id();
    assert!(relay.log().contains("file descriptor limit"), "the limit is logged at start:\n{}", relay.log());
    let cid = relay.create_customer("acme");
    let (jwt, later_jwt) = (relay.customer_jwt(&cid), relay.customer_jwt(&cid));
    let echo = echo_server().await;
    let agent = Agent::for_service(dir.path(), "echo", echo.port(), &jwt);
    relay.wait_status("echo", "AVAILABLE", Some(&agent));
    let endpoint = relay.endpoint("echo");
    echo_round_trip(&endpoint).await.unwrap();

    limit_fds(pid, FD_LIMIT);
    let before = fd_count(pid);
    let mut opening = JoinSet::new();
    for _ in 0..STALLED {
        opening.spawn(stall(relay.admin_port));
    }
    let stalled: Vec<TcpStream> = opening.join_all().await.into_iter().flatten().collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = fd_count(pid);
    eprintln!("relay fds: {before} before, {during} with {} stalled admin connections", stalled.len());

    // While the attacker holds its connections, the data plane works: a stream through
    // the resource's port, and a new agent's enrollment and session.
    echo_round_trip(&endpoint).await.unwrap_or_else(|e| panic!("echo during the flood: {e}\n{}", relay.log()));
    let health = format!("127.0.0.1:{}", free_port());
    let newcomer = Agent::start(
        dir.path(),
        "newcomer",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "newcomer"),
            ("REGISTRATION_JWT", &later_jwt),
            ("SLUICE_METRICS_LISTEN", &health),
        ],
    );
    wait_for(GENEROUS, "a new agent's session during the flood", || {
        http_get(&health, "/readyz").ok().filter(|(code, _)| *code == 200)
    })
    .unwrap_or_else(|e| {
        panic!("{e}\n--- relay log ---\n{}\n--- agent log ---\n{}", relay.log(), newcomer.proc.log_text())
    });
    assert!(
        during < before + 64,
        "the relay held {during} descriptors with {STALLED} stalled admin connections (cap {ADMIN_CAP})"
    );

    // The relay closes what it admitted once the header-read timeout passes.
    let open = still_open_after(stalled, Duration::from_secs(HEADER_TIMEOUT_SECS) + GENEROUS).await;
    assert_eq!(open, 0, "stalled admin connections the relay never closed");
    let admin = format!("127.0.0.1:{}", relay.admin_port);
    let (code, metrics) = http_get(&admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("sluice_relay_connections_refused_total{listener=\"admin\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(refused >= (STALLED - 100) as f64, "refusals over the cap are counted: {refused}");
    let log = relay.log();
    let refusal_lines = log.lines().filter(|l| l.contains("--admin-max-connections")).count();
    assert!((1..=20).contains(&refusal_lines), "refusals are logged, not once per connection: {refusal_lines} lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_closed_after_the_idle_timeout() {
    let dir = test_dir("limits-admin-idle");
    let relay = Relay::start_with(dir.path(), &["--admin-idle-timeout-secs", "3"]);
    let token = std::fs::read_to_string(relay.data_dir().join("admin-token")).unwrap();
    let mut s = TcpStream::connect(("127.0.0.1", relay.admin_port)).await.unwrap();
    let head = format!(
        "POST /v1/customers HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n\
         Content-Length: 100\r\n\r\n{{\"name\":",
        token.trim()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(still_open_after(vec![s], GENEROUS).await, 0, "a stalled body is closed after the idle timeout");
}

/// The sum of the samples of `family` whose labels contain `label`.
fn metric_sum(metrics: &str, family: &str, label: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(family) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.trim().parse::<f64>().ok())
        .sum()
}

fn relay_metrics(relay: &Relay) -> String {
    let (code, text) = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/metrics").unwrap();
    assert_eq!(code, 200);
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_agent_connections_over_the_cap_are_closed_at_once() {
    let dir = test_dir("limits-handshakes");
    let relay = Relay::start_with(dir.path(), &["--agent-max-handshakes", "4"]);
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    // Four connections that never send a ClientHello fill the cap...
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(("127.0.0.1", relay.agent_port)).await.unwrap());
    }
    std::thread::sleep(Duration::from_millis(500));
    // ...so the next ones are closed without waiting for the 15 s handshake timeout.
    let mut over = Vec::new();
    for _ in 0..20 {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", relay.agent_port)).await {
            over.push(c);
        }
    }
    assert_eq!(still_open_after(over, GENEROUS).await, 0, "connections over the cap are closed");
    let refused = metric_sum(&relay_metrics(&relay), "sluice_relay_connections_refused_total", "listener=\"agent\"");
    assert_eq!(refused, 20.0, "each refusal is counted");
    // The relay ends the stalled handshakes (15 s), and agents enroll again.
    assert_eq!(still_open_after(held, GENEROUS).await, 0, "stalled handshakes end");
    let echo = echo_server().await;
    let agent = Agent::for_service(dir.path(), "echo", echo.port(), &jwt);
    relay.wait_status("echo", "AVAILABLE", Some(&agent));
    echo_round_trip(&relay.endpoint("echo")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_resource_cap_get_a_reset() {
    streams_over_a_cap_get_a_reset("--max-streams-per-resource").await;
}

/// The same with the per-agent cap: the resource's only agent carries two streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_the_agent_cap_get_a_reset() {
    streams_over_a_cap_get_a_reset("--max-streams-per-agent").await;
}

/// Two streams held, the third over the cap `flag` (set to 2) is reset and counted as
/// `reason="limit"`, and a place frees when one ends.
async fn streams_over_a_cap_get_a_reset(flag: &str) {
    let dir = test_dir("limits-streams");
    let relay = Relay::start_with(dir.path(), &[flag, "2"]);
    let cid = relay.create_customer("acme");
    let echo = echo_server().await;
    let agent = Agent::for_service(dir.path(), "echo", echo.port(), &relay.customer_jwt(&cid));
    relay.wait_status("echo", "AVAILABLE", Some(&agent));
    let (host, port) = split_endpoint(&relay.endpoint("echo"));
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect((host.as_str(), port)).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(GENEROUS, s.read_exact(&mut got)).await.unwrap().unwrap();
        open.push(s);
    }
    // The third stream is over the cap: reset (maybe before `connect` returns), no echo.
    if let Ok(mut third) = TcpStream::connect((host.as_str(), port)).await {
        let _ = third.write_all(b"ping").await;
        let mut buf = [0u8; 4];
        let got = tokio::time::timeout(GENEROUS, third.read(&mut buf)).await.expect("the relay answers at once");
        assert!(matches!(got, Ok(0) | Err(_)), "no stream over the cap: {got:?}");
    }
    let metrics = relay_metrics(&relay);
    assert_eq!(metric_sum(&metrics, "sluice_relay_streams_failed_total", "reason=\"limit\""), 1.0, "{metrics}");
    // A stream that ends frees its place.
    drop(open.pop());
    wait_for(GENEROUS, "a stream once one ended", || {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(echo_round_trip_quick(&host, port)))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}

/// One echo round trip, `Some` if it worked within 5 s.
async fn echo_round_trip_quick(host: &str, port: u16) -> Option<()> {
    let trip = async {
        let mut s = TcpStream::connect((host, port)).await.ok()?;
        s.write_all(b"ping").await.ok()?;
        let mut got = [0u8; 4];
        s.read_exact(&mut got).await.ok()?;
        (&got == b"ping").then_some(())
    };
    tokio::time::timeout(Duration::from_secs(5), trip).await.ok().flatten()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The figures in docs/reliability.md: the relay's descriptors and resident memory while
/// 1,000 and 5,000 stalled admin connections are held (default flags, no fd limit set).
/// Run: `cargo test --release -p sluice-e2e --test limits -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, not an assertion"]
async fn measure_stalled_admin_connections() {
    for n in [1000, 5000] {
        let dir = test_dir("limits-measure");
        let relay = Relay::start(dir.path());
        let pid = relay.proc.as_ref().unwrap().child.id();
        std::thread::sleep(Duration::from_millis(500));
        let (fds0, rss0) = (fd_count(pid), rss_kib(pid));
        let mut opening = JoinSet::new();
        for _ in 0..n {
            opening.spawn(stall(relay.admin_port));
        }
        let held: Vec<TcpStream> = opening.join_all().await.into_iter().flatten().collect();
        std::thread::sleep(Duration::from_secs(2));
        let (fds, rss) = (fd_count(pid), rss_kib(pid));
        let healthz = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/healthz").map(|r| r.0);
        println!(
            "{n} stalled admin connections ({} connected): relay fds {fds0} -> {fds}, RSS {:.1} -> {:.1} MB, \
             /healthz {healthz:?}",
            held.len(),
            rss0 as f64 / 1024.0,
            rss as f64 / 1024.0
        );
        drop(held);
    }
}

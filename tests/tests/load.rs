//! Load through the real relay and agent on loopback (issue #11, "Load and soak"):
//!
//! - 2,000 streams of mixed sizes open at once through one resource, both directions
//!   checked with SHA-256 at both ends: none corrupted, none lost. The agent starts with
//!   the common soft descriptor limit of 1024 (it needs about 4,000: a data connection
//!   and a service connection per stream), so this also proves it raises its own.
//! - 20,000 short connections (connect, echo, close) as fast as 64 clients in flight
//!   go: every one succeeds, and afterwards the relay's and the agent's descriptors and
//!   resident memory are back near what they were before.
//!
//! Figures (first-byte p50/p99, connections per second, descriptors, RSS) are printed,
//! never asserted: the tests must hold on a loaded machine at half speed. Only generous
//! overall timeouts bound them. The long soak is `cargo xtask soak`, not here.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice_e2e::load::{
    Exchange, ExchangeError, echo_server, exchange, exchange_server, fd_count, percentile, raise_own_fd_limit, rss_kib,
};
use sluice_e2e::{Agent, Relay, http_get, test_dir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Streams open at once through the one resource.
const STREAMS: usize = 2000;
/// One stream in this many carries 1–8 MiB one way; the rest 1–64 KiB each way.
const LARGE_EVERY: usize = 20;
/// Short connections, and how many are in flight at once.
const SHORT: usize = 20_000;
const IN_FLIGHT: usize = 64;
/// Short connections before the baseline is taken: the pools and allocators warm up.
const WARM_UP: usize = 1000;

/// The mixed sizes: deterministic, about 120 MiB of small streams and 450 MiB of large.
fn plan() -> Vec<Exchange> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    (0..STREAMS)
        .map(|i| {
            let small = |rng: &mut rand::rngs::StdRng| rng.random_range(KIB..=64 * KIB);
            let (mut up, mut down) = (small(&mut rng), small(&mut rng));
            if i % LARGE_EVERY == 0 {
                let large = rng.random_range(MIB..=8 * MIB);
                if i % (2 * LARGE_EVERY) == 0 { up = large } else { down = large }
            }
            Exchange { up, up_seed: 2 * i as u64, down, down_seed: 2 * i as u64 + 1 }
        })
        .collect()
}

/// A count of streams that reached their first reply byte (or failed before it), and a
/// wake-up for those waiting once all `n` have.
struct Muster {
    n: usize,
    arrived: AtomicUsize,
    all: Notify,
}

impl Muster {
    fn new(n: usize) -> Self {
        Muster { n, arrived: AtomicUsize::new(0), all: Notify::new() }
    }

    fn arrive(&self) {
        if self.arrived.fetch_add(1, Ordering::SeqCst) + 1 >= self.n {
            self.all.notify_waiters();
        }
    }

    fn all_arrived(&self) -> bool {
        self.arrived.load(Ordering::SeqCst) >= self.n
    }

    /// Arrives, then waits for the rest (bounded: a stream that never arrives must not
    /// hold the others forever).
    async fn arrive_and_wait(&self) {
        let notified = self.all.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.arrive();
        if !self.all_arrived() {
            let _ = tokio::time::timeout(Duration::from_secs(120), notified).await;
        }
    }
}

/// The relay's `sluice_relay_streams_active` for all resources (its admin listener).
fn relay_streams_active(relay: &Relay) -> f64 {
    let (_, body) = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("sluice_relay_streams_active"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The soft descriptor limit of process `pid`.
fn soft_fd_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_concurrent_mixed_streams_arrive_intact() {
    let own_limit = raise_own_fd_limit();
    assert!(
        own_limit >= 3 * STREAMS as u64,
        "this test needs {} descriptors; the hard limit is {own_limit}",
        3 * STREAMS
    );
    let dir = test_dir("load-streams");
    let relay =
        Relay::start_with(dir.path(), &["--max-streams-per-resource", "4096", "--max-streams-per-agent", "4096"]);
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let service = exchange_server().await;
    // The soft limit systemd and most shells give: the agent must raise its own.
    let agent = Agent::start_via(
        dir.path(),
        "bulk",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &service.port().to_string()),
            ("NAME", "bulk"),
            ("REGISTRATION_JWT", &jwt),
        ],
        &["prlimit", "--nofile=1024:"],
    );
    relay.wait_status("bulk", "AVAILABLE", Some(&agent));
    let agent_pid = agent.proc.child.id();
    let agent_limit = soft_fd_limit(agent_pid);
    assert!(
        agent_limit >= 3 * STREAMS as u64,
        "the agent started with a soft limit of 1024 and kept {agent_limit}: it must raise it to its hard limit"
    );
    let endpoint = Arc::new(relay.endpoint("bulk"));

    let plan = plan();
    let total_bytes: u64 = plan.iter().map(|e| e.up + e.down).sum();
    // Every stream waits, once its first reply byte arrived, until all have (or failed),
    // so all are open through the relay at the same moment.
    let muster = Arc::new(Muster::new(STREAMS));
    let started = Instant::now();
    let mut streams = JoinSet::new();
    for ex in plan {
        let (endpoint, muster) = (endpoint.clone(), muster.clone());
        streams.spawn(async move {
            let passed = Arc::new(AtomicBool::new(false));
            let gate = || {
                passed.store(true, Ordering::SeqCst);
                muster.arrive_and_wait()
            };
            let r = tokio::time::timeout(Duration::from_secs(300), exchange(&endpoint, ex, gate)).await;
            let r = r.unwrap_or_else(|_| Err(ExchangeError::Failed("no end within 300 s".into())));
            if !passed.load(Ordering::SeqCst) {
                muster.arrive(); // failed before its first byte: the others need not wait for it
            }
            (ex, r)
        });
    }
    let relay_pid = relay.proc.as_ref().unwrap().child.id();
    let (mut open_at_once, mut fds_at_once) = (0.0, (0, 0));
    while started.elapsed() < Duration::from_secs(300) {
        if muster.all_arrived() {
            open_at_once = relay_streams_active(&relay);
            fds_at_once = (fd_count(relay_pid), fd_count(agent_pid));
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let opened = started.elapsed();

    let mut first_bytes = Vec::new();
    let (mut failed, mut corrupted) = (Vec::new(), Vec::new());
    while let Some(joined) = streams.join_next().await {
        match joined.expect("stream task") {
            (_, Ok(t)) => first_bytes.push(t.first_byte),
            (ex, Err(ExchangeError::Failed(why))) => failed.push(format!("{ex:?}: {why}")),
            (ex, Err(ExchangeError::Corrupted(why))) => corrupted.push(format!("{ex:?}: {why}")),
        }
    }
    let total = started.elapsed();
    first_bytes.sort();
    println!(
        "{STREAMS} concurrent streams, {:.0} MiB in all: {} ok, {} failed, {} corrupted; relay had {open_at_once} \
         streams open at once; first reply byte p50 {:?} p99 {:?} max {:?}; all open after {:.1} s, done in {:.1} s; agent \
         fd limit {agent_limit}, fds with all open: relay {}, agent {}",
        total_bytes as f64 / MIB as f64,
        first_bytes.len(),
        failed.len(),
        corrupted.len(),
        percentile(&first_bytes, 50.0),
        percentile(&first_bytes, 99.0),
        first_bytes.last().copied().unwrap_or_default(),
        opened.as_secs_f64(),
        total.as_secs_f64(),
        fds_at_once.0,
        fds_at_once.1,
    );
    assert!(corrupted.is_empty(), "corrupted streams:\n{}", corrupted.join("\n"));
    assert!(
        failed.is_empty(),
        "{} lost streams (first 10):\n{}\n--- relay log (tail) ---\n{}\n--- agent log (tail) ---\n{}",
        failed.len(),
        failed.iter().take(10).cloned().collect::<Vec<_>>().join("\n"),
        tail(&relay.log(), 40),
        tail(&agent.proc.log_text(), 40)
    );
}

/// The last `n` lines of a log.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One short connection: connect, 32 bytes echoed, close. Its round-trip time.
async fn short_connection(endpoint: &str, i: usize) -> Result<Duration, String> {
    let start = Instant::now();
    let trip = async {
        let mut s = TcpStream::connect(endpoint).await.map_err(|e| format!("connect: {e}"))?;
        let msg = format!("{i:>32}");
        s.write_all(msg.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
        let mut got = [0u8; 32];
        s.read_exact(&mut got).await.map_err(|e| format!("read: {e}"))?;
        if got != msg.as_bytes() {
            return Err(format!("echoed {:?}", String::from_utf8_lossy(&got)));
        }
        let rtt = start.elapsed();
        s.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.map_err(|e| format!("end: {e}"))?;
        if rest.is_empty() { Ok(rtt) } else { Err(format!("{} bytes after the echo", rest.len())) }
    };
    tokio::time::timeout(Duration::from_secs(60), trip).await.unwrap_or_else(|_| Err("no end within 60 s".into()))
}

/// `n` short connections, `IN_FLIGHT` at a time: round-trip times of the good ones and
/// the errors of the rest.
async fn short_connections(endpoint: &Arc<String>, n: usize) -> (Vec<Duration>, Vec<String>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut conns = JoinSet::new();
    let (mut rtts, mut errors) = (Vec::with_capacity(n), Vec::new());
    let mut record = |r: Result<Result<Duration, String>, tokio::task::JoinError>| match r.expect("connection task") {
        Ok(t) => rtts.push(t),
        Err(e) => errors.push(e),
    };
    for i in 0..n {
        let permit = slots.clone().acquire_owned().await.unwrap();
        let endpoint = endpoint.clone();
        conns.spawn(async move {
            let r = short_connection(&endpoint, i).await;
            drop(permit);
            r
        });
        while let Some(done) = conns.try_join_next() {
            record(done);
        }
    }
    while let Some(done) = conns.join_next().await {
        record(done);
    }
    (rtts, errors)
}

/// Descriptors and RSS (KiB) of the relay and the agent.
fn figures(relay: u32, agent: u32) -> [u64; 4] {
    [fd_count(relay) as u64, fd_count(agent) as u64, rss_kib(relay), rss_kib(agent)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_short_connections_leave_descriptors_and_memory_as_they_were() {
    let dir = test_dir("load-short");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let echo = echo_server().await;
    let agent = Agent::for_service(dir.path(), "echo", echo.port(), &jwt);
    relay.wait_status("echo", "AVAILABLE", Some(&agent));
    let endpoint = Arc::new(relay.endpoint("echo"));
    let (relay_pid, agent_pid) = (relay.proc.as_ref().unwrap().child.id(), agent.proc.child.id());

    let (_, warm_errors) = short_connections(&endpoint, WARM_UP).await;
    assert!(warm_errors.is_empty(), "warm-up connections failed: {warm_errors:?}\n{}", tail(&relay.log(), 40));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = figures(relay_pid, agent_pid);

    let started = Instant::now();
    let (mut rtts, errors) = short_connections(&endpoint, SHORT).await;
    let secs = started.elapsed().as_secs_f64();
    let during = figures(relay_pid, agent_pid);
    rtts.sort();
    println!(
        "{SHORT} short connections, {IN_FLIGHT} in flight: {} ok, {} failed in {secs:.1} s = {:.0} connections/s; \
         echo round trip p50 {:?} p99 {:?}",
        SHORT - errors.len(),
        errors.len(),
        SHORT as f64 / secs,
        percentile(&rtts, 50.0),
        percentile(&rtts, 99.0),
    );
    assert!(
        errors.is_empty(),
        "{} of {SHORT} short connections failed (first 10): {:?}\n--- relay log (tail) ---\n{}\n--- agent log (tail) \
         ---\n{}",
        errors.len(),
        &errors[..errors.len().min(10)],
        tail(&relay.log(), 40),
        tail(&agent.proc.log_text(), 40)
    );

    // Descriptors settle back (closing streams, the idle pool back to its size).
    const FD_SLACK: u64 = 16;
    let settle = Instant::now();
    let mut after = figures(relay_pid, agent_pid);
    while !(after[0] <= before[0] + FD_SLACK && after[1] <= before[1] + FD_SLACK)
        && settle.elapsed() < Duration::from_secs(60)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        after = figures(relay_pid, agent_pid);
    }
    println!(
        "relay fds {} before, {} right after, {} settled; agent fds {} / {} / {}; relay RSS {} / {} / {} KiB; agent \
         RSS {} / {} / {} KiB",
        before[0],
        during[0],
        after[0],
        before[1],
        during[1],
        after[1],
        before[2],
        during[2],
        after[2],
        before[3],
        during[3],
        after[3]
    );
    assert!(
        after[0] <= before[0] + FD_SLACK && after[1] <= before[1] + FD_SLACK,
        "descriptors did not come back: relay {} → {}, agent {} → {}",
        before[0],
        after[0],
        before[1],
        after[1]
    );
    const RSS_SLACK_KIB: u64 = 20 * 1024;
    assert!(
        after[2] <= before[2] + RSS_SLACK_KIB && after[3] <= before[3] + RSS_SLACK_KIB,
        "resident memory grew by more than 20 MiB: relay {} → {} KiB, agent {} → {} KiB",
        before[2],
        after[2],
        before[3],
        after[3]
    );
}

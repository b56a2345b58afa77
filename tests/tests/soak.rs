//! The soak (issue #11, "Load and soak"): `cargo xtask soak [--minutes N]` runs this
//! `#[ignore]`d test (never part of `cargo xtask test`). One relay, one agent, for
//! `SLUICE_SOAK_MINUTES` (default 15) minutes:
//!
//! - churn: short streams (a few hundred bytes each way) and medium transfers (64 KiB to
//!   4 MiB each way), every one checked with SHA-256 in both directions at both ends;
//! - once a minute the agent is killed (SIGKILL, as a crash would) and started again on
//!   its saved identity;
//! - every 10 s the relay's and the agent's resident memory and descriptors are sampled.
//!
//! At the end it prints the samples, the least-squares slope of each (KiB/min, fds/min)
//! and the totals. Streams that fail while the agent is down (from the kill until a
//! stream gets through again, plus a second) are expected and counted apart; a failure
//! outside those windows, or any corrupted stream, fails the soak.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice_e2e::load::{Exchange, ExchangeError, exchange, exchange_server, fd_count, percentile, rss_kib};
use sluice_e2e::{Agent, Relay, test_dir};

const KIB: u64 = 1024;
const SHORT_WORKERS: usize = 16;
const MEDIUM_WORKERS: usize = 2;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const RESTART_EVERY: Duration = Duration::from_secs(60);
/// Samples before this are left out of the slopes.
const WARM_UP: Duration = Duration::from_secs(30);

/// How one stream ended, with the time span it ran (for the restart windows).
struct Outcome {
    started: Instant,
    ended: Instant,
    medium: bool,
    result: Result<Duration, ExchangeError>,
}

/// One sample of both processes.
struct Sample {
    at: Duration,
    relay_rss: u64,
    relay_fds: usize,
    agent_rss: u64,
    agent_fds: usize,
    agent_run: usize,
    streams: usize,
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// A churn worker: streams one after another until `until`, each outcome recorded.
async fn churn(endpoint: Arc<String>, worker: u64, medium: bool, until: Instant, log: Arc<Mutex<Vec<Outcome>>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(worker);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let size = |rng: &mut rand::rngs::StdRng| {
            if medium { rng.random_range(64 * KIB..=4096 * KIB) } else { rng.random_range(1..=512) }
        };
        let seed = (worker << 40) | (n << 1);
        let ex = Exchange { up: size(&mut rng), up_seed: seed, down: size(&mut rng), down_seed: seed | 1 };
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(120), exchange(&endpoint, ex, || async {}))
            .await
            .unwrap_or_else(|_| Err(ExchangeError::Failed("no end within 120 s".into())))
            .map(|t| t.total);
        let failed = result.is_err();
        log.lock().unwrap().push(Outcome { started, ended: Instant::now(), medium, result });
        if failed {
            // The port refuses at once while no agent is up: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn soak_minutes() -> u64 {
    std::env::var("SLUICE_SOAK_MINUTES").ok().and_then(|m| m.parse().ok()).unwrap_or(15).max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the soak runs for minutes: cargo xtask soak [--minutes N]"]
async fn soak() {
    let minutes = soak_minutes();
    let dir = test_dir("soak");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let service = exchange_server().await;
    let port = service.port().to_string();
    let env = [("APP_HOST", "127.0.0.1"), ("APP_PORT", port.as_str()), ("NAME", "soak"), ("REGISTRATION_JWT", &jwt)];
    let mut agent = Agent::start(dir.path(), "soak", &env);
    relay.wait_status("soak", "AVAILABLE", Some(&agent));
    let endpoint = Arc::new(relay.endpoint("soak"));
    let relay_pid = relay.proc.as_ref().unwrap().child.id();
    println!(
        "soak: {minutes} min, {SHORT_WORKERS} short + {MEDIUM_WORKERS} medium churn workers, agent killed every 60 s"
    );

    let start = Instant::now();
    let until = start + Duration::from_secs(60 * minutes);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..(SHORT_WORKERS + MEDIUM_WORKERS) {
        workers.spawn(churn(endpoint.clone(), w as u64 + 1, w >= SHORT_WORKERS, until, log.clone()));
    }

    let mut samples = Vec::new();
    let mut windows: Vec<(Instant, Instant)> = Vec::new();
    let (mut next_sample, mut next_restart) = (start, start + RESTART_EVERY);
    let mut agent_run = 1;
    while Instant::now() < until {
        let now = Instant::now();
        if now >= next_sample {
            let agent_pid = agent.proc.child.id();
            samples.push(Sample {
                at: now - start,
                relay_rss: rss_kib(relay_pid),
                relay_fds: fd_count(relay_pid),
                agent_rss: rss_kib(agent_pid),
                agent_fds: fd_count(agent_pid),
                agent_run,
                streams: log.lock().unwrap().len(),
            });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_restart && now + Duration::from_secs(10) < until {
            let killed = Instant::now();
            agent.proc.kill();
            let old = agent.proc.log.clone();
            let _ = std::fs::rename(&old, dir.path().join(format!("agent-soak-run{agent_run}.log")));
            agent_run += 1;
            agent = Agent::start(dir.path(), "soak", &env);
            let back = back_up(&endpoint).await;
            let back = back.unwrap_or_else(|| {
                panic!(
                    "the agent did not serve again within 60 s after restart {agent_run}\n--- agent log ---\n{}",
                    agent.proc.log_text()
                )
            });
            println!(
                "agent restart {}: streams flow again after {:.2} s",
                agent_run - 1,
                (back - killed).as_secs_f64()
            );
            windows.push((killed, back + Duration::from_secs(1)));
            next_restart += RESTART_EVERY;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    workers.join_all().await;
    let elapsed = start.elapsed();

    // === report ===
    println!("\n   t (s) | relay RSS KiB | relay fds | agent RSS KiB | agent fds | agent run | streams");
    for s in &samples {
        println!(
            "{:>8.0} | {:>13} | {:>9} | {:>13} | {:>9} | {:>9} | {:>7}",
            s.at.as_secs_f64(),
            s.relay_rss,
            s.relay_fds,
            s.agent_rss,
            s.agent_fds,
            s.agent_run,
            s.streams
        );
    }
    // The first samples hold the idle start and the warm-up (pools, allocator arenas):
    // the slopes are over the steady state after it.
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.at >= WARM_UP).collect();
    let xs: Vec<f64> = steady.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
    let col = |f: &dyn Fn(&Sample) -> f64| steady.iter().map(|s| f(s)).collect::<Vec<f64>>();
    println!(
        "slopes (least squares over the {} samples after the first {} s): relay RSS {:+.1} KiB/min, relay fds {:+.2}/min; agent RSS {:+.1} \
         KiB/min, agent fds {:+.2}/min (the agent restarts every minute: its slope spans restarts)",
        steady.len(),
        WARM_UP.as_secs(),
        slope(&xs, &col(&|s| s.relay_rss as f64)),
        slope(&xs, &col(&|s| s.relay_fds as f64)),
        slope(&xs, &col(&|s| s.agent_rss as f64)),
        slope(&xs, &col(&|s| s.agent_fds as f64)),
    );

    let log = std::mem::take(&mut *log.lock().unwrap());
    let in_window = |o: &Outcome| windows.iter().any(|(from, to)| o.started < *to && o.ended >= *from);
    let (mut ok, mut ok_medium, mut during_restart, mut corrupted, mut failed) = (0, 0, 0, Vec::new(), Vec::new());
    let mut times = Vec::new();
    for o in &log {
        match &o.result {
            Ok(t) => {
                ok += 1;
                ok_medium += usize::from(o.medium);
                if !o.medium {
                    times.push(*t);
                }
            }
            Err(ExchangeError::Corrupted(why)) => corrupted.push(why.clone()),
            Err(ExchangeError::Failed(_)) if in_window(o) => during_restart += 1,
            Err(ExchangeError::Failed(why)) => failed.push(why.clone()),
        }
    }
    times.sort();
    println!(
        "{:.1} min: {} streams, {ok} ok ({ok_medium} medium), {during_restart} failed during the {} agent restarts \
         (expected), {} failed outside them, {} corrupted; short stream p50 {:?} p99 {:?}",
        elapsed.as_secs_f64() / 60.0,
        log.len(),
        windows.len(),
        failed.len(),
        corrupted.len(),
        percentile(&times, 50.0),
        percentile(&times, 99.0),
    );
    assert!(corrupted.is_empty(), "corrupted streams: {corrupted:?}");
    assert!(
        failed.is_empty(),
        "streams failed outside the restart windows (first 10): {:?}",
        &failed[..failed.len().min(10)]
    );
    assert!(ok > 0, "no stream got through");
}

/// When a short stream next gets through (polled), or `None` after 60 s.
async fn back_up(endpoint: &str) -> Option<Instant> {
    let give_up = Instant::now() + Duration::from_secs(60);
    while Instant::now() < give_up {
        let ex = Exchange { up: 16, up_seed: 1, down: 16, down_seed: 2 };
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), exchange(endpoint, ex, || async {})).await {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

//! Measurements, not assertions: run with `cargo xtask measure` (these tests are
//! `#[ignore]`d so the test suite never depends on timing). Prints throughput of 1 GiB
//! transfers, CPU-seconds per GiB of relay + agent, and the agent's resident memory idle,
//! with 8 busy streams and with 200 open streams.

use std::time::{Duration, Instant};

use sluice_e2e::load::{self, echo_server, sink_source_server};
use sluice_e2e::{Agent, Relay, test_dir};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The next transfer's report from a [`sink_source_server`], skipping the agent's
/// service probes (a TCP connect and close, so an empty report).
async fn next_transfer(reports: &mut tokio::sync::mpsc::UnboundedReceiver<load::SinkReport>) -> load::SinkReport {
    loop {
        let rep = reports.recv().await.expect("the backend stopped reporting");
        if rep.received > 0 {
            return rep;
        }
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with cargo xtask measure"]
async fn throughput_cpu_and_memory() {
    let dir = test_dir("measure");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    // Upload direction: the service only receives.
    let (up_backend, mut up_reports) = sink_source_server(0, 0).await;
    let agent = Agent::for_service(dir.path(), "bulk", up_backend.port(), &jwt);
    relay.wait_status("bulk", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("bulk");
    let relay_pid = relay.proc.as_ref().unwrap().child.id();
    let agent_pid = agent.proc.child.id();
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("agent RSS idle (pool warm): {} KiB", rss_kib(agent_pid));

    for round in 0..3 {
        let cpu0 = cpu_secs(relay_pid) + cpu_secs(agent_pid);
        let t = Instant::now();
        let s = TcpStream::connect(&ep).await.unwrap();
        let (_r, mut w) = s.into_split();
        load::send(&mut w, GIB, round).await.unwrap();
        let rep = next_transfer(&mut up_reports).await;
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(rep.received, GIB);
        let cpu = cpu_secs(relay_pid) + cpu_secs(agent_pid) - cpu0;
        println!(
            "1 GiB client→service, round {round}: {secs:.2} s = {:.2} Gbit/s; relay+agent CPU {cpu:.2} s/GiB",
            8.0 * GIB as f64 / secs / 1e9
        );
    }

    // 8 concurrent busy streams (256 MiB each), RSS sampled while they run.
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(&ep).await.unwrap();
            let (_r, mut w) = s.into_split();
            load::send(&mut w, 256 << 20, 100 + i).await.unwrap();
        }));
    }
    let t = Instant::now();
    let mut peak = 0;
    while !tasks.iter().all(|t| t.is_finished()) {
        peak = peak.max(rss_kib(agent_pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..8 {
        next_transfer(&mut up_reports).await;
    }
    println!(
        "8 streams × 256 MiB: {:.2} Gbit/s aggregate; agent RSS peak {peak} KiB",
        8.0 * 8.0 * (256u64 << 20) as f64 / t.elapsed().as_secs_f64() / 1e9
    );

    // 200 open (idle after a first echo) streams.
    let echo = echo_server().await;
    let agent2 = Agent::for_service(dir.path(), "many", echo.port(), &jwt);
    relay.wait_status("many", "AVAILABLE", Some(&agent2));
    let ep2 = relay.endpoint("many");
    let mut open = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(&ep2).await.unwrap();
        s.write_all(b"x").await.unwrap();
        open.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!("agent RSS with 200 open streams: {} KiB", rss_kib(agent2.proc.child.id()));
    drop(open);
}

/// Throughput of 1 GiB transfers with the eBPF counter attached and with no program
/// attached at all (user-space counting), interleaved in one run; also prints one
/// `sluice streams` frame taken mid-transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement; run with cargo xtask measure"]
async fn ebpf_counting_overhead() {
    let dir = test_dir("measure-ebpf");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let (backend, mut reports) = sink_source_server(0, 0).await;
    let port = backend.port().to_string();
    let mut results: Vec<(&str, f64)> = Vec::new();
    for round in 0..3u64 {
        for counter in ["auto", "userspace"] {
            let mut agent = Agent::start(
                dir.path(),
                &format!("bulk-{counter}-{round}"),
                &[
                    ("APP_HOST", "127.0.0.1"),
                    ("APP_PORT", &port),
                    ("NAME", "bulk"),
                    ("REGISTRATION_JWT", &jwt),
                    ("SLUICE_COUNTER", counter),
                ],
            );
            relay.wait_status("bulk", "AVAILABLE", Some(&agent));
            let ebpf = agent.proc.log_text().contains("counting stream bytes with eBPF");
            let label = if ebpf { "eBPF attached" } else { "no program" };
            let ep = relay.endpoint("bulk");
            let t = Instant::now();
            let s = TcpStream::connect(&ep).await.unwrap();
            let (_r, mut w) = s.into_split();
            let send = tokio::spawn(async move { load::send(&mut w, GIB, 3).await.unwrap() });
            if round == 0 && ebpf {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                println!("`sluice streams` during a transfer:\n{}", relay.cli_ok(&["streams"]));
            }
            send.await.unwrap();
            assert_eq!(next_transfer(&mut reports).await.received, GIB);
            let gbps = 8.0 * GIB as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!("round {round}, {label}: {gbps:.2} Gbit/s");
            results.push((label, gbps));
            agent.proc.kill();
            relay.wait_status("bulk", "UNAVAILABLE", None);
        }
    }
    let median = |label: &str| {
        let mut v: Vec<f64> = results.iter().filter(|r| r.0 == label).map(|r| r.1).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (with, without) = (median("eBPF attached"), median("no program"));
    println!(
        "median: eBPF attached {with:.2} Gbit/s, no program {without:.2} Gbit/s, difference {:+.1}%",
        (with - without) / without * 100.0
    );
}

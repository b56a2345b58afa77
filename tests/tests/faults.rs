//! Network faults on a real path (issue #11, "Faults"): the agent runs in a network
//! namespace of the test's own, joined to the host by a veth pair, and nftables in that
//! namespace drops packets. Each stream either completes with equal SHA-256 at both ends
//! or fails visibly. Latency (netem) runs in the kTLS VM: this kernel has no qdisc.
//!
//! Needs root and `ip`, `nft`, `ethtool` (`scripts/install-test-deps.sh`); without them
//! each test says why and passes as skipped. Traffic stays on the test's own veth.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_e2e::load::{echo_server_at, expected_digest, receive, send, sink_source_server_at};
use sluice_e2e::netns::Netns;
use sluice_e2e::{Agent, Relay, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The namespace, or `None` (with the reason printed) where this machine cannot make one.
fn netns() -> Option<Netns> {
    match Netns::create() {
        Ok(ns) => Some(ns),
        Err(why) if std::env::var_os("CI").is_some() => panic!("network namespaces are needed in CI: {why}"),
        Err(why) => {
            eprintln!("skipped: cannot create a network namespace: {why}");
            None
        }
    }
}

/// A relay whose agent port listens on the host's end of the veth, so the agent in the
/// namespace can dial it; its resource ports stay on loopback for the test's clients.
fn relay_for(ns: &Netns, dir: &std::path::Path, extra: &[&str]) -> Relay {
    let host = ns.host_ip.to_string();
    let mut args = vec!["--agent-host", host.as_str()];
    args.extend_from_slice(extra);
    Relay::start_with(dir, &args)
}

/// An agent inside the namespace for the service at `service`.
fn agent_in(ns: &Netns, dir: &std::path::Path, name: &str, service: SocketAddr, jwt: &str) -> Agent {
    Agent::start_in(
        ns,
        dir,
        name,
        &[
            ("APP_HOST", &service.ip().to_string()),
            ("APP_PORT", &service.port().to_string()),
            ("NAME", name),
            ("REGISTRATION_JWT", jwt),
        ],
    )
}

/// Sends `len` bytes up and reads the service's reply; checks both digests.
async fn transfer(
    endpoint: &str,
    len: u64,
    seed: u64,
    report: &mut tokio::sync::mpsc::UnboundedReceiver<sluice_e2e::load::SinkReport>,
    reply_len: u64,
    reply_seed: u64,
) {
    let s = TcpStream::connect(endpoint).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (sent, got) = tokio::join!(send(&mut w, len, seed), receive(&mut r));
    let sent = sent.expect("upload");
    let (n, digest) = got.expect("download");
    assert_eq!(n, reply_len, "every byte of the reply arrived");
    assert_eq!(digest, expected_digest(reply_len, reply_seed), "the reply arrived intact");
    let seen = tokio::time::timeout(Duration::from_secs(30), report.recv()).await.unwrap().unwrap();
    assert_eq!((seen.received, seen.received_digest), (len, sent), "the upload arrived intact");
}

async fn echo_once(endpoint: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(endpoint).await.map_err(|e| e.to_string())?;
    s.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), s.read_exact(&mut buf))
        .await
        .map_err(|_| "no echo within 20 s".to_owned())?
        .map_err(|e| e.to_string())?;
    (&buf == b"ping").then_some(()).ok_or_else(|| format!("echo {buf:?}"))
}

const MIB: u64 = 1024 * 1024;

/// 3 % of TCP packets dropped both ways between agent and relay (and service): the
/// enrollment, the session and a transfer each way all complete, bytes equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_percent_loss_slows_transfers_but_loses_nothing() {
    let Some(ns) = netns() else { return };
    let dir = test_dir("fault-loss");
    let relay = relay_for(&ns, dir.path(), &[]);
    let (service, mut report) = sink_source_server_at(IpAddr::V4(ns.host_ip), 32 * MIB, 7).await;
    ns.drop_percent(3).unwrap();
    let customer = relay.create_customer("Lossy");
    let agent = agent_in(&ns, dir.path(), "lossy", service, &relay.customer_jwt(&customer));
    relay.wait_status("lossy", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("lossy");
    let t = Instant::now();
    for seed in 1..=2 {
        transfer(&ep, 32 * MIB, seed, &mut report, 32 * MIB, 7).await;
    }
    let dropped = ns.dropped();
    eprintln!(
        "3 % loss: 2 × 32 MiB each way in {:.1} s, {dropped} packets dropped, digests equal",
        t.elapsed().as_secs_f64()
    );
    assert!(dropped > 100, "the loss rules must really drop packets (dropped {dropped})");
    ns.set_rules("").unwrap();
}

/// MTU 1280 on the path (the IPv6 minimum, common on tunnels): handshakes with
/// certificate chains and bulk data still pass, bytes equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1280_byte_mtu_carries_handshakes_and_bulk_data() {
    let Some(ns) = netns() else { return };
    let dir = test_dir("fault-mtu");
    ns.set_mtu(1280).unwrap();
    let relay = relay_for(&ns, dir.path(), &[]);
    let (service, mut report) = sink_source_server_at(IpAddr::V4(ns.host_ip), 16 * MIB, 9).await;
    let customer = relay.create_customer("Small MTU");
    let agent = agent_in(&ns, dir.path(), "mtu", service, &relay.customer_jwt(&customer));
    relay.wait_status("mtu", "AVAILABLE", Some(&agent));
    transfer(&relay.endpoint("mtu"), 16 * MIB, 3, &mut report, 16 * MIB, 9).await;
}

/// The agent's namespace drops every inbound new connection (the customer's firewall):
/// the agent only dials out, so enrollment, sessions and streams all work — and the
/// firewall is real (a connection into the namespace times out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_a_firewall_with_no_inbound_port_serves_everything() {
    let Some(ns) = netns() else { return };
    let dir = test_dir("fault-no-inbound");
    ns.no_inbound().unwrap();
    let relay = relay_for(&ns, dir.path(), &[]);
    let echo = echo_server_at(IpAddr::V4(ns.host_ip)).await;
    let customer = relay.create_customer("Firewalled");
    let agent = agent_in(&ns, dir.path(), "firewalled", echo, &relay.customer_jwt(&customer));
    relay.wait_status("firewalled", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("firewalled");
    let streams: Vec<_> = (0..16)
        .map(|_| {
            tokio::spawn({
                let ep = ep.clone();
                async move { echo_once(&ep).await }
            })
        })
        .collect();
    for s in streams {
        s.await.unwrap().expect("echo through the agent behind the firewall");
    }
    // Nothing may dial into the namespace: a SYN to it is dropped, not answered.
    let into = SocketAddr::new(IpAddr::V4(ns.ns_ip), 9);
    let tried = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(into)).await;
    assert!(tried.is_err(), "an inbound connection must be dropped by the namespace's firewall: {tried:?}");
}

/// 60 s of total silence on the path (a blackhole: every packet dropped, no reset): the
/// relay declares the agent dead within its heartbeat bound and the resource goes
/// offline; when the path returns the agent reconnects by itself and streams flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_blackhole_is_detected_and_healed() {
    let Some(ns) = netns() else { return };
    let dir = test_dir("fault-blackhole");
    // 2 s heartbeat: dead after 3 silent intervals (6 s) plus what the relay's own
    // scheduling adds; the bound below allows five times that for a busy machine.
    let relay = relay_for(&ns, dir.path(), &["--heartbeat-secs", "2"]);
    let echo = echo_server_at(IpAddr::V4(ns.host_ip)).await;
    let customer = relay.create_customer("Blackholed");
    let agent = agent_in(&ns, dir.path(), "blackholed", echo, &relay.customer_jwt(&customer));
    relay.wait_status("blackholed", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("blackholed");
    echo_once(&ep).await.unwrap();

    ns.blackhole().unwrap();
    let started = Instant::now();
    wait_for(Duration::from_secs(30), "the relay to declare the silent agent dead", || {
        (relay.status("blackholed").as_deref() != Some("AVAILABLE")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n--- relay ---\n{}", relay.log()));
    let detected = started.elapsed();
    eprintln!("blackhole: agent declared dead after {:.1} s (heartbeat 2 s × 3)", detected.as_secs_f64());
    assert!(echo_once(&ep).await.is_err(), "no stream may look served while the path is down");
    let rest = Duration::from_secs(60).saturating_sub(started.elapsed());
    tokio::time::sleep(rest).await;

    ns.set_rules("").unwrap();
    let healed = Instant::now();
    relay.wait_status("blackholed", "AVAILABLE", Some(&agent));
    eprintln!("blackhole lifted: agent back after {:.1} s", healed.elapsed().as_secs_f64());
    echo_once(&ep).await.expect("streams flow again after the blackhole");
}

// === The private service misbehaving, and the agent dying (loopback, no namespace) ===

/// A relay, a customer and an agent on loopback for the service at `port`.
fn loopback_setup(dir: &std::path::Path, name: &str, port: u16) -> (Relay, Agent, String) {
    let relay = Relay::start(dir);
    let customer = relay.create_customer(name);
    let agent = Agent::for_service(dir, name, port, &relay.customer_jwt(&customer));
    relay.wait_status(name, "AVAILABLE", Some(&agent));
    let ep = relay.endpoint(name);
    (relay, agent, ep)
}

/// Reads until EOF or error; `Ok(n)` only for a clean end after `n` bytes.
async fn read_to_end_or_error(s: &mut TcpStream) -> Result<u64, std::io::Error> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match s.read(&mut buf).await? {
            0 => return Ok(n),
            k => n += k as u64,
        }
    }
}

/// The service resets its connection mid-stream (a crashed backend, a killed query): the
/// platform's client sees a reset too, never a clean end that would pass for complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_that_resets_mid_stream_resets_the_client() {
    let dir = test_dir("fault-service-reset");
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = service.accept().await {
            tokio::spawn(async move {
                // The agent's service check connects and closes without a byte: leave it
                // be (the resource must look AVAILABLE). A client's request gets 1 MiB
                // of reply, then a reset instead of a FIN.
                let mut request = [0u8; 8];
                if !matches!(s.read(&mut request).await, Ok(n) if n > 0) {
                    return;
                }
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..16 {
                    if s.write_all(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = s.set_zero_linger();
                drop(s);
            });
        }
    });
    let (relay, agent, ep) = loopback_setup(dir.path(), "resetting", port);
    let mut client = TcpStream::connect(&ep).await.unwrap();
    client.write_all(b"SELECT 1").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), read_to_end_or_error(&mut client)).await.unwrap();
    assert!(
        got.is_err(),
        "a reset by the service must reach the client as a reset, not a clean end after {got:?} bytes\n--- relay ---\n{}\n--- agent ---\n{}",
        relay.log(),
        agent.proc.log_text()
    );
}

/// A service slow to accept (its accept loop stalled for 5 s; the kernel holds the
/// connection in its backlog): the stream waits and then completes, bytes equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_slow_to_accept_still_gets_every_byte() {
    let dir = test_dir("fault-slow-accept");
    let service = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = service.local_addr().unwrap().port();
    let stalled = Arc::new(AtomicBool::new(false));
    let stall = stalled.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = service.accept().await {
            if stall.swap(false, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let (relay, _agent, ep) = loopback_setup(dir.path(), "slow", port);
    stalled.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let s = TcpStream::connect(&ep).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (sent, got) = tokio::join!(send(&mut w, 4 * MIB, 11), receive(&mut r));
    let (n, digest) = got.unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!((n, digest), (4 * MIB, sent.unwrap()), "every byte came back, in order");
    eprintln!("slow accept: 4 MiB echoed in {:.1} s (5 s of it waiting for accept)", started.elapsed().as_secs_f64());
}

/// The agent SIGKILLed mid-transfer and started again: the stream under way fails
/// visibly (a reset, not a short clean end), and the restarted agent serves the next
/// transfer in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_transfer_fails_the_stream_visibly_and_serves_after_restart() {
    let dir = test_dir("fault-agent-restart");
    let (service, mut report) = sink_source_server_at("127.0.0.1".parse().unwrap(), 256 * MIB, 5).await;
    let relay = Relay::start(dir.path());
    let customer = relay.create_customer("Restarted");
    let jwt = relay.customer_jwt(&customer);
    let mut agent = Agent::for_service(dir.path(), "restarted", service.port(), &jwt);
    relay.wait_status("restarted", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("restarted");

    let mut client = TcpStream::connect(&ep).await.unwrap();
    client.write_all(b"start").await.unwrap();
    let mut first = [0u8; 1];
    client.read_exact(&mut first).await.unwrap();
    agent.proc.kill();
    let got = tokio::time::timeout(Duration::from_secs(60), read_to_end_or_error(&mut client)).await.unwrap();
    assert!(got.is_err(), "the cut stream must fail visibly, not end cleanly after {got:?} of 256 MiB");

    // Same state directory: the agent comes back with its identity.
    let agent = Agent::for_service(dir.path(), "restarted", service.port(), &jwt);
    relay.wait_status("restarted", "AVAILABLE", Some(&agent));
    while report.try_recv().is_ok() {}
    let s = TcpStream::connect(&ep).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move { receive(&mut r).await });
    let sent = send(&mut w, 2 * MIB, 12).await.unwrap();
    let (n, digest) = reader.await.unwrap().unwrap();
    assert_eq!((n, digest), (256 * MIB, expected_digest(256 * MIB, 5)), "the full reply after the restart");
    let seen = tokio::time::timeout(Duration::from_secs(30), report.recv()).await.unwrap().unwrap();
    assert_eq!((seen.received, seen.received_digest), (2 * MIB, sent), "the upload after the restart");
}

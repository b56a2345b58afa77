//! Failures are visible, never silent (#11 rows 7 and 8), with real processes:
//!
//! - one of two agents stopped (SIGSTOP): new clients go to the live agent within a few
//!   seconds (the stream-open deadline), not after 20 s and a reset;
//! - a relay or agent killed (SIGKILL) mid-transfer: the client or the private service
//!   sees a reset, never a clean end of a truncated stream.

use std::path::Path;
use std::time::{Duration, Instant};

use sluice_e2e::load::{self, echo_server, sink_source_server};
use sluice_e2e::{Agent, Relay, http_get, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GIB: u64 = 1 << 30;
/// Bytes that must have moved before a process is killed mid-transfer.
const KILL_AFTER: u64 = 32 << 20;

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// An agent `label` of resource `name` for the service on `port`.
fn agent(dir: &Path, label: &str, name: &str, port: u16, jwt: &str) -> Agent {
    let port = port.to_string();
    let env = [("APP_HOST", "127.0.0.1"), ("APP_PORT", port.as_str()), ("NAME", name), ("REGISTRATION_JWT", jwt)];
    Agent::start(dir, label, &env)
}

/// Relay (with `relay_args`) + one agent for `name` pointing at `port`, AVAILABLE.
fn setup(dir: &Path, name: &str, port: u16, relay_args: &[&str]) -> (Relay, Agent, String) {
    let relay = Relay::start_with(dir, relay_args);
    let jwt = relay.customer_jwt(&relay.create_customer("acme"));
    let agent = agent(dir, name, name, port, &jwt);
    relay.wait_status(name, "AVAILABLE", Some(&agent));
    let ep = relay.endpoint(name);
    (relay, agent, ep)
}

/// One echo round trip on a fresh connection: what came back, or why not.
async fn echo_once(ep: &str, msg: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect(ep).await.map_err(|e| format!("connect: {e}"))?;
    s.write_all(msg).await.map_err(|e| format!("write: {e}"))?;
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.map_err(|e| format!("read: {e}"))?;
    if back == msg { Ok(()) } else { Err(format!("echo came back as {} bytes: {back:?}", back.len())) }
}

/// The relay's `sluice_relay_stream_probes_total`, summed over resources.
fn stream_probes(relay: &Relay) -> f64 {
    let (_, body) = http_get(&format!("127.0.0.1:{}", relay.admin_port), "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with("sluice_relay_stream_probes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many distinct agents the relay's log shows closing a stream.
fn serving_agents(log: &str) -> usize {
    let agents: std::collections::HashSet<&str> = log
        .lines()
        .filter(|l| l.contains("stream closed"))
        .filter_map(|l| l.split(" agent=").nth(1)?.split_whitespace().next())
        .collect();
    agents.len()
}

/// Row 7: of two agents of one resource, one is stopped. Its idle data connections stay
/// open at the relay, and with the default 10 s heartbeat it is declared dead only after
/// 30 s; until then, every stream must still reach the live agent within a few seconds
/// (the first one that tries the stopped agent waits the 3 s stream-open deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_agent_loses_its_streams_to_the_live_one_within_seconds() {
    let dir = test_dir("stalled");
    let echo = echo_server().await;
    let relay = Relay::start_with(dir.path(), &["--heartbeat-secs", "10"]);
    let jwt = relay.customer_jwt(&relay.create_customer("acme"));
    let live = agent(dir.path(), "live", "pair", echo.port(), &jwt);
    let stopped = agent(dir.path(), "stopped", "pair", echo.port(), &jwt);
    wait_for(Duration::from_secs(30), "both agents connected", || {
        (relay.resource("pair").is_some_and(|r| r["agents"] == 2)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    let ep = relay.endpoint("pair");
    // Until both agents have served a stream (their pools are parked at the relay, and
    // streams alternate between them).
    let warm = Instant::now();
    while serving_agents(&relay.log()) < 2 {
        assert!(warm.elapsed() < Duration::from_secs(30), "one agent serves nothing\n{}", relay.log());
        echo_once(&ep, b"warm-up").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Streams answered in time cost no control message: no probe went out.
    assert_eq!(stream_probes(&relay), 0.0, "pings sent for streams the agents answered at once");

    let pid = stopped.proc.child.id();
    signal(pid, "-STOP");
    let mut slowest = Duration::ZERO;
    let mut failures = Vec::new();
    for i in 0..8 {
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(30), echo_once(&ep, format!("client-{i}").as_bytes())).await;
        let took = started.elapsed();
        slowest = slowest.max(took);
        match r {
            Ok(Ok(())) if took < Duration::from_secs(10) => {}
            Ok(Ok(())) => failures.push(format!("client {i} took {took:?}")),
            Ok(Err(e)) => failures.push(format!("client {i} failed after {took:?}: {e}")),
            Err(_) => failures.push(format!("client {i} still waiting after {took:?}")),
        }
    }
    let stalled_logged = relay.log().contains("answers neither a new stream nor a ping");
    assert!(stream_probes(&relay) >= 1.0, "the stopped agent was never probed\n{}", relay.log());
    signal(pid, "-CONT");
    eprintln!("8 clients with one of two agents stopped: slowest round trip {slowest:?}");
    assert!(failures.is_empty(), "{failures:?}\n--- relay log ---\n{}", relay.log());
    assert!(stalled_logged, "the relay says which agent stalled\n{}", relay.log());
    // Once it runs again it answers the relay's next ping and takes streams again.
    wait_for(Duration::from_secs(30), "the stopped agent to be taken back", || {
        relay.log().contains("the stalled agent answers again").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    for i in 0..4 {
        echo_once(&ep, format!("after-{i}").as_bytes()).await.unwrap();
    }
    drop((live, stopped));
}

/// Reads from `s` until EOF or error, calling `at_kill` once `KILL_AFTER` bytes arrived.
async fn read_killing(s: &mut TcpStream, mut at_kill: impl FnMut()) -> (u64, std::io::Result<()>) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let mut killed = false;
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (total, Ok(())),
            Ok(n) => total += n as u64,
            Err(e) => return (total, Err(e)),
        }
        if !killed && total >= KILL_AFTER {
            killed = true;
            at_kill();
        }
    }
}

/// A download of 1 GiB from the private service, with `kill` run mid-way: the client's
/// read must end in an error before the full length, never in a clean EOF.
async fn download_with_kill(name: &str, kill: impl FnOnce(&mut Relay, &mut Agent)) {
    let dir = test_dir(name);
    let (backend, _reports) = sink_source_server(GIB, 7).await;
    let (mut relay, mut agent, ep) = setup(dir.path(), name, backend.port(), &[]);
    let mut s = TcpStream::connect(&ep).await.unwrap();
    s.shutdown().await.unwrap(); // an empty request; the service answers with 1 GiB
    let mut kill = Some(kill);
    let (got, end) = tokio::time::timeout(
        Duration::from_secs(60),
        read_killing(&mut s, || (kill.take().unwrap())(&mut relay, &mut agent)),
    )
    .await
    .expect("the client's read neither ended nor failed");
    eprintln!("{name}: the client read {} MiB, then {end:?}", got >> 20);
    assert!(got < GIB, "the transfer finished before the kill: make it longer");
    let e = end.expect_err("a truncated download ended in a clean EOF: the client cannot tell it is incomplete");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// Row 8: the relay SIGKILLed mid-download. The kernel closes the relay's client socket;
/// armed with zero linger it sends RST, not the FIN that ended the old truncated stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_download_resets_the_client() {
    download_with_kill("killrelay-down", |relay, _| relay.stop()).await;
}

/// The agent SIGKILLed mid-download: the relay sees the tunnel end without TLS
/// close_notify (a truncation) and resets the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_download_resets_the_client() {
    download_with_kill("killagent-down", |_, agent| agent.proc.kill()).await;
}

/// A private service that counts what it receives and reports, per connection that
/// received anything (not the agent's reachability checks), the byte count and whether
/// the stream ended in a clean EOF or an error.
async fn counting_service() -> (u16, tokio::sync::mpsc::UnboundedReceiver<(u64, std::io::Result<()>)>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                let end = loop {
                    match s.read(&mut buf).await {
                        Ok(0) => break Ok(()),
                        Ok(n) => total += n as u64,
                        Err(e) => break Err(e),
                    }
                };
                if total > 0 {
                    let _ = tx.send((total, end));
                }
            });
        }
    });
    (port, rx)
}

/// An upload of up to 1 GiB to the private service, with `kill` run once `KILL_AFTER`
/// bytes were written: the service's read must end in an error, never a clean EOF.
async fn upload_with_kill(name: &str, kill: impl FnOnce(&mut Relay, &mut Agent)) {
    let dir = test_dir(name);
    let (port, mut ends) = counting_service().await;
    let (mut relay, mut agent, ep) = setup(dir.path(), name, port, &[]);
    let mut s = TcpStream::connect(&ep).await.unwrap();
    let mut payload = load::Payload::new(9);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    let mut kill = Some(kill);
    let write_end = tokio::time::timeout(Duration::from_secs(60), async {
        while sent < GIB {
            payload.fill(&mut buf);
            s.write_all(&buf).await?;
            sent += buf.len() as u64;
            if sent >= KILL_AFTER
                && let Some(k) = kill.take()
            {
                k(&mut relay, &mut agent);
            }
        }
        s.shutdown().await
    })
    .await
    .expect("the client's writes neither ended nor failed");
    let (got, end) = tokio::time::timeout(Duration::from_secs(60), ends.recv())
        .await
        .expect("the service's read neither ended nor failed")
        .unwrap();
    eprintln!("{name}: the service read {} MiB, then {end:?} (client: {write_end:?})", got >> 20);
    assert!(got < GIB, "the transfer finished before the kill: make it longer");
    let e = end.expect_err("a truncated upload ended in a clean EOF: the service cannot tell it is incomplete");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
}

/// The relay SIGKILLed mid-upload: the agent sees the tunnel end without TLS
/// close_notify (a truncation) and resets the private service's connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_upload_resets_the_service() {
    upload_with_kill("killrelay-up", |relay, _| relay.stop()).await;
}

/// The agent SIGKILLed mid-upload: the kernel closes its socket to the private service;
/// armed with zero linger it sends RST, not a FIN that would end the upload cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_upload_resets_the_service() {
    upload_with_kill("killagent-up", |_, agent| agent.proc.kill()).await;
}

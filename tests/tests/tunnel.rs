//! End-to-end behaviour of the tunnel on loopback: integrity of a large transfer in both
//! directions, half-close, many concurrent streams, a refusing backend, a relay restart.

use std::time::{Duration, Instant};

use sluice_e2e::load::{self, echo_server, sink_source_server};
use sluice_e2e::{Agent, Relay, free_port, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;

/// Relay + one agent for `name` pointing at `port`, AVAILABLE.
fn setup(dir: &std::path::Path, name: &str, port: u16) -> (Relay, Agent, String) {
    setup_expecting(dir, name, port, "AVAILABLE")
}

/// Like [`setup`], waiting for `status` (a service that refuses shows SERVICE_UNREACHABLE).
fn setup_expecting(dir: &std::path::Path, name: &str, port: u16, status: &str) -> (Relay, Agent, String) {
    let relay = Relay::start(dir);
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let agent = Agent::for_service(dir, name, port, &jwt);
    relay.wait_status(name, status, Some(&agent));
    let ep = relay.endpoint(name);
    (relay, agent, ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_each_way_arrives_intact() {
    let dir = test_dir("gib");
    let (backend, mut reports) = sink_source_server(GIB, 2).await;
    let (relay, agent, ep) = setup(dir.path(), "bulk", backend.port());

    let started = Instant::now();
    let s = TcpStream::connect(&ep).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (sent, got) = tokio::join!(load::send(&mut w, GIB, 1), load::receive(&mut r));
    let secs = started.elapsed().as_secs_f64();
    let sent = sent.unwrap();
    let (got_len, got_digest) = got.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();

    assert_eq!(report.received, GIB, "backend received every byte");
    assert_eq!(report.received_digest, sent, "client → service bytes are identical");
    assert_eq!(got_len, GIB, "client received every byte");
    assert_eq!(got_digest, report.sent_digest, "service → client bytes are identical");
    assert_eq!(sent, load::expected_digest(GIB, 1));
    eprintln!("1 GiB each way (2 GiB total) in {secs:.2} s: {:.0} MiB/s per direction", 1024.0 / secs);
    drop((relay, agent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_lets_the_client_read_the_reply() {
    let dir = test_dir("halfclose");
    // A service that reads the whole request (until the client's FIN), then answers.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                s.read_to_end(&mut req).await.unwrap();
                s.write_all(format!("got {} bytes", req.len()).as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    let (_relay, _agent, ep) = setup(dir.path(), "halfclose", port);
    for size in [0usize, 1, 100_000] {
        let mut s = TcpStream::connect(&ep).await.unwrap();
        s.write_all(&vec![7u8; size]).await.unwrap();
        s.shutdown().await.unwrap(); // half-close: no more writes, still reading
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut reply)).await.unwrap().unwrap();
        assert_eq!(reply, format!("got {size} bytes"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_streams() {
    let dir = test_dir("concurrent");
    let echo = echo_server().await;
    let (relay, agent, ep) = setup(dir.path(), "many", echo.port());
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(&ep).await?;
            let (mut r, mut w) = s.into_split();
            let (sent, got) = tokio::join!(load::send(&mut w, 64 * 1024 + i, i), load::receive(&mut r));
            let (n, digest) = got?;
            anyhow::ensure!(n == 64 * 1024 + i && digest == sent?, "stream {i} came back different");
            Ok::<_, anyhow::Error>(())
        }));
    }
    // Hold all 200 open at once: every stream is still running when the last connects.
    for (i, t) in tasks.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap_or_else(|_| panic!("stream {i} hung\n{}", relay.log()))
            .unwrap()
            .unwrap_or_else(|e| {
                panic!("{e}\n--- relay ---\n{}\n--- agent ---\n{}", relay.log(), agent.proc.log_text())
            });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_backend_closes_the_client_promptly() {
    let dir = test_dir("refuse");
    let closed_port = free_port(); // nothing listens here
    let (relay, _agent, ep) = setup_expecting(dir.path(), "down", closed_port, "SERVICE_UNREACHABLE");
    let started = Instant::now();
    // The relay resets the client's connection; on loopback the reset may even beat
    // the client's connect() call, which then reports it.
    let r = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(&ep).await?;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    })
    .await;
    let closed = matches!(r, Ok(Ok(0)) | Ok(Err(_)));
    assert!(closed, "client connection should be closed, got {r:?}");
    eprintln!("client closed {:?} after connecting to a refusing backend", started.elapsed());
    wait_for(Duration::from_secs(10), "the relay's log line saying why", || {
        relay.log().contains("refused").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_means_connection_refused() {
    let dir = test_dir("noagent");
    let echo = echo_server().await;
    let (relay, mut agent, ep) = setup(dir.path(), "gone", echo.port());
    agent.proc.kill();
    relay.wait_status("gone", "UNAVAILABLE", None);
    let err = TcpStream::connect(&ep).await.expect_err("port must not accept without an agent");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reconnects_after_relay_restart() {
    let dir = test_dir("restart");
    let echo = echo_server().await;
    let (mut relay, agent, ep) = setup(dir.path(), "sticky", echo.port());
    relay.restart();
    relay.wait_status("sticky", "AVAILABLE", Some(&agent));
    assert_eq!(relay.endpoint("sticky"), ep, "the resource keeps its port across restarts");
    let ok = wait_for(Duration::from_secs(10), "an echo through the restarted relay", || {
        let rt = tokio::runtime::Handle::current();
        let ep = ep.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                let mut s = TcpStream::connect(&ep).await.ok()?;
                s.write_all(b"again").await.ok()?;
                s.shutdown().await.ok()?;
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.ok()?;
                (back == b"again").then_some(())
            })
        })
        .join()
        .unwrap()
    });
    ok.unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_relay_is_declared_dead_and_the_agent_comes_back() {
    let dir = test_dir("deadpeer");
    let echo = echo_server().await;
    let (relay, agent, _ep) = setup(dir.path(), "frozen", echo.port());
    let pid = relay.proc.as_ref().unwrap().child.id().to_string();
    // SIGSTOP: the relay's sockets stay open but it says nothing (like a network partition).
    assert!(std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    let seen = wait_for(Duration::from_secs(15), "the agent to declare the relay dead", || {
        agent.proc.log_text().contains("no word from the relay").then_some(())
    });
    assert!(std::process::Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    seen.unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    relay.wait_status("frozen", "AVAILABLE", Some(&agent));
}

#[test]
fn unreachable_relay_is_retried_and_logged() {
    let dir = test_dir("unreachable");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&cid);
    let mut agent = Agent::start(
        dir.path(),
        "lonely",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", "9"),
            ("NAME", "lonely"),
            ("REGISTRATION_JWT", &jwt),
            ("SLUICE_URL", &format!("https://127.0.0.1:{}", free_port())),
        ],
    );
    wait_for(Duration::from_secs(15), "two logged retries", || {
        (agent.proc.log_text().matches("relay unreachable; will retry").count() >= 2).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    assert!(agent.proc.log_text().contains("Connection refused"), "says why: {}", agent.proc.log_text());
    assert!(agent.proc.is_running(), "an unreachable relay is not fatal");
}

/// Something at the relay's address accepts TCP but never answers TLS (a proxy or
/// firewall holding connections, a wrong service): enrollment gives up after the
/// handshake timeout with a line that says so, instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_against_a_silent_endpoint_times_out_with_a_reason() {
    let dir = test_dir("silent-relay");
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    // Accepts connections and holds them, reading nothing and sending nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming() {
            held.push(c);
        }
    });
    let agent = Agent::start(
        dir.path(),
        "silent",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", "9"),
            ("NAME", "silent"),
            ("REGISTRATION_JWT", &relay.customer_jwt(&cid)),
            ("SLUICE_URL", &format!("https://127.0.0.1:{port}")),
        ],
    );
    // The handshake timeout is 15 s; allow for a machine at half speed.
    let line = wait_for(Duration::from_secs(60), "the enrollment to time out", || {
        agent.proc.log_text().lines().find(|l| l.contains("timed out after")).map(str::to_owned)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    assert!(line.contains(&format!("127.0.0.1:{port}")) && line.contains("TLS handshake"), "{line}");
}

/// A stream survives many TLS key updates on the user-space path: the agent's TLS
/// updates its keys every 16 records (`SLUICE_TLS_KEY_UPDATE_RECORDS`, the testing knob
/// of docs/ktls.md "Key updates"), about 16 times for the 4 MiB it sends (256 full
/// records), and the relay follows each one; the agent warns that the knob is set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_many_tls_key_updates() {
    const MIB4: u64 = 4 << 20;
    let dir = test_dir("keyupdate");
    let (backend, mut reports) = sink_source_server(MIB4, 3).await;
    let relay = Relay::start(dir.path());
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let port = backend.port().to_string();
    let agent = Agent::start(
        dir.path(),
        "keyupdate",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &port),
            ("NAME", "keyupdate"),
            ("REGISTRATION_JWT", &jwt),
            ("SLUICE_TLS_KEY_UPDATE_RECORDS", "16"),
        ],
    );
    relay.wait_status("keyupdate", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("keyupdate");

    let s = TcpStream::connect(&ep).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (sent, got) = tokio::join!(load::send(&mut w, MIB4, 3), load::receive(&mut r));
    let sent = sent.unwrap();
    let (got_len, got_digest) = got.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();
    assert_eq!((report.received, report.received_digest), (MIB4, sent), "client → service bytes");
    assert_eq!((got_len, got_digest), (MIB4, report.sent_digest), "service → client bytes");
    let log = agent.proc.log_text();
    assert!(
        log.contains("SLUICE_TLS_KEY_UPDATE_RECORDS=16 is set"),
        "the agent must warn that the testing knob is set:\n{log}"
    );
    drop((relay, agent));
}

//! Data-connection reuse (docs/protocol.md, "Reusing a data connection"): when relay
//! and agent both run streams on user-space TLS, a stream's payload is framed and its
//! data connection carries the next stream after a clean end, so sequential streams
//! cost no new TLS handshakes. Every byte still arrives exactly, in both half-close
//! orders; an aborted stream's connection is closed, never reused; and
//! `SLUICE_DATA_REUSE=off` gives each stream its own connection again (tests/pool.rs).

use std::net::SocketAddr;
use std::time::Duration;

use sluice_e2e::load::{self, Exchange, exchange, exchange_server, sink_source_server};
use sluice_e2e::{Agent, Relay, metric_sum, metrics_page, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The sum of a counter's series (any labels) on the relay's metrics page.
fn relay_counter(relay: &Relay, name: &str) -> f64 {
    metric_sum(&metrics_page(&format!("127.0.0.1:{}", relay.admin_port)).unwrap_or_default(), name)
}

fn handshakes(relay: &Relay) -> f64 {
    relay_counter(relay, "sluice_relay_data_handshakes_total")
}

fn reused(relay: &Relay) -> f64 {
    relay_counter(relay, "sluice_relay_data_reused_total")
}

/// Starts an agent for resource `name` in front of `service` and waits until its pool
/// of 4 data connections is up.
fn agent_for(relay: &Relay, dir: &std::path::Path, name: &str, service: SocketAddr) -> Agent {
    let cid = relay.create_customer(&format!("{name}-customer"));
    let agent = Agent::start(
        dir,
        name,
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &service.port().to_string()),
            ("NAME", name),
            ("REGISTRATION_JWT", &relay.customer_jwt(&cid)),
        ],
    );
    relay.wait_status(name, "AVAILABLE", Some(&agent));
    agent
}

/// Sizes around the 65,532-byte chunk a 64 KiB buffer holds behind its header, an
/// empty upload (the end marker right after the open) and an empty reply (the service
/// answers only after the upload, with the exchange's trailer).
const SIZES: [(u64, u64); 9] = [
    (0, 1),
    (1, 1),
    (0, 65_532),
    (65_532, 65_533),
    (65_533, 65_532),
    (131_064, 7),
    (3, 300_000),
    (250_000, 250_001),
    (70_000, 0),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streams_reuse_their_connections_and_every_byte_arrives() {
    let dir = test_dir("reuse-seq");
    let service = exchange_server().await;
    let relay = Relay::start(dir.path());
    let agent = agent_for(&relay, dir.path(), "seq", service);
    assert!(
        relay.log().contains("data connections: reused for the next stream"),
        "the relay says it reuses data connections\n{}",
        relay.log()
    );
    let ep = relay.endpoint("seq");
    let before = wait_for(Duration::from_secs(20), "the agent's warm pool to be handshaken", || {
        let h = handshakes(&relay);
        (h >= 4.0).then_some(h)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));

    const STREAMS: usize = 240;
    for i in 0..STREAMS {
        let (up, down) = SIZES[i % SIZES.len()];
        let ex = Exchange { up, up_seed: i as u64, down, down_seed: 1000 + i as u64 };
        if let Err(e) = exchange(&ep, ex, || async {}).await {
            panic!("stream {i} ({up} up, {down} down): {e:?}\n{}\n{}", relay.log(), agent.proc.log_text());
        }
    }
    // The last stream's connection is parked just after its client saw the end.
    let reused_now = wait_for(Duration::from_secs(10), "the last connection back in the pool", || {
        let r = reused(&relay);
        (r >= STREAMS as f64 - 1.0).then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}: {} reused\n{}", reused(&relay), relay.log()));
    let new_handshakes = handshakes(&relay) - before;
    eprintln!("{STREAMS} streams: {reused_now} connections reused, {new_handshakes} new data handshakes");
    // A stream still running after 50 ms (a slow machine) has a replacement opened for
    // it, so a few handshakes may happen; one per stream is what reuse removes.
    assert!(new_handshakes <= 12.0, "{new_handshakes} data handshakes for {STREAMS} sequential streams");
}

/// A service that closes its side first (it sends nothing) while the client still
/// uploads, then one that answers after the client's close: both orders end cleanly
/// on reused connections, with every byte counted by the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_half_close_orders_end_cleanly_on_a_reused_connection() {
    let dir = test_dir("reuse-halfclose");
    let (sink, mut reports) = sink_source_server(0, 7).await;
    let echo = load::echo_server().await;
    let relay = Relay::start(dir.path());
    let _sink_agent = agent_for(&relay, dir.path(), "sink", sink);
    let _echo_agent = agent_for(&relay, dir.path(), "echo", echo);
    for i in 0..12u64 {
        // Service first: its FIN (an empty reply) crosses while the upload runs.
        let len = 100_000 + i * 33_333;
        let s = TcpStream::connect(relay.endpoint("sink")).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let (sent, got) = tokio::join!(load::send(&mut w, len, i), load::receive(&mut r));
        let digest = sent.unwrap();
        assert_eq!(got.unwrap().0, 0, "the sink sends nothing");
        // The agent's probe of the service (connect, close) reports an empty connection.
        let report = loop {
            let r = tokio::time::timeout(Duration::from_secs(30), reports.recv()).await.unwrap().unwrap();
            if r.received > 0 {
                break r;
            }
        };
        assert_eq!((report.received, report.received_digest), (len, digest), "stream {i} upload");

        // Client first: the echo answers after the client's FIN has crossed.
        let mut s = TcpStream::connect(relay.endpoint("echo")).await.unwrap();
        let data: Vec<u8> = (0..len as usize + 1).map(|b| (b * 31 + i as usize) as u8).collect();
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert!(back == data, "stream {i}: echo of {} bytes came back as {} bytes", data.len(), back.len());
    }
    let r = wait_for(Duration::from_secs(10), "24 connections reused", || {
        let r = reused(&relay);
        (r >= 23.0).then_some(r)
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", reused(&relay), relay.log()));
    eprintln!("24 streams, {r} connections reused");
}

/// A service that resets a connection whose first byte is `0xEE` and echoes the
/// others: the aborted stream's data connection is closed, not reused, and the next
/// streams work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_stream_closes_its_connection_and_the_next_stream_works() {
    const RESET_ME: u8 = 0xEE;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let service = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut first = true;
                while let Ok(k) = s.read(&mut buf).await {
                    if k > 0 && first && buf[0] == RESET_ME {
                        let _ = s.set_zero_linger();
                        return;
                    }
                    first = false;
                    if k == 0 || s.write_all(&buf[..k]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dir = test_dir("reuse-abort");
    let relay = Relay::start(dir.path());
    let _agent = agent_for(&relay, dir.path(), "abort", service);
    let ep = relay.endpoint("abort");
    // A first stream, so the one aborted below runs on a reused connection.
    let mut s = TcpStream::connect(&ep).await.unwrap();
    s.write_all(b"warm").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"warm");
    wait_for(Duration::from_secs(10), "the first stream's connection reused", || (reused(&relay) >= 1.0).then_some(()))
        .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    let reused_before = reused(&relay);

    let mut s = TcpStream::connect(&ep).await.unwrap();
    s.write_all(&[RESET_ME; 1000]).await.unwrap();
    let mut rest = Vec::new();
    let cut = s.read_to_end(&mut rest).await;
    assert!(cut.is_err(), "the client of an aborted stream sees a reset, not a clean end: {cut:?}");
    wait_for(Duration::from_secs(10), "the relay to log the aborted stream", || {
        relay.log().contains("stream ended abnormally").then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!(reused(&relay), reused_before, "an aborted stream's connection went back to the pool");

    for i in 0..5u8 {
        let mut s = TcpStream::connect(&ep).await.unwrap();
        s.write_all(&[i; 5000]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, vec![i; 5000], "stream {i} after the abort");
    }
    wait_for(Duration::from_secs(10), "the streams after the abort reused", || {
        (reused(&relay) >= reused_before + 4.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", reused(&relay), relay.log()));
}

/// A client that speaks first has its first bytes sent with the stream's open (the
/// relay does not wait for the agent's answer to forward them), and they reach the
/// service exactly once: each echo carries back exactly what was sent, and the relay's
/// byte totals count them. (Clients that wait for the service to speak first, as SSH
/// does, send nothing early: `real_services.rs` runs sftp through the tunnel.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_first_bytes_go_with_the_open_and_arrive_once() {
    let dir = test_dir("reuse-first");
    let service = load::echo_server().await;
    let relay = Relay::start(dir.path());
    let _agent = agent_for(&relay, dir.path(), "first", service);
    let ep = relay.endpoint("first");
    for i in 0..100u32 {
        let mut s = TcpStream::connect(&ep).await.unwrap();
        let msg = format!("request {i}: {}", "x".repeat(i as usize * 37));
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back)).await.unwrap().unwrap();
        assert_eq!(back, msg.as_bytes(), "stream {i}: the echo is what was sent, once");
    }
    let early = relay_counter(&relay, "sluice_relay_first_bytes_with_open_total");
    eprintln!("{early} of 100 streams sent their first bytes with the open");
    assert!(early > 0.0, "a client that writes at once has its first bytes sent with the open");
    // Every stream's bytes are in the relay's totals, those sent early included.
    let sent: usize = (0..100usize).map(|i| format!("request {i}: ").len() + i * 37).sum();
    wait_for(Duration::from_secs(10), "the relay's byte totals", || {
        (relay_counter(&relay, "sluice_relay_bytes_total") == (2 * sent) as f64).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {} counted", relay_counter(&relay, "sluice_relay_bytes_total")));
}

//! Graceful drain: SIGTERM on the relay or on the agent stops new streams at once, lets
//! the stream under way finish (equal SHA-256 at both ends), and the process exits 0
//! well within its drain deadline.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sluice_e2e::load::{self, echo_server};
use sluice_e2e::{Agent, Proc, Relay, test_dir, wait_for};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Bytes the slow stream carries each way.
const LEN: u64 = 8 << 20;
/// Sent in this many chunks, with a pause after each: the stream lasts several seconds
/// whatever the machine's speed, so the signal lands in its middle.
const CHUNKS: u64 = 128;
const PAUSE: Duration = Duration::from_millis(40);

fn setup(dir: &Path, backend_port: u16) -> (Relay, Agent, String) {
    // The default drain deadline (30 s) is far above the stream's 5 s.
    let relay = Relay::start(dir);
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let agent = Agent::start(
        dir,
        "drain",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &backend_port.to_string()),
            ("NAME", "drain"),
            ("REGISTRATION_JWT", &jwt),
        ],
    );
    relay.wait_status("drain", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("drain");
    (relay, agent, ep)
}

fn sigterm(p: &Proc) {
    let ok = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
}

/// Starts a slow echo stream through `ep`; returns once bytes came back (the stream is
/// under way), with the task that finishes it: (bytes echoed, their SHA-256).
async fn slow_stream(ep: &str) -> tokio::task::JoinHandle<std::io::Result<(u64, [u8; 32])>> {
    let s = TcpStream::connect(ep).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut p = load::Payload::new(9);
        let mut buf = vec![0u8; (LEN / CHUNKS) as usize];
        for _ in 0..CHUNKS {
            p.fill(&mut buf);
            if w.write_all(&buf).await.is_err() {
                return;
            }
            tokio::time::sleep(PAUSE).await;
        }
        let _ = w.shutdown().await;
    });
    let reader = tokio::spawn(async move {
        use sha2::{Digest, Sha256};
        use tokio::io::AsyncReadExt;
        let (mut h, mut total, mut buf) = (Sha256::new(), 0u64, vec![0u8; 64 * 1024]);
        let mut first_tx = Some(first_tx);
        loop {
            let n = r.read(&mut buf).await?;
            if n == 0 {
                return Ok((total, h.finalize().into()));
            }
            h.update(&buf[..n]);
            total += n as u64;
            if let Some(tx) = first_tx.take() {
                let _ = tx.send(());
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(30), first_rx).await.expect("the stream is under way").unwrap();
    reader
}

/// Waits until connecting to `ep` is refused (the resource's port closed).
async fn wait_refused(ep: &str) {
    for _ in 0..200 {
        if TcpStream::connect(ep).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("new connections to {ep} are still accepted 10 s after SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_relay_lets_the_running_stream_finish() {
    let dir = test_dir("drain-relay");
    let backend = echo_server().await;
    let (mut relay, agent, ep) = setup(dir.path(), backend.port());

    let stream = slow_stream(&ep).await;
    sigterm(relay.proc.as_ref().unwrap());
    wait_refused(&ep).await;
    let (n, digest) = stream.await.unwrap().unwrap_or_else(|e| panic!("the stream failed: {e}\n{}", relay.log()));
    assert_eq!(n, LEN, "every byte came back\n{}", relay.log());
    assert_eq!(digest, load::expected_digest(LEN, 9), "the bytes are identical");

    let code = relay.proc.as_mut().unwrap().wait_exit(Duration::from_secs(30));
    let log = relay.log();
    assert_eq!(code, Some(0), "the relay exits 0 after the drain\n{log}");
    // At least the slow stream (a probe of wait_refused may have been accepted just
    // before the port closed and be counted too).
    let said = log
        .lines()
        .find(|l| l.contains("draining: ") && l.contains(" stream(s) active, waiting"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("relay: {said}");
    let done = log.lines().find(|l| l.contains("drained: every stream finished")).unwrap_or_else(|| panic!("{log}"));
    eprintln!("relay: {done}");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_agent_lets_the_running_stream_finish() {
    let dir = test_dir("drain-agent");
    let backend = echo_server().await;
    let (relay, mut agent, ep) = setup(dir.path(), backend.port());

    let stream = slow_stream(&ep).await;
    sigterm(&agent.proc);
    // Its only agent is gone from the relay: the resource's port closes.
    wait_refused(&ep).await;
    let (n, digest) =
        stream.await.unwrap().unwrap_or_else(|e| panic!("the stream failed: {e}\n{}", agent.proc.log_text()));
    assert_eq!(n, LEN, "every byte came back\n{}", agent.proc.log_text());
    assert_eq!(digest, load::expected_digest(LEN, 9), "the bytes are identical");

    let code = agent.proc.wait_exit(Duration::from_secs(30));
    let log = agent.proc.log_text();
    assert_eq!(code, Some(0), "the agent exits 0 after the drain\n{log}");
    // The probes of `wait_refused` may have opened a stream as SIGTERM arrived.
    let said = log
        .lines()
        .find(|l| l.contains("draining: ") && l.contains("stream(s) active"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("agent: {said}");
    wait_for(Duration::from_secs(10), "the relay to see the agent gone", || {
        (relay.status("drain").as_deref() != Some("AVAILABLE")).then_some(())
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let dir = test_dir("drain-twice");
    let backend = echo_server().await;
    let (_relay, mut agent, ep) = setup(dir.path(), backend.port());
    let _stream = slow_stream(&ep).await;
    let _other = slow_stream(&ep).await;
    sigterm(&agent.proc);
    wait_for(Duration::from_secs(10), "the agent to drain", || {
        agent.proc.log_text().contains("draining: 2 stream(s) active").then_some(())
    })
    .unwrap();
    sigterm(&agent.proc);
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)), Some(0), "{}", agent.proc.log_text());
    assert!(agent.proc.log_text().contains("during the drain: exiting now"));
}

//! The agent's pool of warm data connections follows demand: a burst of concurrent
//! streams that ran the relay's pool dry leaves enough warm connections behind for the
//! next burst, so its streams do not wait for TLS handshakes.

use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Relay, free_port, test_dir, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One gauge's value from a Prometheus text page.
fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().last()?.parse().ok())
}

fn metrics(addr: &str) -> Option<String> {
    let out = std::process::Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output().ok()?;
    String::from_utf8(out.stdout).ok()
}

/// Opens `n` streams at once, each echoing one byte, and holds them all open until
/// every one has echoed; then closes them.
async fn burst(ep: &str, n: usize) {
    let mut held = Vec::new();
    for i in 0..n {
        let ep = ep.to_owned();
        held.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(&ep).await.unwrap();
            s.write_all(&[i as u8]).await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i as u8);
            s
        }));
    }
    let mut streams = Vec::new();
    for h in held {
        streams.push(h.await.unwrap());
    }
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_that_ran_the_pool_dry_leaves_more_warm_connections() {
    let dir = test_dir("pool-demand");
    let echo = echo_server().await;
    // The relay's resting pool: 4 per agent (the default).
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let metrics_at = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start(
        dir.path(),
        "burst",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &echo.port().to_string()),
            ("NAME", "burst"),
            ("REGISTRATION_JWT", &relay.customer_jwt(&cid)),
            ("SLUICE_METRICS_LISTEN", &metrics_at),
        ],
    );
    relay.wait_status("burst", "AVAILABLE", Some(&agent));
    let idle = || metrics(&metrics_at).and_then(|b| gauge(&b, "sluice_agent_idle_data_connections"));
    let rest = wait_for(Duration::from_secs(20), "the resting pool", || idle().filter(|&i| i >= 4.0))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.proc.log_text()));
    assert_eq!(rest, 4.0, "at rest the agent keeps the relay's pool size");

    // 16 concurrent streams: 12 of them find the pool empty and wait for a handshake.
    burst(&relay.endpoint("burst"), 16).await;
    // The target falls back one step per 10 s without a dry pool, so this holds at half speed.
    let warm =
        wait_for(Duration::from_secs(15), "a larger warm pool after the burst", || idle().filter(|&i| i >= 14.0))
            .unwrap_or_else(|e| panic!("{e} (idle now {:?})\n{}", idle(), agent.proc.log_text()));
    eprintln!("warm data connections after a burst of 16: {warm}");
}

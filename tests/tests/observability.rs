//! What operators see: Prometheus metrics on relay and agent (totals equal the bytes
//! moved), and `sluice streams` showing live streams.

use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_e2e::load::{self, sink_source_server};
use sluice_e2e::{Agent, Relay, bin, free_port, test_dir, wait_for};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Fetches `http://addr/metrics` and parses it with a Prometheus text parser.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let out = Command::new("curl").args(["-sf", &format!("http://{addr}/metrics")]).output();
    let body = match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap(),
        _ => http_get(addr, "/metrics"),
    };
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("valid Prometheus text")
}

/// Minimal HTTP GET without curl.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

/// Sum of a counter's samples whose labels include all of `labels`.
fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_totals_equal_the_bytes_moved() {
    let dir = test_dir("metrics");
    const OUT: u64 = 3 << 20;
    let (backend, mut reports) = sink_source_server(OUT, 5).await;
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::start(
        dir.path(),
        "metered",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &backend.port().to_string()),
            ("NAME", "metered"),
            ("REGISTRATION_JWT", &relay.customer_jwt(&cid)),
            ("SLUICE_METRICS_LISTEN", &metrics_addr),
        ],
    );
    relay.wait_status("metered", "AVAILABLE", Some(&agent));
    let rid = relay.resource("metered").unwrap()["id"].as_str().unwrap().to_owned();
    let ep = relay.endpoint("metered");

    let sizes = [1u64, 1 << 20, 7 << 20];
    let mut tasks = Vec::new();
    for (i, n) in sizes.into_iter().enumerate() {
        let ep = ep.clone();
        tasks.push(tokio::spawn(async move {
            let s = TcpStream::connect(&ep).await.unwrap();
            let (mut r, mut w) = s.into_split();
            let (sent, got) = tokio::join!(load::send(&mut w, n, i as u64), load::receive(&mut r));
            sent.unwrap();
            assert_eq!(got.unwrap().0, OUT);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for _ in sizes {
        reports.recv().await.unwrap();
    }
    let want_in = sizes.iter().sum::<u64>() as f64;
    let want_out = (OUT * sizes.len() as u64) as f64;
    let admin = format!("127.0.0.1:{}", relay.admin_port);

    // Relay: exact totals per resource and direction, once the streams are closed.
    wait_for(Duration::from_secs(10), "relay byte totals", || {
        let s = scrape(&admin);
        let got_in = value(&s, "sluice_relay_bytes_total", &[("resource", &rid), ("direction", "in")]);
        let got_out = value(&s, "sluice_relay_bytes_total", &[("resource", &rid), ("direction", "out")]);
        (got_in == want_in && got_out == want_out).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", http_get(&admin, "/metrics")));
    let s = scrape(&admin);
    assert_eq!(value(&s, "sluice_relay_streams_opened_total", &[("resource", &rid)]), 3.0);
    assert_eq!(value(&s, "sluice_relay_streams_closed_total", &[("resource", &rid), ("end", "clean")]), 3.0);
    assert_eq!(value(&s, "sluice_relay_streams_active", &[("resource", &rid)]), 0.0);
    assert_eq!(value(&s, "sluice_relay_agent_sessions", &[("resource", &rid)]), 1.0);
    assert_eq!(value(&s, "sluice_relay_enrollments_total", &[("outcome", "enrolled")]), 1.0);

    // Agent: the same totals from its side, and which counter it uses.
    wait_for(Duration::from_secs(10), "agent byte totals", || {
        let s = scrape(&metrics_addr);
        let got_in = value(&s, "sluice_agent_bytes_total", &[("direction", "in")]);
        let got_out = value(&s, "sluice_agent_bytes_total", &[("direction", "out")]);
        (got_in == want_in && got_out == want_out).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}: {:?}", http_get(&metrics_addr, "/metrics")));
    let s = scrape(&metrics_addr);
    assert_eq!(value(&s, "sluice_agent_streams_closed_total", &[("end", "clean")]), 3.0);
    assert_eq!(value(&s, "sluice_agent_sessions", &[]), 1.0);
    assert!(s.samples.iter().any(|x| x.metric == "sluice_agent_ebpf_enabled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_command_shows_live_streams() {
    let dir = test_dir("streams");
    let (backend, _reports) = sink_source_server(0, 0).await;
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("acme");
    let agent = Agent::for_service(dir.path(), "live", backend.port(), &relay.customer_jwt(&cid));
    relay.wait_status("live", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("live");

    // A stream that has sent 1 MiB and stays open.
    let mut s = TcpStream::connect(&ep).await.unwrap();
    s.write_all(&vec![1u8; 1 << 20]).await.unwrap();
    let local = s.local_addr().unwrap().to_string();
    let stream = wait_for(Duration::from_secs(10), "the agent's report of the stream", || {
        let v: serde_json::Value =
            serde_json::from_str(&relay.cli_ok(&["streams", "--resource", "live", "--output", "json"])).unwrap();
        let s = v.as_array()?.first()?.clone();
        // The agent's own count (eBPF as root, else user space), not the relay's.
        (s["bytes_in"] == 1 << 20 && s["counter"] != "relay").then_some(s)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", relay.log()));
    assert_eq!(stream["resource_name"], "live");
    assert_eq!(stream["client_addr"], local.as_str());
    assert_eq!(stream["path"], "userspace");
    assert!(stream["agent_id"].as_str().unwrap().starts_with("agt_"));

    let table = relay.cli_ok(&["streams"]);
    let header: Vec<&str> =
        table.lines().next().unwrap().split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(
        header,
        ["Resource", "Agent", "Stream", "Client", "Age", "In", "Out", "Rate in", "Rate out", "Path", "Counter"]
    );
    assert!(table.contains("1.0 MiB"), "{table}");
    assert!(relay.cli_ok(&["streams", "--resource", "other"]).lines().count() == 1, "filter by resource");

    // --watch refreshes until interrupted; piped (as here) it prints successive tables
    // and never screen-control codes (on a terminal it redraws in place).
    let watch = Command::new(bin("sluice"))
        .args(["streams", "--watch", "--data-dir"])
        .arg(relay.data_dir())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    Command::new("kill").args(["-INT", &watch.id().to_string()]).status().unwrap();
    let out = watch.wait_with_output().unwrap();
    assert!(out.status.success(), "Ctrl-C ends --watch cleanly");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("sluice streams — ").count() >= 2, "refreshes: {text:?}");
    assert!(!text.contains('\x1b'), "screen-control codes in piped output: {text:?}");
    assert!(text.contains("1 open"), "{text}");

    drop(s);
    wait_for(Duration::from_secs(10), "the closed stream to leave the list", || {
        relay.cli_ok(&["streams", "--output", "json"]).trim().eq("[]").then_some(())
    })
    .unwrap();
}

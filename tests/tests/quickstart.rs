//! The README's first command: `sluice quickstart` brings up a working tunnel.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_e2e::{Proc, bin, free_port_range, test_dir};

#[test]
fn quickstart_prints_a_working_endpoint() {
    let dir = test_dir("quickstart");
    let (lo, hi) = free_port_range(4);
    let mut cmd = Command::new(bin("sluice"));
    cmd.args(["quickstart", "--resource-ports", &format!("{lo}-{hi}"), "--data-dir"]).arg(dir.path().join("data"));
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = Proc { child, log: dir.path().join("none") };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = tx.send(line.unwrap());
        }
    });
    let mut seen = Vec::new();
    let endpoint = loop {
        let line =
            rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no endpoint printed: {seen:#?}"));
        seen.push(line.clone());
        if let Some(ep) = line.strip_prefix("Platform jobs connect to:") {
            break ep.trim().to_owned();
        }
    };
    let check = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(check.contains("self-check: a message went through the tunnel"), "{check}");
    assert_eq!(endpoint, format!("127.0.0.1:{lo}"));

    let mut s = std::net::TcpStream::connect(&endpoint).unwrap();
    s.write_all(b"hello through sluice").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = String::new();
    s.read_to_string(&mut back).unwrap();
    assert_eq!(back, "hello through sluice");
    // The rest of the banner may still be on its way through the pipe: wait for it.
    let mut rest = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        let stop = line.contains("Stop with Ctrl-C");
        rest.push(line);
        if stop {
            return;
        }
    }
    panic!("tells how to stop: {rest:#?}");
}

/// `.ci/run` proves the README's order with `quickstart --check`: it must exit by itself,
/// 0 only when a message went through the tunnel and back.
#[test]
fn quickstart_check_exits_after_the_self_check() {
    let dir = test_dir("quickstart-check");
    let (lo, hi) = free_port_range(2);
    let mut cmd = Command::new(bin("sluice"));
    cmd.args(["quickstart", "--check", "--resource-ports", &format!("{lo}-{hi}"), "--data-dir"])
        .arg(dir.path().join("data"));
    let log = dir.path().join("quickstart.log");
    let mut p = Proc::spawn(cmd, log);
    let code = p.wait_exit(Duration::from_secs(120));
    let out = p.log_text();
    assert_eq!(code, Some(0), "quickstart --check must exit 0 after a good self-check:\n{out}");
    assert!(out.contains("self-check: a message went through the tunnel"), "{out}");
    assert!(out.contains("Self-check passed"), "{out}");
}

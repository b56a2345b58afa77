//! systemd readiness (`Type=notify`, deploy/*.service) of both binaries: each is started
//! with `NOTIFY_SOCKET` naming a datagram socket this test binds (a path for the relay,
//! an abstract `@name` for the agent, both forms systemd uses), and must send `READY=1`
//! only once its port accepts connections, a `STATUS=` line systemd shows, and
//! `STOPPING=1` when SIGTERM starts its drain.

use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_e2e::{Agent, Proc, Relay, bin, free_port, free_port_range, test_dir};

/// Notifications received within `timeout` until one contains `want`; all of them.
fn receive_until(sock: &UnixDatagram, want: &str, timeout: Duration, proc: &Proc) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            if got.last().unwrap().contains(want) {
                return got;
            }
        }
    }
    panic!("no {want:?} within {timeout:?}; got {got:?}\n--- log ---\n{}", proc.log_text());
}

fn sigterm(proc: &Proc) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(proc.child.id() as i32, libc::SIGTERM) };
}

#[test]
fn relay_notifies_ready_after_its_ports_accept_and_stopping_at_drain() {
    let dir = test_dir("notify-relay");
    let socket = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket).unwrap();
    let (agent_port, admin_port, ports, leases) = (free_port(), free_port(), free_port_range(2), free_port_range(2));
    let mut cmd = Command::new(bin("sluice"));
    cmd.args(["serve", "--data-dir"])
        .arg(dir.path().join("relay-data"))
        .args(["--agent-listen", &format!("127.0.0.1:{agent_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--public-url", &format!("https://127.0.0.1:{agent_port}")])
        .args(["--resource-ports", &format!("{}-{}", ports.0, ports.1)])
        .args(["--lease-ports", &format!("{}-{}", leases.0, leases.1)])
        .env("NOTIFY_SOCKET", &socket);
    if sluice_e2e::on_postgres() {
        cmd.arg("--database-url").arg(sluice_e2e::postgres_url_for(&dir.path().join("relay-data")));
    }
    let relay = Proc::spawn(cmd, dir.path().join("relay.log"));
    let got = receive_until(&sock, "READY=1", Duration::from_secs(30), &relay);
    // READY=1 came: both ports must accept already.
    for port in [agent_port, admin_port] {
        TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("READY=1 arrived ({got:?}) but port {port} refuses: {e}"));
    }
    assert!(got.last().unwrap().contains("STATUS="), "{got:?}");
    sigterm(&relay);
    receive_until(&sock, "STOPPING=1", Duration::from_secs(30), &relay);
}

#[test]
fn agent_notifies_ready_after_its_health_port_accepts_then_its_session_and_stopping() {
    let dir = test_dir("notify-agent");
    let relay = Relay::start(dir.path());
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let name = format!("sluice-notify-test-{}", std::process::id());
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let metrics = free_port();
    let agent = Agent::start(
        dir.path(),
        "db",
        &[
            ("APP_HOST", "127.0.0.1"),
            ("APP_PORT", &free_port().to_string()),
            ("NAME", "db"),
            ("REGISTRATION_JWT", &jwt),
            ("SLUICE_METRICS_LISTEN", &format!("127.0.0.1:{metrics}")),
            ("NOTIFY_SOCKET", &format!("@{name}")),
        ],
    );
    let got = receive_until(&sock, "READY=1", Duration::from_secs(30), &agent.proc);
    TcpStream::connect(("127.0.0.1", metrics))
        .unwrap_or_else(|e| panic!("READY=1 arrived ({got:?}) but the health port {metrics} refuses: {e}"));
    // Then the status line follows the control session.
    receive_until(&sock, "STATUS=connected", Duration::from_secs(30), &agent.proc);
    sigterm(&agent.proc);
    receive_until(&sock, "STOPPING=1", Duration::from_secs(30), &agent.proc);
    drop(relay);
}

//! The agent behind a corporate HTTP forward proxy: a real one (Debian's tinyproxy, which
//! `scripts/install-test-deps.sh` installs), started by each test on a free loopback
//! port with its own configuration and log in the test's directory. The proxy logs
//! every `CONNECT` it is asked for, which shows whether the agent's relay connections
//! went through it.
//!
//! tinyproxy runs as the test's user (no `User` line: as root it warns and stays root),
//! so it needs no directory owned by another user.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_e2e::load::echo_server;
use sluice_e2e::{Agent, Proc, Relay, free_port, test_dir, wait_for};

/// A tinyproxy started for one test.
struct Tinyproxy {
    port: u16,
    log: PathBuf,
    _proc: Proc,
}

impl Tinyproxy {
    /// Starts tinyproxy on a free loopback port; with `auth`, it wants those basic-auth
    /// credentials.
    fn start(dir: &Path, auth: Option<(&str, &str)>) -> Tinyproxy {
        let bin = ["/usr/bin/tinyproxy", "/usr/sbin/tinyproxy"].into_iter().find(|b| Path::new(b).exists());
        let bin = bin.expect("tinyproxy is not installed: run scripts/install-test-deps.sh (as root)");
        let port = free_port();
        let log = dir.join("tinyproxy.log");
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nMaxClients 200\nLogLevel Connect\nLogFile \"{}\"\n",
            log.display()
        );
        if let Some((user, pass)) = auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        let conf_path = dir.join("tinyproxy.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-d").arg("-c").arg(&conf_path);
        let proc = Proc::spawn(cmd, dir.join("tinyproxy.out"));
        wait_for(Duration::from_secs(20), "tinyproxy to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        })
        .unwrap_or_else(|e| panic!("{e}\n--- tinyproxy ---\n{}", proc.log_text()));
        Tinyproxy { port, log, _proc: proc }
    }

    /// `http://[userinfo@]127.0.0.1:port`.
    fn url(&self, userinfo: Option<&str>) -> String {
        match userinfo {
            Some(u) => format!("http://{u}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many `CONNECT authority` requests the proxy has logged.
    fn connects_to(&self, authority: &str) -> usize {
        self.log_text().matches(&format!("CONNECT {authority} HTTP/1.1")).count()
    }
}

/// The agent's environment for `name` (a service at `port`) with `extra` settings.
fn agent_env<'a>(name: &'a str, port: &'a str, jwt: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("APP_HOST", "127.0.0.1"), ("APP_PORT", port), ("NAME", name), ("REGISTRATION_JWT", jwt)];
    env.extend_from_slice(extra);
    env
}

/// A client stream through the relay's resource port echoes `msg`.
fn echoes(endpoint: &str, msg: &[u8]) {
    let mut s = std::net::TcpStream::connect(endpoint).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// A relay, a customer JWT and an echo service.
async fn setup(dir: &Path) -> (Relay, String, String) {
    let relay = Relay::start(dir);
    let customer = relay.create_customer("acme");
    let jwt = relay.customer_jwt(&customer);
    let echo = echo_server().await;
    (relay, jwt, echo.port().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_enrolls_and_serves_streams_through_a_proxy() {
    let dir = test_dir("proxy-plain");
    let proxy = Tinyproxy::start(dir.path(), None);
    let (relay, jwt, port) = setup(dir.path()).await;
    let url = proxy.url(None);
    let agent = Agent::start(dir.path(), "db", &agent_env("db", &port, &jwt, &[("HTTPS_PROXY", &url)]));
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    echoes(&relay.endpoint("db"), b"through the proxy and back");

    // Enrollment, the control session and at least one data connection (the stream's)
    // each asked the proxy for a tunnel to the relay.
    let authority = format!("127.0.0.1:{}", relay.agent_port);
    let connects = proxy.connects_to(&authority);
    assert!(connects >= 3, "{connects} CONNECTs to {authority}\n--- proxy log ---\n{}", proxy.log_text());
    let log = agent.proc.log_text();
    assert!(log.contains("reaching the relays through an HTTP proxy") && log.contains(&url), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_credentials_from_the_proxy_url_are_sent() {
    let dir = test_dir("proxy-auth");
    let proxy = Tinyproxy::start(dir.path(), Some(("alice", "s3cret")));
    let (relay, jwt, port) = setup(dir.path()).await;
    // Percent-encoded in the URL ("%65" is "e"); the agent decodes it.
    let url = proxy.url(Some("alice:s3cr%65t"));
    let agent = Agent::start(dir.path(), "db", &agent_env("db", &port, &jwt, &[("SLUICE_PROXY", &url)]));
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    echoes(&relay.endpoint("db"), b"authenticated");
    assert!(proxy.connects_to(&format!("127.0.0.1:{}", relay.agent_port)) >= 3, "{}", proxy.log_text());
    let log = agent.proc.log_text();
    assert!(log.contains("alice:***@127.0.0.1") && !log.contains("s3cret") && !log.contains("s3cr%65t"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_proxy_gives_one_line_naming_it_and_its_status() {
    let dir = test_dir("proxy-refused");
    let proxy = Tinyproxy::start(dir.path(), Some(("alice", "s3cret")));
    let (relay, jwt, port) = setup(dir.path()).await;
    let bare = proxy.url(None);
    let wrong = proxy.url(Some("alice:wr0ng"));
    let authority = format!("127.0.0.1:{}", relay.agent_port);
    // tinyproxy answers missing credentials with 407 and wrong ones with 401.
    for (label, url, status, hint) in [
        ("nocreds", bare.clone(), "407 Proxy Authentication Required", "set user:password in SLUICE_PROXY/HTTPS_PROXY"),
        ("wrong", wrong, "401 Unauthorized", "did not accept the user name and password in HTTPS_PROXY"),
    ] {
        let agent = Agent::start(dir.path(), label, &agent_env(label, &port, &jwt, &[("HTTPS_PROXY", &url)]));
        let want = format!("the proxy {bare} refused CONNECT {authority}: {status} (");
        let line = wait_for(Duration::from_secs(30), "the proxy's refusal in the agent's log", || {
            agent.proc.log_text().lines().find(|l| l.contains(&want)).map(str::to_owned)
        })
        .unwrap_or_else(|e| panic!("{e}\n--- agent log ---\n{}", agent.proc.log_text()));
        assert!(line.contains(hint) && !line.contains("wr0ng"), "{line}");
        assert!(relay.status(label).is_none(), "nothing enrolled through a refusing proxy");
    }
    // A proxy URL the agent cannot use stops it at start-up (exit 2), naming the variable.
    let mut agent = Agent::start(
        dir.path(),
        "badurl",
        &agent_env("badurl", &port, &jwt, &[("HTTPS_PROXY", "https://alice:s3cret@proxy.corp:3128")]),
    );
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(20)), Some(2), "{}", agent.proc.log_text());
    let log = agent.proc.log_text();
    assert!(log.contains("HTTPS_PROXY=\"https://alice:***@proxy.corp:3128\" is not a usable proxy URL"), "{log}");
    assert!(!log.contains("s3cret"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_proxy_covering_the_relay_dials_it_directly() {
    let dir = test_dir("proxy-bypass");
    let proxy = Tinyproxy::start(dir.path(), None);
    let (relay, jwt, port) = setup(dir.path()).await;
    let url = proxy.url(None);
    let agent = Agent::start(
        dir.path(),
        "db",
        &agent_env("db", &port, &jwt, &[("HTTPS_PROXY", &url), ("NO_PROXY", "localhost, 127.0.0.0/8")]),
    );
    relay.wait_status("db", "AVAILABLE", Some(&agent));
    echoes(&relay.endpoint("db"), b"direct");
    assert!(!proxy.log_text().contains("CONNECT 127.0.0.1"), "{}", proxy.log_text());
    assert!(agent.proc.log_text().contains("NO_PROXY covers the relay"), "{}", agent.proc.log_text());
}

//! Harness for end-to-end tests of the real `sluice` and `sluice-agent` binaries.
//!
//! Each test starts its own relay (fresh data directory, free loopback ports) and its
//! own agents as child processes, and kills them when the handles drop. Logs of every
//! child go to files in the test's temporary directory and are printed when a wait
//! fails, so a red test explains itself.
//!
//! With `SLUICE_TEST_STORE=postgres` every relay keeps its state in PostgreSQL instead
//! of its SQLite file: one server per test process ([`shared_postgres`]) and one
//! database per relay data directory, so a relay restarted on its directory finds its
//! state again. Tests about the SQLite file itself skip themselves
//! ([`skip_unless_sqlite`]).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::Value;

pub mod cluster;
pub mod load;
pub mod netns;
pub mod services;
pub mod sim;

/// Directory holding the built binaries (next to the test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf();
    for b in ["sluice", "sluice-agent"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (`cargo build --release --bins`, which `cargo xtask test` does)",
            dir.join(b).display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

static RANGES: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback TCP port (free when checked), not handed to any other test of this
/// process, and outside the kernel's ephemeral range (32768-60999 here): a port the
/// kernel picked would be the next source port of some outgoing connection of a load
/// test running alongside, taken before the relay or service binds it.
pub fn free_port() -> u16 {
    let mut taken = RANGES.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let p = rand::rng().random_range(10000..20000u16);
        if !taken.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok() {
            taken.insert(p);
            return p;
        }
    }
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `n` consecutive free ports, not handed to any other test of this process.
pub fn free_port_range(n: u16) -> (u16, u16) {
    let mut taken = RANGES.lock().unwrap();
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let base = rand::rng().random_range(20000..30000u16);
        if (base..base + n).any(|p| taken.contains(&p)) {
            continue;
        }
        if (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            taken.extend(base..base + n);
            return (base, base + n - 1);
        }
    }
    panic!("no free port range of {n}");
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop, with its output in a log file.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Proc { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_for(timeout, "process exit", || self.child.try_wait().ok().flatten()).ok().map(|s| s.code().unwrap_or(-1))
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether this run keeps the relays' state in PostgreSQL (`SLUICE_TEST_STORE=postgres`).
pub fn on_postgres() -> bool {
    std::env::var("SLUICE_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// True (after printing why) when the test is about the SQLite store and this run is on
/// PostgreSQL: the caller returns at once.
pub fn skip_unless_sqlite(test: &str, why: &str) -> bool {
    if on_postgres() {
        eprintln!("skipped {test} under SLUICE_TEST_STORE=postgres: {why}");
        return true;
    }
    false
}

static SHARED_POSTGRES: OnceLock<services::Postgres> = OnceLock::new();

/// The PostgreSQL server of this test process, started on first use in a directory kept
/// for the process's life, and stopped when the process exits.
pub fn shared_postgres() -> &'static services::Postgres {
    SHARED_POSTGRES.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("sluice-shared-pg-").tempdir().unwrap().keep();
        let pg = services::Postgres::start(&dir);
        extern "C" fn stop_shared_postgres() {
            if let Some(pg) = SHARED_POSTGRES.get() {
                pg.stop_immediately();
            }
        }
        // SAFETY: registers a plain function, run once at exit.
        unsafe { libc::atexit(stop_shared_postgres) };
        pg
    })
}

/// The `--database-url` for a relay in `data_dir` under `SLUICE_TEST_STORE=postgres`: a
/// database of the shared server named after the directory, created on first use.
pub fn postgres_url_for(data_dir: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes());
    let db = format!("sluice_{}", &hex::encode(digest)[..16]);
    let pg = shared_postgres();
    pg.create_database(&db);
    pg.url(&db)
}

/// A relay under test.
pub struct Relay {
    pub dir: PathBuf,
    pub agent_port: u16,
    pub admin_port: u16,
    pub ports: (u16, u16),
    pub proc: Option<Proc>,
    starts: u32,
    /// More `sluice serve` flags (e.g. a short `--agent-cert-lifetime`).
    extra_args: Vec<String>,
}

impl Relay {
    /// Starts a relay in `dir/relay-data` with free ports and a 1 s heartbeat.
    pub fn start(dir: &Path) -> Relay {
        Self::launch(dir, 8, &[])
    }

    /// Starts a relay like [`Relay::start`] with more `sluice serve` flags (a
    /// `--heartbeat-secs` or `--log` among them replaces the harness's default).
    pub fn start_with(dir: &Path, extra_args: &[&str]) -> Relay {
        Self::launch(dir, 8, extra_args)
    }

    /// Like [`Relay::start`], with a range of `n` resource ports (1 makes the first
    /// resource's port known in advance).
    pub fn start_with_resource_ports(dir: &Path, n: u16) -> Relay {
        Self::launch(dir, n, &[])
    }

    /// Starts a relay with a range of `n` resource ports and more `sluice serve` flags.
    pub fn start_with_ports_and(dir: &Path, n: u16, extra_args: &[&str]) -> Relay {
        Self::launch(dir, n, extra_args)
    }

    /// Starts a relay in `dir/relay-data` (which may already hold a data directory, e.g.
    /// a restored backup) on the given agent port and resource port range: another
    /// relay taking over where an earlier one served.
    pub fn start_on(dir: &Path, agent_port: u16, ports: (u16, u16), extra_args: &[&str]) -> Relay {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Relay {
            dir: dir.to_path_buf(),
            agent_port,
            admin_port: free_port(),
            ports,
            proc: None,
            starts: 0,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn();
        r
    }

    fn launch(dir: &Path, n: u16, extra_args: &[&str]) -> Relay {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = Relay {
            dir: dir.to_path_buf(),
            agent_port: free_port(),
            admin_port: free_port(),
            ports: free_port_range(n),
            proc: None,
            starts: 0,
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        r.spawn();
        r
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("relay-data")
    }

    /// The address agents dial: `--agent-host ADDR` among the extra flags (a test's own
    /// flag, not the relay's) moves the agent port from loopback to ADDR.
    fn agent_host(&self) -> String {
        let at = self.extra_args.iter().position(|a| a == "--agent-host");
        at.and_then(|i| self.extra_args.get(i + 1)).cloned().unwrap_or_else(|| "127.0.0.1".into())
    }

    pub fn public_url(&self) -> String {
        format!("https://{}:{}", self.agent_host(), self.agent_port)
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let mut cmd = Command::new(bin("sluice"));
        cmd.args(["serve", "--data-dir"])
            .arg(self.data_dir())
            .args(["--agent-listen", &format!("{}:{}", self.agent_host(), self.agent_port)])
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .args(["--public-url", &self.public_url()])
            .args(["--resource-ports", &format!("{}-{}", self.ports.0, self.ports.1)])
            .args(self.relay_args());
        if on_postgres() && !self.extra_args.iter().any(|a| a == "--database-url") {
            cmd.arg("--database-url").arg(postgres_url_for(&self.data_dir()));
        }
        if !self.extra_args.iter().any(|a| a == "--log") {
            cmd.args(["--log", "info,sluice_relay=debug"]);
        }
        if !self.extra_args.iter().any(|a| a == "--heartbeat-secs") {
            cmd.args(["--heartbeat-secs", "1"]);
        }
        let log = self.dir.join(format!("relay-{}.log", self.starts));
        self.proc = Some(Proc::spawn(cmd, log));
        // The relay writes its admin URL once its listeners are bound and its store is open.
        let url_file = self.data_dir().join("admin-url");
        if self.starts > 1 {
            let _ = std::fs::remove_file(&url_file);
        }
        wait_for(Duration::from_secs(20), "the relay to be ready", || url_file.exists().then_some(()))
            .unwrap_or_else(|e| panic!("{e}\n--- relay log ---\n{}", self.log()));
    }

    /// The extra flags meant for `sluice serve` (without the harness's `--agent-host`).
    fn relay_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut args = self.extra_args.iter();
        while let Some(a) = args.next() {
            if a == "--agent-host" {
                args.next();
            } else {
                out.push(a.clone());
            }
        }
        out
    }

    /// Stops the relay (SIGKILL) and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    pub fn log(&self) -> String {
        self.proc.as_ref().map(Proc::log_text).unwrap_or_default()
    }

    /// Runs the admin CLI against this relay (found through its data directory).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("sluice")).args(args).arg("--data-dir").arg(self.data_dir()).output().unwrap()
    }

    /// Runs the CLI, asserting success; returns trimmed stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "sluice {args:?} failed: {}\n--- relay log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }

    pub fn create_customer(&self, name: &str) -> String {
        self.cli_ok(&["customers", "create", name])
    }

    pub fn customer_jwt(&self, customer_id: &str) -> String {
        self.cli_ok(&["resources", "registration-jwt", "--customer-id", customer_id])
    }

    /// The resource named `name` as the CLI's JSON shows it.
    pub fn resource(&self, name: &str) -> Option<Value> {
        let list: Value = serde_json::from_str(&self.cli_ok(&["resources", "list", "--output", "json"])).unwrap();
        list.as_array().unwrap().iter().find(|r| r["name"] == name).cloned()
    }

    pub fn status(&self, name: &str) -> Option<String> {
        self.resource(name).map(|r| r["status"].as_str().unwrap().to_owned())
    }

    /// Waits until the resource has `status`; panics with both logs otherwise.
    pub fn wait_status(&self, name: &str, status: &str, agent: Option<&Agent>) {
        wait_for(Duration::from_secs(30), &format!("{name} to be {status}"), || {
            (self.status(name).as_deref() == Some(status)).then_some(())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- relay log ---\n{}\n--- agent log ---\n{}",
                self.log(),
                agent.map(|a| a.proc.log_text()).unwrap_or_default()
            )
        });
    }

    pub fn endpoint(&self, name: &str) -> String {
        self.cli_ok(&["resources", "endpoint", name])
    }
}

/// An agent under test.
pub struct Agent {
    pub proc: Proc,
    pub state_dir: PathBuf,
}

impl Agent {
    /// Starts `sluice-agent` with the given environment (APP_HOST etc.).
    pub fn start(dir: &Path, label: &str, env: &[(&str, &str)]) -> Agent {
        Self::launch(Command::new(bin("sluice-agent")), dir, label, env)
    }

    /// Starts `sluice-agent` inside a network namespace of the test's.
    pub fn start_in(ns: &netns::Netns, dir: &Path, label: &str, env: &[(&str, &str)]) -> Agent {
        Self::launch(ns.command(&bin("sluice-agent")), dir, label, env)
    }

    /// Like [`Agent::start`], run through `wrapper` (a command that execs the rest of its
    /// arguments, e.g. `prlimit --nofile=1024:` to start it with a low descriptor limit),
    /// so the process is still the agent's.
    pub fn start_via(dir: &Path, label: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Agent {
        let cmd = match wrapper.split_first() {
            None => Command::new(bin("sluice-agent")),
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin("sluice-agent"));
                c
            }
        };
        Self::launch(cmd, dir, label, env)
    }

    fn launch(mut cmd: Command, dir: &Path, label: &str, env: &[(&str, &str)]) -> Agent {
        let state_dir = dir.join(format!("agent-{label}-state"));
        cmd.env_clear()
            .env("STATE_DIR", &state_dir)
            .env("SLUICE_RECONNECT_MAX_SECS", "1")
            .env("SLUICE_LOG", "info,sluice_agent=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Agent { proc: Proc::spawn(cmd, dir.join(format!("agent-{label}.log"))), state_dir }
    }

    /// Starts an agent for `APP_HOST=127.0.0.1 APP_PORT=port NAME=name`.
    pub fn for_service(dir: &Path, name: &str, port: u16, jwt: &str) -> Agent {
        Self::start(
            dir,
            name,
            &[("APP_HOST", "127.0.0.1"), ("APP_PORT", &port.to_string()), ("NAME", name), ("REGISTRATION_JWT", jwt)],
        )
    }
}

/// A temporary directory for one test (kept when `SLUICE_KEEP_TEST_DIRS` is set).
pub fn test_dir(name: &str) -> tempfile::TempDir {
    let mut d = tempfile::Builder::new().prefix(&format!("sluice-{name}-")).tempdir().unwrap();
    if std::env::var_os("SLUICE_KEEP_TEST_DIRS").is_some() {
        d.disable_cleanup(true);
        eprintln!("test dir (kept): {}", d.path().display());
    }
    d
}

/// A plain HTTP/1.1 GET: the status code and the body (no curl needed).
pub fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, body.to_owned()))
}

/// The Prometheus text page at `http://addr/metrics`, if it answers 200.
pub fn metrics_page(addr: &str) -> Option<String> {
    match http_get(addr, "/metrics") {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

/// The value of one series on a metrics page: `series` is the name with its labels as
/// the page writes them (`sluice_relay_data_handshakes_total{kind="full"}`).
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    let line = page.lines().find(|l| l.split_whitespace().next() == Some(series))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The sum of one metric over all its label sets (`sluice_relay_data_reused_total`
/// across resources); 0 when the page has none.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Splits `host:port`.
pub fn split_endpoint(ep: &str) -> (String, u16) {
    let (h, p) = ep.rsplit_once(':').unwrap();
    (h.to_owned(), p.parse().unwrap())
}

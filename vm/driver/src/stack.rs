//! The real relay (`sluice serve`) and agent (`sluice-agent`) as child processes in the
//! guest: fixed loopback ports, state and logs under `/tmp` (`$TMPDIR`), and the admin CLI to
//! create a customer, a registration JWT and to wait for the resource to be AVAILABLE.
//!
//! Numeric addresses only: static glibc's `getaddrinfo` cannot load NSS modules, and
//! the guest has no `/etc/hosts` anyway.
//!
//! Data-path selection goes through the environment (`SLUICE_DATA_PATH`,
//! `SLUICE_KTLS_ENGINE`, `SLUICE_TLS_KEY_UPDATE_RECORDS`), which also works with
//! binaries that predate the `--data-path` flag (clap ignores unknown variables, not
//! unknown flags). Usually both binaries get the same environment; the `rekey` checks
//! give the relay and the agent different ones ([`Stack::start_with`],
//! [`Stack::restart_with`]).

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::metrics::{self, Metrics};

/// Where agents dial the relay.
const AGENT_LISTEN: &str = "127.0.0.1:8443";
/// The relay's admin API (and `/metrics`).
pub const ADMIN_LISTEN: &str = "127.0.0.1:8080";
/// The agent's opt-in metrics listener.
pub const AGENT_METRICS: &str = "127.0.0.1:9101";
/// Per-resource port range.
const RESOURCE_PORTS: &str = "20000-20009";
/// Relay data directory, under the temporary directory (`$TMPDIR`, in the guest `/tmp`).
fn relay_dir() -> PathBuf {
    std::env::temp_dir().join("relay-data")
}

/// Agent state directory (kept across restarts: the agent enrolls once).
fn agent_state() -> PathBuf {
    std::env::temp_dir().join("agent-state")
}

/// A log file under the temporary directory.
fn log_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(name)
}
/// The resource's name.
pub const RESOURCE: &str = "vmtest";

/// Emulated CPUs are slow: generous limits for start-up and CLI calls.
const START_TIMEOUT: Duration = Duration::from_secs(120);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running relay and agent for one resource pointing at the backend.
pub struct Stack {
    relay: Option<Child>,
    agent: Option<Child>,
    pub relay_log: PathBuf,
    pub agent_log: PathBuf,
    /// Every log this stack wrote (`relay-N.log`, `agent-N.log`), oldest first, and how
    /// many of its notable lines were already printed ([`Stack::take_notable`]).
    logs: Vec<(&'static str, PathBuf, usize)>,
    backend_port: u16,
    jwt: String,
    starts: u32,
    /// The resource's `host:port` on the relay.
    pub endpoint: String,
    /// The environment the relay got (data path, engine, key-update knob).
    pub relay_env: Vec<(String, String)>,
    /// The environment the agent got.
    pub agent_env: Vec<(String, String)>,
    /// The relay's `--heartbeat-secs` (the agent takes it from the welcome).
    pub heartbeat_secs: u64,
}

impl Stack {
    /// Starts a fresh relay, creates a customer and its registration JWT, starts the agent
    /// and waits until the resource is AVAILABLE.
    pub fn start(backend_port: u16, env: &[(&str, &str)], heartbeat_secs: u64) -> Result<Stack> {
        Stack::start_with(backend_port, env, env, heartbeat_secs)
    }

    /// [`Stack::start`] with a different environment for the relay and the agent.
    pub fn start_with(
        backend_port: u16,
        relay_env: &[(&str, &str)],
        agent_env: &[(&str, &str)],
        heartbeat_secs: u64,
    ) -> Result<Stack> {
        let _ = std::fs::remove_dir_all(relay_dir());
        let _ = std::fs::remove_dir_all(agent_state());
        let mut s = Stack {
            relay: None,
            agent: None,
            relay_log: PathBuf::new(),
            agent_log: PathBuf::new(),
            logs: Vec::new(),
            backend_port,
            jwt: String::new(),
            starts: 0,
            endpoint: String::new(),
            relay_env: owned(relay_env),
            agent_env: owned(agent_env),
            heartbeat_secs,
        };
        s.start_relay()?;
        let customer = s.cli_ok(&["customers", "create", "vm"])?;
        s.jwt = s.cli_ok(&["resources", "registration-jwt", "--customer-id", &customer])?;
        s.start_agent()?;
        s.wait_available()?;
        Ok(s)
    }

    /// Stops both processes and starts them again (same data, same ports) with `env`.
    pub fn restart(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.restart_with(env, env)
    }

    /// [`Stack::restart`] with a different environment for the relay and the agent.
    pub fn restart_with(&mut self, relay_env: &[(&str, &str)], agent_env: &[(&str, &str)]) -> Result<()> {
        self.stop();
        self.relay_env = owned(relay_env);
        self.agent_env = owned(agent_env);
        self.start_relay()?;
        self.start_agent()?;
        self.wait_available()
    }

    fn start_relay(&mut self) -> Result<()> {
        self.starts += 1;
        let url_file = relay_dir().join("admin-url");
        let _ = std::fs::remove_file(&url_file);
        self.relay_log = log_path(&format!("relay-{}.log", self.starts));
        self.logs.push(("relay", self.relay_log.clone(), 0));
        let mut cmd = Command::new(bin("sluice"));
        cmd.env_clear()
            .env("SLUICE_LOG", "info")
            .args(["serve", "--data-dir"])
            .arg(relay_dir())
            .args(["--agent-listen", AGENT_LISTEN, "--admin-listen", ADMIN_LISTEN])
            .args(["--public-url", &format!("https://{AGENT_LISTEN}"), "--resource-ports", RESOURCE_PORTS])
            .args(["--heartbeat-secs", &self.heartbeat_secs.to_string()]);
        for (k, v) in &self.relay_env {
            cmd.env(k, v);
        }
        self.relay = Some(spawn(cmd, &self.relay_log)?);
        let t = Instant::now();
        // The relay writes admin-url once its listeners are bound and its store is open.
        while !url_file.exists() {
            if let Some(st) = self.relay.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the relay exited during start-up ({st})\n{}", tail(&self.relay_log, "relay"));
            }
            if t.elapsed() > START_TIMEOUT {
                bail!(
                    "the relay did not write {} within {} s\n{}",
                    url_file.display(),
                    START_TIMEOUT.as_secs(),
                    tail(&self.relay_log, "relay")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        self.agent_log = log_path(&format!("agent-{}.log", self.starts));
        self.logs.push(("agent", self.agent_log.clone(), 0));
        let mut cmd = Command::new(bin("sluice-agent"));
        cmd.env_clear()
            .env("APP_HOST", "127.0.0.1")
            .env("APP_PORT", self.backend_port.to_string())
            .env("NAME", RESOURCE)
            .env("REGISTRATION_JWT", &self.jwt)
            .env("STATE_DIR", agent_state())
            .env("SLUICE_RECONNECT_MAX_SECS", "1")
            .env("SLUICE_METRICS_LISTEN", AGENT_METRICS)
            .env("SLUICE_LOG", "info");
        for (k, v) in &self.agent_env {
            cmd.env(k, v);
        }
        self.agent = Some(spawn(cmd, &self.agent_log)?);
        Ok(())
    }

    /// Polls `sluice resources list` until the resource is AVAILABLE, then reads its
    /// endpoint.
    fn wait_available(&mut self) -> Result<()> {
        let t = Instant::now();
        let mut last = String::from("(not listed yet)");
        loop {
            if let Some(st) = self.agent.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("the agent exited ({st})\n{}", tail(&self.agent_log, "agent"));
            }
            let list = self.cli_ok(&["resources", "list", "--output", "json"])?;
            let list: serde_json::Value =
                serde_json::from_str(&list).with_context(|| format!("`sluice resources list` printed {list:?}"))?;
            let status = list
                .as_array()
                .and_then(|a| a.iter().find(|r| r["name"] == RESOURCE))
                .and_then(|r| r["status"].as_str())
                .map(str::to_owned);
            if status.as_deref() == Some("AVAILABLE") {
                break;
            }
            if let Some(s) = status {
                last = s;
            }
            if t.elapsed() > START_TIMEOUT {
                bail!(
                    "resource {RESOURCE} is {last}, not AVAILABLE, after {} s\n{}\n{}",
                    START_TIMEOUT.as_secs(),
                    tail(&self.relay_log, "relay"),
                    tail(&self.agent_log, "agent")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.endpoint = self.cli_ok(&["resources", "endpoint", RESOURCE])?;
        Ok(())
    }

    /// Runs the admin CLI against the relay (found through its data directory); returns
    /// trimmed stdout.
    pub fn cli_ok(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(bin("sluice"));
        cmd.env_clear().args(args).arg("--data-dir").arg(relay_dir());
        let (ok, stdout, stderr) = run_bounded(cmd, CLI_TIMEOUT)?;
        if !ok {
            bail!("`sluice {}` failed: {}\n{}", args.join(" "), stderr.trim(), tail(&self.relay_log, "relay"));
        }
        Ok(stdout.trim().to_owned())
    }

    /// CPU seconds (user + system) used so far by the relay and by the agent.
    pub fn cpu_seconds(&self) -> Result<(f64, f64)> {
        let pid = |c: &Option<Child>| c.as_ref().map(Child::id).context("process not running");
        Ok((cpu_seconds(pid(&self.relay)?)?, cpu_seconds(pid(&self.agent)?)?))
    }

    /// Peak resident memory (`VmHWM`) of the relay and the agent, in MiB.
    pub fn peak_rss_mib(&self) -> (f64, f64) {
        let hwm = |c: &Option<Child>| c.as_ref().and_then(|c| peak_rss_kib(c.id())).map_or(f64::NAN, |k| k / 1024.0);
        (hwm(&self.relay), hwm(&self.agent))
    }

    pub fn relay_metrics(&self) -> Result<Metrics> {
        metrics::scrape(ADMIN_LISTEN).context("reading the relay's /metrics")
    }

    pub fn agent_metrics(&self) -> Result<Metrics> {
        metrics::scrape(AGENT_METRICS).context("reading the agent's /metrics (SLUICE_METRICS_LISTEN)")
    }

    /// Log lines of both binaries that mention the data path (each logs its choice once
    /// at start).
    pub fn data_path_log_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (who, log) in [("relay", &self.relay_log), ("agent", &self.agent_log)] {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    l.contains("data path") || l.contains("data_path") || l.contains("ktls")
                })
                .take(3)
                .collect();
            if lines.is_empty() {
                out.push(format!("{who}: no log line mentions the data path"));
            }
            out.extend(lines.iter().map(|l| format!("{who}: {}", l.trim())));
        }
        out
    }

    /// The notable lines ([`is_notable`]) of every log of this stack that were not taken
    /// before, each prefixed with `relay-N.log|` or `agent-N.log|`: warnings, errors and
    /// why control sessions ended, so a failed check shows its cause.
    pub fn take_notable(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (_, log, seen) in &mut self.logs {
            let text = std::fs::read_to_string(&*log).unwrap_or_default();
            let notable: Vec<&str> = text.lines().filter(|l| is_notable(l)).collect();
            let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let new = &notable[(*seen).min(notable.len())..];
            let shown = new.len().min(MAX_NOTABLE);
            out.extend(new[..shown].iter().map(|l| format!("{name}| {}", l.trim())));
            if new.len() > shown {
                out.push(format!("{name}| … {} more such lines in {}", new.len() - shown, log.display()));
            }
            *seen = notable.len();
        }
        out
    }

    /// How many warnings and errors each binary logged so far, e.g. `relay 0/0, agent 2/0`.
    pub fn warning_counts(&self) -> String {
        let mut by_who: Vec<(&str, usize, usize)> = Vec::new();
        for (who, log, _) in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let (w, e) = text.lines().fold((0, 0), |(w, e), l| match level(l) {
                Some("WARN") => (w + 1, e),
                Some("ERROR") => (w, e + 1),
                _ => (w, e),
            });
            match by_who.iter_mut().find(|(x, ..)| x == who) {
                Some(entry) => {
                    entry.1 += w;
                    entry.2 += e;
                }
                None => by_who.push((who, w, e)),
            }
        }
        by_who.iter().map(|(who, w, e)| format!("{who} {w} warnings/{e} errors")).collect::<Vec<_>>().join(", ")
    }

    /// Control sessions that ended since the current relay and agent started: the
    /// relay's `agent session down` lines and the agent's `relay unreachable` lines.
    /// Empty while the one session they started with lives.
    pub fn session_ends(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (log, needle) in [(&self.relay_log, "agent session down"), (&self.agent_log, "relay unreachable")] {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let name = log.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.extend(text.lines().filter(|l| l.contains(needle)).map(|l| format!("{name}| {}", l.trim())));
        }
        out
    }

    /// The last lines of both logs, for failure messages.
    pub fn log_tails(&self) -> String {
        format!("{}\n{}", tail(&self.relay_log, "relay"), tail(&self.agent_log, "agent"))
    }

    /// Stops the agent, then the relay: SIGTERM, then SIGKILL after a bounded wait.
    pub fn stop(&mut self) {
        for child in [self.agent.take(), self.relay.take()].into_iter().flatten() {
            stop(child);
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

fn owned(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// The absolute path of `name` on this process's `PATH` (the children get a cleared
/// environment, so they cannot search it themselves); `/usr/local/bin/<name>` if absent.
fn bin(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| Path::new("/usr/local/bin").join(name))
}

fn spawn(mut cmd: Command, log: &Path) -> Result<Child> {
    let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(f.try_clone()?).stderr(f);
    cmd.spawn().with_context(|| format!("starting {cmd:?} "))
}

fn stop(mut child: Child) {
    // SAFETY: kill(2) on our own child's pid; it has not been reaped yet.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < STOP_TIMEOUT {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` to completion within `timeout` (killed after it); returns success,
/// stdout and stderr.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<(bool, String, String)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut s);
            }
            s
        })
    };
    let out = pipe(child.stdout.take().map(|r| Box::new(r) as _));
    let err = pipe(child.stderr.take().map(|r| Box::new(r) as _));
    let t = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish within {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok((status.success(), out.join().unwrap_or_default(), err.join().unwrap_or_default()))
}

/// utime + stime of `pid` from `/proc/<pid>/stat`, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map(|(_, r)| r).context("malformed /proc/<pid>/stat")?;
    // Fields after the command: state (3) … utime (14), stime (15).
    let f: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> { Ok(f.get(i).context("short /proc/<pid>/stat")?.parse::<u64>()? as f64) };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok((ticks(11)? + ticks(12)?) / hz)
}

fn peak_rss_kib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// At most this many notable lines per log and call of [`Stack::take_notable`].
const MAX_NOTABLE: usize = 40;

/// The level of a `tracing` text log line (`<timestamp>  WARN target: message`).
fn level(line: &str) -> Option<&str> {
    let mut words = line.split_whitespace();
    words.next()?;
    words.next().filter(|w| matches!(*w, "TRACE" | "DEBUG" | "INFO" | "WARN" | "ERROR"))
}

/// Lines worth showing with the results: warnings and errors, and the relay's and
/// agent's lines about control sessions coming and going (with the reason they ended).
pub fn is_notable(line: &str) -> bool {
    matches!(level(line), Some("WARN" | "ERROR"))
        || line.contains("agent session down")
        || line.contains("agent session up")
        || line.contains("connected to the relay")
        || line.contains("panicked")
}

/// The last 15 lines of a log, each prefixed with `who|`.
pub fn tail(log: &Path, who: &str) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| format!("(cannot read {}: {e})", log.display()));
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(15);
    let mut out = format!("  --- last lines of {} ---", log.display());
    for l in &lines[start..] {
        out += &format!("\n  {who}| {l}");
    }
    out
}

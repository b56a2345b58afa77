//! Child processes of the benchmark and what `/proc` says about them.
//!
//! Every tunnel end, iperf3 server and client runs as a [`Child`] that is killed (with
//! its whole process tree: socat forks one process per connection) when dropped, its
//! output going to a log file in the run directory. CPU time and resident memory are
//! read from `/proc/<pid>/stat` and `/proc/<pid>/status`, summed over the process tree.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A running child process, killed with its descendants on drop.
pub struct Child {
    child: std::process::Child,
    log: PathBuf,
    what: String,
}

impl Child {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Child> {
        let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdout(f.try_clone()?).stderr(f).stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("starting {what}: {cmd:?}"))?;
        Ok(Child { child, log: log.to_path_buf(), what: what.to_owned() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the end of the log when the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}): {}", self.what, self.log_tail());
        }
        Ok(())
    }

    /// The last lines of the log, on one line (for error messages and the table's notes).
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.is_empty() { format!("no output (log {})", self.log.display()) } else { tail }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        for pid in descendants(self.pid()) {
            kill(pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command printed.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// stdout when the command succeeded, else an error with its last words.
    pub fn ok(self, what: &str) -> Result<String> {
        if self.status.success() {
            return Ok(self.stdout);
        }
        let said = last_line(&self.stderr).or(last_line(&self.stdout)).unwrap_or("no output");
        bail!("{what} failed ({}): {said}", self.status)
    }
}

/// Runs `cmd` to completion within `limit`, killing it when the limit passes.
pub fn run_within(what: &str, mut cmd: Command, limit: Duration) -> Result<Finished> {
    let dir = std::env::temp_dir();
    let tag = format!("sluice-bench-{}-{}", std::process::id(), COUNTER.fetch_add(1, Relaxed));
    let (out_path, err_path) = (dir.join(format!("{tag}.out")), dir.join(format!("{tag}.err")));
    cmd.stdout(File::create(&out_path)?).stderr(File::create(&err_path)?).stdin(Stdio::null());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}: {cmd:?}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    match status {
        None => bail!("{what} did not finish within {limit:?}"),
        Some(status) => Ok(Finished { status, stdout, stderr }),
    }
}

/// Names the temporary output files of [`run_within`] apart.
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn last_line(s: &str) -> Option<&str> {
    s.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim)
}

fn kill(pid: u32) {
    // SAFETY: kill(2) has no memory effects; pid is a descendant of a child we started.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// The fields of `/proc/<pid>/stat` after the command name (field 3, the state, first).
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = s.get(s.rfind(')')? + 2..)?;
    // The state is a letter; keep the numeric fields' positions by mapping it to 0.
    Some(after.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
}

/// All descendants of `root` (children, grandchildren, …), found through their parents.
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if let Some(f) = stat_fields(pid) {
                parents.push((pid, f[1] as u32));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(pid, _)| *pid));
        i += 1;
    }
    found.remove(0);
    found
}

fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system) used so far by `roots` and their process trees,
/// including children already reaped (cutime + cstime).
pub fn tree_cpu_secs(roots: &[u32]) -> f64 {
    let mut ticks = 0u64;
    for &root in roots {
        for pid in std::iter::once(root).chain(descendants(root)) {
            if let Some(f) = stat_fields(pid) {
                // utime, stime, cutime, cstime are fields 14-17 (indices 11-14 here).
                ticks += f[11] + f[12] + f[13] + f[14];
            }
        }
    }
    ticks as f64 / ticks_per_sec()
}

/// Resident memory (VmRSS) of `root` and its process tree, in KiB.
pub fn tree_rss_kib(root: u32) -> Result<u64> {
    let mut total = 0;
    for pid in std::iter::once(root).chain(descendants(root)) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
        let Ok(status) = status else {
            if pid == root {
                bail!("process {root} is gone");
            }
            continue;
        };
        let rss = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1));
        total += rss.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// The ports the benchmark listens on: the 8192 below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`). The new-stream load leaves tens of thousands of
/// client sockets in TIME_WAIT, and a port held by one cannot be bound for a listener
/// for a minute; no client socket ever takes a port below the ephemeral range.
fn listen_ports() -> std::ops::Range<u16> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low = text.split_whitespace().next().and_then(|p| p.parse::<u16>().ok()).unwrap_or(32768);
    let low = low.max(8192 + 1024);
    low - 8192..low
}

/// Where the next port search starts (spread by pid so parallel runs rarely collide).
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// `n` consecutive loopback ports below the ephemeral range, free when checked.
fn free_ports(n: u16) -> Result<u16> {
    let range = listen_ports();
    let len = u32::from(range.end - range.start);
    let _ = NEXT_PORT.compare_exchange(0, std::process::id().wrapping_mul(7919) % len + 1, Relaxed, Relaxed);
    for _ in 0..len {
        let base = range.start + (NEXT_PORT.fetch_add(u32::from(n), Relaxed) % len) as u16;
        if base.checked_add(n).is_some_and(|end| end <= range.end)
            && (base..base + n).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        {
            return Ok(base);
        }
    }
    bail!("no {n} consecutive free loopback ports in {range:?} (below the ephemeral range)")
}

/// A loopback port below the ephemeral range that was free when checked.
pub fn free_port() -> Result<u16> {
    free_ports(1)
}

/// `n` consecutive loopback ports that were free when checked.
pub fn free_port_range(n: u16) -> Result<u16> {
    free_ports(n)
}

/// Whether something listens on 127.0.0.1:`port` (from `/proc/net/tcp`, without connecting).
pub fn is_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1] == want && f[3] == "0A"
    })
}

/// Polls `f` every 50 ms until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_ports_stay_below_the_ephemeral_range() {
        let range = listen_ports();
        let base = free_port_range(4).unwrap();
        assert!(range.contains(&base) && range.contains(&(base + 3)), "{base} outside {range:?}");
        let one = free_port().unwrap();
        assert!(range.contains(&one));
        assert!(TcpListener::bind(("127.0.0.1", one)).is_ok());
    }
}

//! The eBPF byte counter's own cost, measured exactly by the kernel: with
//! `kernel.bpf_stats_enabled=1` the kernel adds up each program's run time
//! (`run_time_ns`) and runs (`run_cnt`); `bpftool prog show` reads them.
//!
//! The agent attaches its counter to its own cgroup (`agent/src/meter.rs`), one of two
//! designs, each measured here in turn: two `cgroup_skb` programs (egress and ingress,
//! run per packet) or one `sock_ops` program (run per connection event). The agent
//! runs alone in a fresh cgroup2 directory, so the program sees exactly the agent's
//! sockets: per GiB moved through Sluice (iperf3, 1 GiB each way) we read the programs'
//! run time and runs before and after, and the relay's and agent's CPU time over the
//! same transfer from `/proc`. Then an iperf3 client and server that are not the
//! agent's streams are put into the same cgroup and move 1 GiB directly: what the
//! programs cost on sockets they see but do not count.
//!
//! Needs root, a cgroup2 mount, bpftool and an agent built with its program; otherwise the
//! section says why it was skipped. The sysctl is restored, and the cgroup removed, after.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::load;
use super::procs::{self, Child};
use super::sluice;

const GIB: u64 = 1 << 30;
const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Run time and runs of the agent's programs, summed.
#[derive(Clone, Copy, Default, Debug, PartialEq)]
pub struct ProgStats {
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

/// One measured case: what the programs did while `bytes` moved.
#[derive(Debug)]
pub struct Case {
    pub what: String,
    pub bytes: u64,
    pub prog: ProgStats,
    /// CPU-seconds of the processes that moved the bytes (see the case's text).
    pub cpu_secs: f64,
}

impl Case {
    fn per_gib(&self, v: f64) -> f64 {
        v / (self.bytes as f64 / GIB as f64)
    }

    /// A Markdown table row: program, case, µs/GiB, runs/GiB, ns/run, ms, CPU-s/GiB,
    /// share of the CPU.
    fn row(&self, program: &str) -> String {
        let ns_per_run =
            if self.prog.run_cnt > 0 { self.prog.run_time_ns as f64 / self.prog.run_cnt as f64 } else { 0.0 };
        let share =
            if self.cpu_secs > 0.0 { self.prog.run_time_ns as f64 / (self.cpu_secs * 1e9) * 100.0 } else { 0.0 };
        format!(
            "| {program} | {} | {:.0} | {:.0} | {:.1} | {:.0} | {:.2} | {:.3} % |\n",
            self.what,
            self.per_gib(self.prog.run_time_ns as f64) / 1e3,
            self.per_gib(self.prog.run_cnt as f64),
            ns_per_run,
            self.prog.run_time_ns as f64 / 1e6,
            self.per_gib(self.cpu_secs),
            share
        )
    }
}

/// How the section's figures are measured (printed above its table).
const METHOD: &str = "Per counter design, a fresh relay and agent (`SLUICE_COUNTER=cgroup_skb`: two programs, \
egress and ingress, run on every packet; `SLUICE_COUNTER=sock_ops`: one program run on a socket's connection \
events and state changes, with live counts read as `TCP_INFO`; the agent's log must say it counts with that \
program), the agent alone in a fresh cgroup2 directory, so its programs (attached to the agent's own cgroup) \
see only the agent's sockets. With `kernel.bpf_stats_enabled=1` (restored after) the \
kernel sums each program's run time and runs; `bpftool prog show` reads them before and after each case. \
Cases: iperf3 moves 1 GiB (`-n 1G`) client → backend, then 1 GiB backend → client, through Sluice (CPU: \
utime+stime of relay and agent over the same transfer, from /proc); then an iperf3 client and server that \
are no stream of the agent are put into the same cgroup and move 1 GiB to each other directly: what the \
programs cost on sockets they see but do not count (CPU: both iperf3 processes). On loopback the ingress \
program runs in the sending process's softirq, so part of its time is charged to the sender (the relay, or \
the iperf3 backend, which is not among the movers); the share is the program's run time ÷ the movers' CPU \
time. Enabling the statistics itself adds two clock reads per run, included in the run time.\n\n";

/// The Markdown of the eBPF section: the cases' table, or why it was not measured.
pub fn section(bins: &Path, dir: &Path) -> String {
    let mut out = String::from("### eBPF counting cost (kernel BPF statistics)\n\n");
    out += METHOD;
    out += "| program | traffic | µs of program run time per GiB | program runs per GiB | ns per run | \
            run time, ms | CPU-s per GiB of the movers | program ÷ movers' CPU |\n\
            |---|---|---:|---:|---:|---:|---:|---:|\n";
    for counter in COUNTERS {
        match measure(bins, &dir.join(counter), counter) {
            Ok(cases) => {
                for c in &cases {
                    out += &c.row(counter);
                }
            }
            Err(e) => {
                out += &format!("| {counter} | not measured: {} | | | | | | |\n", e.to_string().replace('\n', " "))
            }
        }
    }
    out
}

/// Restores `kernel.bpf_stats_enabled` on drop.
struct StatsEnabled {
    before: String,
}

impl StatsEnabled {
    fn enable() -> Result<StatsEnabled> {
        let before = std::fs::read_to_string(STATS_SYSCTL).with_context(|| format!("reading {STATS_SYSCTL}"))?;
        std::fs::write(STATS_SYSCTL, "1").with_context(|| format!("setting {STATS_SYSCTL} to 1 (needs root)"))?;
        Ok(StatsEnabled { before: before.trim().to_owned() })
    }
}

impl Drop for StatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.before) {
            eprintln!("could not restore {STATS_SYSCTL} to {}: {e}; set it by hand", self.before);
        }
    }
}

/// A fresh cgroup2 directory, removed on drop (once its processes are gone).
struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    fn create() -> Result<Cgroup> {
        let mounts = std::fs::read_to_string("/proc/self/mounts")?;
        let mount = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .context("no cgroup2 file system is mounted")?;
        let path = mount.join(format!("sluice-bench-{}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating cgroup {} (needs root)", path.display()))?;
        Ok(Cgroup { path })
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = procs::wait_for(Duration::from_secs(10), "the benchmark cgroup to empty", || {
            Ok(std::fs::remove_dir(&self.path).is_ok().then_some(()))
        });
    }
}

/// `bpftool cgroup show CGROUP --json`: the ids of the programs attached there.
fn attached_programs(cgroup: &Path) -> Result<Vec<u64>> {
    let mut cmd = Command::new("bpftool");
    cmd.args(["cgroup", "show"]).arg(cgroup).arg("--json");
    let out = procs::run_within("bpftool cgroup show", cmd, Duration::from_secs(10))?.ok("bpftool cgroup show")?;
    let v: serde_json::Value = serde_json::from_str(out.trim()).context("bpftool cgroup show printed no JSON")?;
    Ok(v.as_array().map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect()).unwrap_or_default())
}

/// Sums of `run_time_ns` and `run_cnt` of programs `ids` (`bpftool prog show id N --json`).
/// Fails when the statistics were switched off meanwhile (the sysctl is global: another
/// run on the machine may have restored it), as the sums would then be short.
fn stats(ids: &[u64]) -> Result<ProgStats> {
    let now = std::fs::read_to_string(STATS_SYSCTL).unwrap_or_default();
    if now.trim() != "1" {
        bail!("kernel.bpf_stats_enabled was switched to {:?} by someone else during the measurement", now.trim());
    }
    let mut sum = ProgStats::default();
    for id in ids {
        let mut cmd = Command::new("bpftool");
        cmd.args(["prog", "show", "id", &id.to_string(), "--json"]);
        let out = procs::run_within("bpftool prog show", cmd, Duration::from_secs(10))?.ok("bpftool prog show")?;
        let s = parse_prog_stats(&out)?;
        sum.run_time_ns += s.run_time_ns;
        sum.run_cnt += s.run_cnt;
    }
    Ok(sum)
}

/// One program's statistics from `bpftool prog show --json` (absent fields: never ran).
fn parse_prog_stats(json: &str) -> Result<ProgStats> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).context("bpftool prog show printed no JSON")?;
    let v = if v.is_array() { &v[0] } else { &v };
    if v["id"].as_u64().is_none() {
        bail!("bpftool prog show: no program in {json:?}");
    }
    Ok(ProgStats { run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0), run_cnt: v["run_cnt"].as_u64().unwrap_or(0) })
}

/// CPU-seconds of this process's reaped children (`RUSAGE_CHILDREN`).
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage fills the struct we pass; no other effects.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// `iperf3` moving `bytes` from a client at `connect` to a server on `listen`, both run
/// in `cgroup` when given; `reverse`: the server sends. Returns the bytes received.
fn iperf_bytes(connect: u16, listen: u16, bytes: u64, reverse: bool, cgroup: Option<&Path>, log: &Path) -> Result<u64> {
    let wrap = |args: &[String]| {
        let mut cmd = match cgroup {
            Some(cg) => {
                let mut sh = Command::new("/bin/sh");
                sh.args(["-c", "echo $$ > \"$1/cgroup.procs\" && shift && exec iperf3 \"$@\"", "sh"]).arg(cg);
                sh
            }
            None => Command::new("iperf3"),
        };
        cmd.args(args);
        cmd
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let server = wrap(&s(&["-s", "-1", "-B", "127.0.0.1", "-p", &listen.to_string()]));
    let server = Child::spawn("iperf3 server", server, log)?;
    procs::wait_for(Duration::from_secs(5), "the iperf3 server to listen", || {
        Ok(procs::is_listening(listen).then_some(()))
    })?;
    let mut args = s(&["-c", "127.0.0.1", "-p", &connect.to_string(), "-J", "-n", &bytes.to_string()]);
    if reverse {
        args.push("-R".into());
    }
    let done = procs::run_within("iperf3 client", wrap(&args), Duration::from_secs(300));
    drop(server);
    let done = done?;
    let got = load::parse_iperf_json(&done.stdout)?.bytes;
    done.ok("iperf3 client")?;
    Ok(got)
}

/// The agent's two counter designs (`SLUICE_COUNTER` values, as its log names them).
const COUNTERS: [&str; 2] = ["cgroup_skb", "sock_ops"];

/// The cases, with the agent counting by `counter`: 1 GiB up and 1 GiB down through
/// Sluice; 1 GiB on other sockets of the cgroup.
fn measure(bins: &Path, dir: &Path, counter: &str) -> Result<Vec<Case>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root (loads the agent's eBPF program, sets kernel.bpf_stats_enabled)");
    }
    if !super::install::on_path("bpftool") {
        bail!("bpftool is missing (scripts/install-bench-peers.sh installs Debian's bpftool)");
    }
    std::fs::create_dir_all(dir)?;
    let cgroup = Cgroup::create()?;
    let backend = procs::free_port()?;
    // The agent needs a backend that listens to become AVAILABLE; an echo listener.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let tunnel = {
        let _echo = load::EchoServer::start(&rt, backend)?;
        sluice::start_with(bins, backend, dir, Some(&cgroup.path), counter).context("starting Sluice")?
    };
    let agent_log = std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    if !agent_log.lines().any(|l| l.contains("counting stream bytes with eBPF") && l.contains(counter)) {
        let why =
            agent_log.lines().find(|l| l.contains("counting stream bytes")).unwrap_or("no counter line in its log");
        bail!("the agent did not attach its eBPF counter: {why}");
    }
    let ids = attached_programs(&cgroup.path)?;
    if ids.is_empty() {
        bail!("bpftool shows no program attached to {}", cgroup.path.display());
    }
    let _stats = StatsEnabled::enable()?;
    let pids = tunnel.pids();
    let mut cases = Vec::new();
    for (what, reverse) in
        [("1 GiB client → backend through Sluice", false), ("1 GiB backend → client through Sluice", true)]
    {
        eprintln!("    eBPF cost ({counter}): {what}");
        let (s0, cpu0) = (stats(&ids)?, procs::tree_cpu_secs(&pids));
        let log = dir.join(format!("iperf3-server-ebpf-{reverse}.log"));
        let bytes = iperf_bytes(tunnel.public_port, backend, GIB, reverse, None, &log)?;
        let (s1, cpu1) = (stats(&ids)?, procs::tree_cpu_secs(&pids));
        let prog = ProgStats { run_time_ns: s1.run_time_ns - s0.run_time_ns, run_cnt: s1.run_cnt - s0.run_cnt };
        cases.push(Case { what: format!("{what} (movers: relay + agent)"), bytes, prog, cpu_secs: cpu1 - cpu0 });
    }
    eprintln!("    eBPF cost ({counter}): 1 GiB on sockets of the agent's cgroup that are not streams");
    let port = procs::free_port()?;
    let (s0, cpu0) = (stats(&ids)?, children_cpu_secs());
    let log = dir.join("iperf3-server-ebpf-other.log");
    let bytes = iperf_bytes(port, port, GIB, false, Some(&cgroup.path), &log)?;
    let (s1, cpu1) = (stats(&ids)?, children_cpu_secs());
    let prog = ProgStats { run_time_ns: s1.run_time_ns - s0.run_time_ns, run_cnt: s1.run_cnt - s0.run_cnt };
    cases.push(Case {
        what: "1 GiB between an iperf3 client and server in the agent's cgroup, no tunnel (movers: both iperf3)".into(),
        bytes,
        prog,
        cpu_secs: cpu1 - cpu0,
    });
    drop(tunnel);
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_run_time_and_count() {
        let json = r#"{"id":18467,"type":"cgroup_skb","name":"sluice_egress","run_time_ns":123456,"run_cnt":789}"#;
        assert_eq!(parse_prog_stats(json).unwrap(), ProgStats { run_time_ns: 123456, run_cnt: 789 });
        // Statistics off or the program never ran: bpftool leaves the fields out.
        let idle = r#"[{"id":5,"type":"cgroup_skb","name":"sluice_ingress"}]"#;
        assert_eq!(parse_prog_stats(idle).unwrap(), ProgStats::default());
        assert!(parse_prog_stats("{}").is_err());
    }

    #[test]
    fn rows_per_gib_and_share() {
        let c = Case {
            what: "x".into(),
            bytes: 2 * GIB,
            prog: ProgStats { run_time_ns: 40_000_000, run_cnt: 400_000 },
            cpu_secs: 4.0,
        };
        // 20 ms per GiB = 20000 µs; 200000 runs per GiB; 100 ns per run; 40 ms; 2 CPU-s per GiB; 1 %.
        assert_eq!(c.row("p"), "| p | x | 20000 | 200000 | 100.0 | 40 | 2.00 | 1.000 % |\n");
    }
}

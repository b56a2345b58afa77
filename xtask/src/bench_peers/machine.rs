//! What the numbers were measured on: kernel, CPU, cores, memory, load, date, commit,
//! and the version of every peer, for the header of the bench-peers section.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use super::procs;

/// The kernel release, CPU model, core count, memory and kTLS availability, on one line.
pub fn describe() -> String {
    let kernel = read_trim("/proc/sys/kernel/osrelease");
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let aes = if cpuinfo.split_whitespace().any(|f| f == "aes") { "AES-NI" } else { "no AES-NI" };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let ktls = if read_trim("/proc/sys/net/ipv4/tcp_available_ulp").split_whitespace().any(|u| u == "tls") {
        "kernel TLS available"
    } else {
        "no kernel TLS (`tls` ULP absent)"
    };
    format!("Linux {kernel}, {model} ({aes}), {cores} cores, {:.0} GiB RAM, {ktls}", mem_kib / (1u64 << 20) as f64)
}

/// The 1-minute load average.
pub fn load_average() -> String {
    read_trim("/proc/loadavg").split_whitespace().next().unwrap_or("?").to_owned()
}

/// UTC date and time, e.g. `2026-11-23 10:50 UTC`.
pub fn now_utc() -> String {
    command_line(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])).unwrap_or_else(|| "unknown date".into())
}

/// The short commit hash, with `+ uncommitted changes` when the work tree differs.
pub fn commit(root: &Path) -> String {
    let hash = command_line(Command::new("git").current_dir(root).args(["rev-parse", "--short", "HEAD"]));
    let dirty = command_line(Command::new("git").current_dir(root).args(["status", "--porcelain"])).is_some();
    match hash {
        Some(h) if dirty => format!("{h} + uncommitted changes"),
        Some(h) => h,
        None => "unknown commit".into(),
    }
}

/// The first version-looking word (digits and dots) that `program args` prints.
pub fn version(program: &Path, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    let Ok(done) = procs::run_within("version", cmd, Duration::from_secs(10)) else { return "?".into() };
    let text = format!("{}\n{}", done.stdout, done.stderr);
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()))
        .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .unwrap_or("?")
        .to_owned()
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path).map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// The first line a command prints, if it succeeds and prints one.
fn command_line(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|o| o.status.success())?;
    String::from_utf8_lossy(&out.stdout).lines().next().map(|l| l.trim().to_owned()).filter(|l| !l.is_empty())
}

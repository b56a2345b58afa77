//! Boots the VM under QEMU (software emulation: the machines have no KVM), streams its
//! serial console to stdout and a log file, enforces the time limit, and judges the
//! `PASS`/`FAIL`/`VM-DONE` lines.
//!
//! `-cpu max` gives the emulated CPU AES-NI, which the kernel's `aesni_intel` needs;
//! `-nic none` avoids a default network card whose option ROM a `--no-install-recommends`
//! QEMU may not have; `-no-reboot` with `panic=-1` turns a guest panic (for instance
//! `/init` dying) into QEMU exiting instead of a reboot loop.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What a VM run printed, judged.
#[derive(Debug, Clone)]
pub struct VmReport {
    /// Names from `PASS <name> …` lines, in order.
    pub passed: Vec<String>,
    /// Names from `FAIL <name> …` lines, plus `vm-done` (no `VM-DONE` line: timeout or
    /// crash), `vm-rc` (non-zero `rc`) and `no-pass` (not a single PASS) when those
    /// happen, so that the summary line counts them as failures too.
    pub failed: Vec<String>,
    /// The driver script's exit code from `VM-DONE rc=N`, if the line came.
    pub rc: Option<i32>,
    /// Serial console and QEMU output of the run.
    pub log_path: PathBuf,
    /// Host tools, kernel and initramfs.
    pub setup: Duration,
    /// QEMU start to the first line of `/init`.
    pub boot: Duration,
    /// First line of `/init` to `VM-DONE` (or to QEMU exiting).
    pub tests: Duration,
    /// Which kernel ran, e.g. `stable kernel 6.1.0-57-cloud-amd64` (set by the caller).
    pub kernel: String,
}

impl VmReport {
    /// Prints the timings, then, as the very last line, `vm-test: N passed, M failed
    /// (<kernel>)`.
    pub fn print_summary(&self) {
        self.print_details();
        println!("vm-test: {} passed, {} failed ({})", self.passed.len(), self.failed.len(), self.kernel);
    }

    /// The timings and the failed checks, each line naming the kernel.
    pub fn print_details(&self) {
        println!(
            "vm-test: {}: set-up {:.1} s, boot {:.1} s, tests {:.1} s, rc {}; log {}",
            self.kernel,
            self.setup.as_secs_f64(),
            self.boot.as_secs_f64(),
            self.tests.as_secs_f64(),
            self.rc.map_or("none".to_string(), |rc| rc.to_string()),
            self.log_path.display()
        );
        for f in &self.failed {
            println!("vm-test: FAILED {f} ({})", self.kernel);
        }
    }
}

/// Result lines found in the guest's output.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    passed: Vec<String>,
    failed: Vec<String>,
    rc: Option<i32>,
}

/// Reads `PASS <name>`, `FAIL <name>` and `VM-DONE rc=N` lines and adds the
/// pseudo-failures for a missing `VM-DONE`, a non-zero rc and zero passes.
fn judge<'a>(lines: impl IntoIterator<Item = &'a str>) -> Parsed {
    let mut p = Parsed::default();
    for line in lines {
        let t = line.trim();
        let name = |rest: &str| rest.split_whitespace().next().unwrap_or("(unnamed)").to_string();
        if let Some(rest) = t.strip_prefix("PASS ") {
            p.passed.push(name(rest));
        } else if let Some(rest) = t.strip_prefix("FAIL ") {
            p.failed.push(name(rest));
        } else if let Some(i) = t.find("VM-DONE rc=") {
            let n = t[i + "VM-DONE rc=".len()..].split_whitespace().next().unwrap_or("");
            p.rc = Some(n.parse().unwrap_or(-1));
        }
    }
    match p.rc {
        None => p.failed.push("vm-done".into()),
        Some(0) => {}
        Some(_) => p.failed.push("vm-rc".into()),
    }
    if p.passed.is_empty() {
        p.failed.push("no-pass".into());
    }
    p
}

enum Event {
    Guest(String),
    Qemu(String),
}

/// Drops terminal escape sequences (SeaBIOS clears the screen) and control characters,
/// so lines match their markers and the log reads cleanly.
fn clean(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.next_if_eq(&'[').is_some() {
                    // CSI: parameters and intermediates, then one final byte @..~.
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next(); // two-character sequence such as ESC c
                }
            }
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// Spawns a thread sending each line of `r` through `tx`.
fn pump(
    r: impl Read + Send + 'static,
    tx: mpsc::Sender<Event>,
    wrap: fn(String) -> Event,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = clean(&String::from_utf8_lossy(&buf));
                    if tx.send(wrap(line)).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Boots `vmlinuz` with `initrd`, returning the judged output (an error only if QEMU
/// cannot run at all).
pub fn boot(
    qemu: &Path,
    vmlinuz: &Path,
    initrd: &Path,
    log_path: &Path,
    timeout: Duration,
    setup: Duration,
) -> Result<VmReport> {
    let mut log = std::fs::File::create(log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", "tcg", "-cpu", "max", "-m", "1024", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!("vm-test: booting (timeout {} s): {cmd:?}", timeout.as_secs());
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("starting {}", qemu.display()))?;
    let (tx, rx) = mpsc::channel();
    let readers = [
        pump(child.stdout.take().expect("piped stdout"), tx.clone(), Event::Guest),
        pump(child.stderr.take().expect("piped stderr"), tx, Event::Qemu),
    ];

    let deadline = start + timeout;
    let mut lines = Vec::new();
    let (mut init_at, mut done_at) = (None, None);
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Event::Guest(line)) => {
                let now = Instant::now();
                if init_at.is_none() && line.starts_with("vm-init:") {
                    init_at = Some(now);
                }
                if line.contains("VM-DONE rc=") {
                    done_at = Some(now);
                }
                println!("vm| {line}");
                let _ = writeln!(log, "{line}");
                lines.push(line);
            }
            Ok(Event::Qemu(line)) => {
                eprintln!("qemu: {line}");
                let _ = writeln!(log, "qemu: {line}");
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        let msg = format!("vm-test: timeout after {} s, killing QEMU", timeout.as_secs());
        eprintln!("{msg}");
        let _ = writeln!(log, "{msg}");
        let _ = child.kill();
    }
    let status = child.wait().context("waiting for QEMU")?;
    for r in readers {
        let _ = r.join();
    }
    let end = Instant::now();
    if !status.success() && !timed_out {
        let _ = writeln!(log, "qemu exited with {status}");
        eprintln!("vm-test: qemu exited with {status}");
    }

    let parsed = judge(lines.iter().map(String::as_str));
    let init_at = init_at.unwrap_or(end);
    Ok(VmReport {
        passed: parsed.passed,
        failed: parsed.failed,
        rc: parsed.rc,
        log_path: log_path.to_path_buf(),
        setup,
        boot: init_at - start,
        tests: done_at.unwrap_or(end).saturating_duration_since(init_at),
        kernel: String::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_a_good_run() {
        let p = judge(["vm-init: kernel 6.1", "PASS ktls-aes128-gcm 64 MiB", "  PASS ktls-splice ok", "VM-DONE rc=0"]);
        assert_eq!(
            p,
            Parsed { passed: vec!["ktls-aes128-gcm".into(), "ktls-splice".into()], failed: vec![], rc: Some(0) }
        );
    }

    #[test]
    fn cleans_escapes() {
        assert_eq!(clean("\x1bc\x1b[?7l\x1b[2Jvm-init: kernel 6.1\r\n"), "vm-init: kernel 6.1");
        assert_eq!(clean("PASS a\tb"), "PASS a\tb");
    }

    #[test]
    fn judges_failures() {
        let p = judge(["PASS a", "FAIL ktls-module tls missing", "VM-DONE rc=3"]);
        assert_eq!(p.failed, ["ktls-module", "vm-rc"]);
        assert_eq!(p.rc, Some(3));
        let p = judge(["[  1.0] Kernel panic - not syncing"]);
        assert_eq!(p.failed, ["vm-done", "no-pass"]);
        let p = judge(["VM-DONE rc=0"]);
        assert_eq!(p.failed, ["no-pass"]);
    }
}

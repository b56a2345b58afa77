//! `cargo xtask vm-test` (no arguments) and `cargo xtask vm-bench`: the real `sluice` and
//! `sluice-agent` binaries, end to end, in the kTLS VM.
//!
//! Both binaries and the in-guest test driver (`vm/driver`, package `sluice-vm-driver`)
//! are built in one cargo invocation as static glibc executables (`+crt-static`; the
//! `ktls` crate does not build for musl) into `target/vm-static/`, apart from host builds
//! so neither invalidates the other. `vm-test` builds them as shipped; `vm-bench` adds
//! the cargo feature `bench-engines`, which the `uring`, `threads` and `copy` engines
//! need (production builds answer `SLUICE_KTLS_ENGINE=uring` with an error naming it).
//! `SLUICE_NO_EBPF=1` skips the agent's eBPF program,
//! which needs a toolchain the guest has no use for. The debug info of the release
//! profile is stripped into `target/vm-static/guest/` (84 MB → 17 MB for `sluice`) so
//! the initramfs stays small; without `strip` on the host the full binaries are used.
//!
//! The guest's `/driver.sh` runs `sluice-vm-driver e2e` (or `bench`), which starts the
//! relay, a customer, a registration JWT and the agent itself and prints `PASS`/`FAIL`
//! lines for `bulk`, `heartbeat`, `half_close`, `abort_backend`, `abort_client`, `path`,
//! `latency`, `compare` and `rekey_unsupported` (see `vm/driver/src/main.rs`).
//!
//! `vm-test` boots twice by default (`--kernel both`): `e2e` on the stable kernel (6.1,
//! whose kTLS cannot follow a TLS KeyUpdate: `rekey_unsupported` proves such a stream
//! aborts), then `sluice-vm-driver rekey` on the rekey kernel (>= 6.14, fetched from
//! trixie-backports by [`super::backports`]): a user-space peer sending KeyUpdates every
//! 256 records to a kTLS agent (`rekey_agent_ktls`) and to a kTLS relay
//! (`rekey_relay_ktls`), which must follow them, and both ends on kTLS updating their own
//! send keys after a lowered budget (`rekey_both_ktls`). The binaries are built once for both
//! boots; a failed first boot does not skip the second, and the last line counts both,
//! naming each kernel.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{GuestKernel, VmReport, VmRun};

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The binaries the guest needs, by their file names.
const BINARIES: &[&str] = &["sluice", "sluice-agent", "sluice-vm-driver"];

/// Default MiB each way of the `bulk` check: the 256 MiB both ways the data path is
/// specified with. Emulated crypto moves about 2.8 MiB/s per direction, so the transfer
/// takes about 95 s and the whole VM run about two minutes (docs/ktls.md).
pub const DEFAULT_MIB: u64 = 256;
/// Default MiB each way of the `compare` check (user-space path, for CPU per GiB).
pub const DEFAULT_COMPARE_MIB: u64 = 32;
/// Default MiB each way per engine of `vm-bench` (five engines: about 2.5 minutes).
pub const DEFAULT_BENCH_MIB: u64 = 64;
/// Engines `vm-bench` runs by default, in this order.
pub const DEFAULT_ENGINES: &str = "splice,uring,threads,copy,userspace";

/// Default MiB each way of each of the driver's `rekey` checks: 1024 records of 16 KiB
/// per direction, so a KeyUpdate every 256 records gives about four; at the emulated
/// 2.8 MiB/s per direction about 6 s per check.
pub const DEFAULT_REKEY_MIB: u64 = 16;

/// The driver's `latency` check (4 MiB each way over a 200 ms round trip), in the MiB of
/// [`budget`]: 30 s.
const LATENCY_BUDGET: u64 = 30;
/// The `e2e` command's `rekey_unsupported` check (at most 8 MiB each way, aborted early)
/// and its restart of relay + agent, in the MiB of [`budget`]: 28 s.
const REKEY_UNSUPPORTED_BUDGET: u64 = 28;

/// Which kernels `cargo xtask vm-test` boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kernels {
    /// The stable kernel (6.1), driver command `e2e`.
    Stable,
    /// The rekey kernel (>= 6.14), driver command `rekey`.
    Rekey,
    /// Both, stable first.
    #[default]
    Both,
}

impl Kernels {
    pub fn parse(v: Option<&String>) -> Result<Kernels> {
        match v.map(String::as_str) {
            Some("stable") => Ok(Kernels::Stable),
            Some("rekey") => Ok(Kernels::Rekey),
            Some("both") => Ok(Kernels::Both),
            other => bail!("--kernel {other:?}: expected stable, rekey or both"),
        }
    }

    fn boots(self) -> &'static [GuestKernel] {
        match self {
            Kernels::Stable => &[GuestKernel::Stable],
            Kernels::Rekey => &[GuestKernel::Rekey],
            Kernels::Both => &[GuestKernel::Stable, GuestKernel::Rekey],
        }
    }
}

/// What `cargo xtask vm-test` (end to end) moves, and on which kernels.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub mib: u64,
    pub compare_mib: u64,
    /// MiB each way of each `rekey` check on the rekey kernel.
    pub rekey_mib: u64,
    pub kernels: Kernels,
    /// `None`: derived from the sizes ([`budget`]); otherwise the limit of each boot.
    pub timeout: Option<Duration>,
}

impl Default for E2eOptions {
    fn default() -> Self {
        E2eOptions {
            mib: DEFAULT_MIB,
            compare_mib: DEFAULT_COMPARE_MIB,
            rekey_mib: DEFAULT_REKEY_MIB,
            kernels: Kernels::Both,
            timeout: None,
        }
    }
}

/// What `cargo xtask vm-bench` moves.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub mib: u64,
    /// Comma-separated `SLUICE_KTLS_ENGINE` values, plus `userspace`.
    pub engines: String,
    pub timeout: Option<Duration>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { mib: DEFAULT_BENCH_MIB, engines: DEFAULT_ENGINES.into(), timeout: None }
    }
}

/// A VM time limit for moving `mib_each_way` MiB in each direction in total over the
/// run, plus `restarts` relay + agent start-ups: two minutes for boot and the short
/// checks, one per start-up, then 1 s per MiB each way (1 MiB/s per direction: a third
/// of the measured speed, the same floor the driver's own deadlines assume).
pub fn budget(mib_each_way: u64, restarts: u64) -> Duration {
    Duration::from_secs(120 + 60 * restarts + mib_each_way)
}

/// Builds the static binaries and runs the end-to-end test in the VM: `e2e` on the
/// stable kernel and/or `rekey` on the rekey kernel. Prints each boot's details, then as
/// the last line `vm-test: N passed, M failed (stable kernel …: a/b; rekey kernel …:
/// c/d)`; fails if any boot failed or could not run.
pub fn e2e(ws_root: &Path, opts: &E2eOptions) -> Result<()> {
    let binaries = build_static(ws_root, Engines::Production)?;
    let mut reports: Vec<VmReport> = Vec::new();
    let mut errors: Vec<(GuestKernel, anyhow::Error)> = Vec::new();
    for &kernel in opts.kernels.boots() {
        let (driver_script, timeout) = match kernel {
            GuestKernel::Stable => (
                format!(
                    "echo \"e2e: real sluice + sluice-agent, bulk {mib} MiB each way, compare {cmp} MiB each way\"\n\
                     sluice-vm-driver e2e --mib {mib} --compare-mib {cmp}\n",
                    mib = opts.mib,
                    cmp = opts.compare_mib
                ),
                budget(opts.mib + opts.compare_mib + 2 + LATENCY_BUDGET + REKEY_UNSUPPORTED_BUDGET, 2),
            ),
            GuestKernel::Rekey => (
                format!(
                    "echo \"rekey: real sluice + sluice-agent, TLS KeyUpdate into kTLS, {mib} MiB each way per check\"\n\
                     sluice-vm-driver rekey --mib {mib}\n",
                    mib = opts.rekey_mib
                ),
                budget(2 * opts.rekey_mib, 2),
            ),
        };
        let timeout = opts.timeout.unwrap_or(timeout);
        let run = VmRun { binaries: binaries.clone(), driver_script, timeout, kernel };
        eprintln!("vm-test: === {} kernel ===", kernel.name());
        match super::run_report(ws_root, &run) {
            Ok(r) => {
                r.print_details();
                if opts.kernels.boots().len() > 1 {
                    println!("vm-test: {} passed, {} failed ({})", r.passed.len(), r.failed.len(), r.kernel);
                }
                reports.push(r);
            }
            Err(e) => {
                println!("vm-test: FAILED {} kernel: could not boot: {e:#}", kernel.name());
                errors.push((kernel, e));
            }
        }
    }
    println!("{}", summary_line(&reports, &errors));
    let failed: Vec<String> = reports
        .iter()
        .flat_map(|r| r.failed.iter().map(move |f| format!("{f} ({})", r.kernel)))
        .chain(errors.iter().map(|(k, e)| format!("{} kernel: {e:#}", k.name())))
        .collect();
    if !failed.is_empty() {
        let logs: Vec<String> = reports.iter().map(|r| r.log_path.display().to_string()).collect();
        bail!("VM tests failed: {} (logs: {})", failed.join(", "), logs.join(", "));
    }
    Ok(())
}

/// `vm-test: N passed, M failed (stable kernel 6.1.0-57-cloud-amd64: 10 passed, 0
/// failed; rekey kernel …: 2 passed, 0 failed)`; a boot that could not run counts as one
/// failure.
fn summary_line(reports: &[VmReport], errors: &[(GuestKernel, anyhow::Error)]) -> String {
    let passed: usize = reports.iter().map(|r| r.passed.len()).sum();
    let failed: usize = reports.iter().map(|r| r.failed.len()).sum::<usize>() + errors.len();
    let per: Vec<String> = reports
        .iter()
        .map(|r| format!("{}: {} passed, {} failed", r.kernel, r.passed.len(), r.failed.len()))
        .chain(errors.iter().map(|(k, _)| format!("{} kernel: not booted, 1 failed", k.name())))
        .collect();
    format!("vm-test: {passed} passed, {failed} failed ({})", per.join("; "))
}

/// Builds the static binaries and runs the bulk transfer once per engine in the VM,
/// printing a table (for docs/benchmarks.md).
pub fn bench(ws_root: &Path, opts: &BenchOptions) -> Result<VmReport> {
    let engines = opts.engines.split(',').filter(|e| !e.is_empty()).count() as u64;
    if engines == 0 {
        bail!("--engines is empty; give a comma-separated list such as {DEFAULT_ENGINES}");
    }
    let binaries = build_static(ws_root, Engines::WithBenchEngines)?;
    let driver_script = format!(
        "echo \"bench: {mib} MiB each way per engine: {engines}\"\n\
         sluice-vm-driver bench --mib {mib} --engines {engines}\n",
        mib = opts.mib,
        engines = opts.engines
    );
    let timeout = opts.timeout.unwrap_or_else(|| budget(opts.mib * engines, engines));
    super::run(ws_root, &VmRun { binaries, driver_script, timeout, kernel: GuestKernel::Stable })
}

/// Which kernel-TLS engines the static relay and agent carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engines {
    /// As shipped: `splice` only.
    Production,
    /// With the cargo feature `bench-engines`: also `uring`, `threads` and `copy`.
    WithBenchEngines,
}

/// `cargo build --release` of the relay, the agent and the driver as static binaries
/// into `target/vm-static/`; returns the paths to put in the guest.
pub fn build_static(ws_root: &Path, engines: Engines) -> Result<Vec<PathBuf>> {
    let target_dir = ws_root.join("target").join("vm-static");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(ws_root)
        .args(["build", "--release", "--target", TARGET])
        .args(["-p", "sluice", "-p", "sluice-agent", "-p", "sluice-vm-driver", "--bins"])
        .args(match engines {
            Engines::Production => &[][..],
            Engines::WithBenchEngines => &["--features", "sluice/bench-engines,sluice-agent/bench-engines"][..],
        })
        .env("CARGO_TARGET_DIR", &target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("SLUICE_NO_EBPF", "1")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    eprintln!("vm-test: building static binaries: {cmd:?}");
    let t = Instant::now();
    let status = cmd.status().context("running cargo build for the VM's static binaries")?;
    if !status.success() {
        bail!(
            "building the static relay, agent and VM driver failed ({status}); the errors are above \
             (the same code builds for the host with `cargo build --release`)"
        );
    }
    eprintln!("vm-test: static binaries built in {:.1} s", t.elapsed().as_secs_f64());
    let release = target_dir.join(TARGET).join("release");
    let guest = target_dir.join("guest");
    std::fs::create_dir_all(&guest).with_context(|| format!("creating {}", guest.display()))?;
    BINARIES.iter().map(|name| stripped(&release.join(name), &guest.join(name))).collect()
}

/// `strip --strip-debug` of `src` into `dst`, redone only when `src` is newer; `src`
/// itself when the host has no `strip`.
fn stripped(src: &Path, dst: &Path) -> Result<PathBuf> {
    let mtime = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
    let src_time = mtime(src).with_context(|| format!("{} was not built", src.display()))?;
    if mtime(dst).is_some_and(|d| d >= src_time) {
        return Ok(dst.to_path_buf());
    }
    match Command::new("strip").arg("--strip-debug").arg("-o").arg(dst).arg(src).status() {
        Ok(s) if s.success() => Ok(dst.to_path_buf()),
        Ok(s) => bail!("strip --strip-debug {} failed ({s})", src.display()),
        Err(e) => {
            eprintln!(
                "vm-test: cannot run strip ({e}); putting the unstripped {} in the guest (install binutils for a \
                 smaller initramfs)",
                src.display()
            );
            Ok(src.to_path_buf())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_grows_with_the_work() {
        let stable = budget(DEFAULT_MIB + DEFAULT_COMPARE_MIB + 2 + LATENCY_BUDGET + REKEY_UNSUPPORTED_BUDGET, 2);
        assert!(stable <= Duration::from_secs(600), "{stable:?}");
        assert!(budget(2 * DEFAULT_REKEY_MIB, 2) <= Duration::from_secs(300));
        assert!(budget(256, 1) > budget(64, 1));
        assert!(budget(64, 5) > budget(64, 1));
    }

    #[test]
    fn kernels_and_summary() {
        assert_eq!(Kernels::default(), Kernels::Both);
        assert_eq!(Kernels::Both.boots(), [GuestKernel::Stable, GuestKernel::Rekey]);
        assert_eq!(Kernels::parse(Some(&"rekey".to_string())).unwrap(), Kernels::Rekey);
        assert!(Kernels::parse(Some(&"new".to_string())).is_err());
        assert!(Kernels::parse(None).is_err());
        let report = |kernel: &str, passed: usize, failed: usize| VmReport {
            passed: vec!["p".into(); passed],
            failed: vec!["f".into(); failed],
            rc: Some(0),
            log_path: PathBuf::from("serial.log"),
            setup: Duration::ZERO,
            boot: Duration::ZERO,
            tests: Duration::ZERO,
            kernel: kernel.into(),
        };
        let line = summary_line(
            &[report("stable kernel 6.1.0-57-cloud-amd64", 10, 0), report("rekey kernel 7.3.4", 2, 1)],
            &[],
        );
        assert_eq!(
            line,
            "vm-test: 12 passed, 1 failed (stable kernel 6.1.0-57-cloud-amd64: 10 passed, 0 failed; rekey kernel 7.3.4: \
             2 passed, 1 failed)"
        );
        let line =
            summary_line(&[report("stable kernel 6.1", 10, 0)], &[(GuestKernel::Rekey, anyhow::anyhow!("offline"))]);
        assert!(line.starts_with("vm-test: 10 passed, 1 failed ("), "{line}");
        assert!(line.ends_with("rekey kernel: not booted, 1 failed)"), "{line}");
    }
}

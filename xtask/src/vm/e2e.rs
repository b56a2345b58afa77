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
//! lines for `bulk`, `half_close`, `abort_backend`, `abort_client`, `path` and `compare`
//! (see `vm/driver/src/main.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{VmReport, VmRun};

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

/// The driver's `latency` check (4 MiB each way over a 200 ms round trip), in the MiB of
/// [`budget`]: 30 s.
const LATENCY_BUDGET: u64 = 30;

/// What `cargo xtask vm-test` (end to end) moves.
#[derive(Debug, Clone)]
pub struct E2eOptions {
    pub mib: u64,
    pub compare_mib: u64,
    /// `None`: derived from the sizes ([`budget`]).
    pub timeout: Option<Duration>,
}

impl Default for E2eOptions {
    fn default() -> Self {
        E2eOptions { mib: DEFAULT_MIB, compare_mib: DEFAULT_COMPARE_MIB, timeout: None }
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

/// Builds the static binaries and runs the end-to-end test in the VM.
pub fn e2e(ws_root: &Path, opts: &E2eOptions) -> Result<VmReport> {
    let binaries = build_static(ws_root, Engines::Production)?;
    let driver_script = format!(
        "echo \"e2e: real sluice + sluice-agent, bulk {mib} MiB each way, compare {cmp} MiB each way\"\n\
         sluice-vm-driver e2e --mib {mib} --compare-mib {cmp}\n",
        mib = opts.mib,
        cmp = opts.compare_mib
    );
    let timeout = opts.timeout.unwrap_or_else(|| budget(opts.mib + opts.compare_mib + 2 + LATENCY_BUDGET, 2));
    super::run(ws_root, &VmRun { binaries, driver_script, timeout })
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
    super::run(ws_root, &VmRun { binaries, driver_script, timeout })
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
        assert!(budget(DEFAULT_MIB + DEFAULT_COMPARE_MIB + 2 + LATENCY_BUDGET, 2) <= Duration::from_secs(600));
        assert!(budget(256, 1) > budget(64, 1));
        assert!(budget(64, 5) > budget(64, 1));
    }
}

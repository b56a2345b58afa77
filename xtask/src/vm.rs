//! The kTLS VM harness behind `cargo xtask vm-test`, `vm-bench` and `vm-test-smoke`.
//!
//! Sluice's fastest data path hands TLS to the kernel (kTLS) and splices sockets, but
//! the machines that build and test it run a kernel without `CONFIG_TLS`. This module
//! tests that path anyway: it boots a stock Debian cloud kernel (which ships `tls` as a
//! module) under QEMU software emulation, with an initramfs holding busybox, the kTLS
//! modules, the caller's static binaries and a driver script, and reads the results
//! from the serial console.
//!
//! Everything it fetches or builds is cached under `target/` in the workspace root, so
//! only the first run pays for installing QEMU, downloading the kernel and building the
//! static binaries:
//!
//! ```text
//! target/vm-static/             static relay, agent and VM driver (cargo's own cache)
//!   guest/                      the same with debug info stripped: what goes in the VM
//! target/vm-cache/
//!   kernel/<package>/           the stable kernel .deb extracted (boot/vmlinuz-*, lib/modules/*)
//!   kernel/<package>_*.deb      the downloaded package
//!   kernel-rekey/<package>/     the rekey kernel (Linux >= 6.14, trixie-backports) extracted
//!   run-<pid>/initrd.cpio       the initramfs of a run in progress (removed afterwards)
//!   serial.log                  serial console and QEMU output of the last stable-kernel run
//!   serial-rekey.log            the same for the last rekey-kernel run
//! ```
//!
//! Two guest kernels: the **stable** one (Debian 12's cloud kernel, 6.1: the kernel the
//! data path is specified on, and the default) and the **rekey** one (the newest cloud
//! kernel of trixie-backports, >= 6.14, whose kTLS can follow a TLS 1.3 KeyUpdate;
//! [`backports`]). `cargo xtask vm-test` boots both: the end-to-end suite on the stable
//! kernel, then the driver's `rekey` checks on the rekey kernel.
//!
//! The protocol with the guest is line-based: `PASS <name> …` and `FAIL <name> …`
//! lines are results, and `/init` ends with `VM-DONE rc=N`, the driver script's exit
//! code. A run succeeds only if it printed at least one PASS, no FAIL, and `VM-DONE
//! rc=0` before the timeout. The last line printed is always
//! `vm-test: N passed, M failed`.
//!
//! Pieces: [`host`] installs the host tools, [`kernel`] gets the stable kernel and picks
//! the modules, [`backports`] gets the rekey kernel, [`crate::elf`] reads the few ELF facts needed, [`initramfs`] writes the newc
//! archive, [`boot`] runs QEMU and judges the output, [`smoke`] is the built-in kTLS
//! smoke test, [`e2e`] the end-to-end test and benchmark of the real binaries.

mod backports;
mod boot;
mod e2e;

mod host;
mod initramfs;
mod kernel;
mod smoke;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use boot::VmReport;
pub use e2e::{BenchOptions, E2eOptions, Kernels};

/// Default limit for one VM run, boot to power-off.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What to run in the VM.
#[derive(Debug, Clone)]
pub struct VmRun {
    /// Statically linked executables, installed as `/usr/local/bin/<file name>` (first
    /// on the guest's `PATH`). Dynamically linked ones are refused: the guest has no
    /// libc.
    pub binaries: Vec<PathBuf>,
    /// The test driver: a busybox `sh` script, run as `/driver.sh` from `/tmp` after the
    /// kTLS modules are loaded and loopback is up. It reports with `PASS <name> …` /
    /// `FAIL <name> …` lines on stdout; its exit code becomes `VM-DONE rc=N`.
    pub driver_script: String,
    /// Hard limit for the whole boot; QEMU is killed when it passes.
    pub timeout: Duration,
    /// Which guest kernel to boot.
    pub kernel: GuestKernel,
}

/// The guest kernels the harness can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestKernel {
    /// Debian 12's cloud kernel (6.1), from the host's apt sources ([`kernel`]).
    #[default]
    Stable,
    /// The newest trixie-backports cloud kernel, >= 6.14: kTLS follows a KeyUpdate
    /// ([`backports`]).
    Rekey,
}

impl GuestKernel {
    pub fn name(self) -> &'static str {
        match self {
            GuestKernel::Stable => "stable",
            GuestKernel::Rekey => "rekey",
        }
    }

    fn parse(v: Option<&String>) -> Result<GuestKernel> {
        match v.map(String::as_str) {
            Some("stable") => Ok(GuestKernel::Stable),
            Some("rekey") => Ok(GuestKernel::Rekey),
            other => bail!("--kernel {other:?}: expected stable or rekey\n{USAGE}"),
        }
    }

    /// The serial log's file name under `target/vm-cache/`.
    fn log_name(self) -> &'static str {
        match self {
            GuestKernel::Stable => "serial.log",
            GuestKernel::Rekey => "serial-rekey.log",
        }
    }
}

/// Boots the VM with `run` and judges its output.
///
/// Installs missing host tools (as root, with apt), downloads and extracts the kernel
/// once, builds the initramfs, boots, streams the serial console to stdout and to
/// `target/vm-cache/serial.log`, and prints `vm-test: N passed, M failed` last.
/// Returns an error if the VM printed any `FAIL`, no `PASS`, no `VM-DONE`, or a
/// non-zero `rc`; the report of a successful run otherwise.
pub fn run(ws_root: &Path, run: &VmRun) -> Result<VmReport> {
    let report = run_report(ws_root, run)?;
    report.print_summary();
    if !report.failed.is_empty() {
        bail!("VM tests failed: {} (log: {})", report.failed.join(", "), report.log_path.display());
    }
    Ok(report)
}

/// Boots the VM with `run` and returns the judged report without printing the summary
/// or failing on failed checks (an error only if the VM could not be booted at all).
pub fn run_report(ws_root: &Path, run: &VmRun) -> Result<VmReport> {
    let cache = ws_root.join("target").join("vm-cache");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    let t = Instant::now();
    let tools = host::ensure_tools()?;
    let kernel = match run.kernel {
        GuestKernel::Stable => kernel::ensure_kernel(&cache)?,
        GuestKernel::Rekey => backports::ensure_rekey_kernel(&cache)?,
    };
    remove_stale_run_dirs(&cache);
    let run_dir = cache.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir)?;
    let initrd = run_dir.join("initrd.cpio");
    let result = initramfs::build(&initrd, &tools.busybox, &kernel, run).and_then(|()| {
        let setup = t.elapsed();
        eprintln!("vm-test: set-up {:.1} s ({} kernel {})", setup.as_secs_f64(), run.kernel.name(), kernel.version);
        let log = cache.join(run.kernel.log_name());
        boot::boot(&tools.qemu, &kernel.vmlinuz, &initrd, &log, run.timeout, setup)
    });
    let _ = std::fs::remove_dir_all(&run_dir);
    let mut report = result?;
    report.kernel = format!("{} kernel {}", run.kernel.name(), kernel.version);
    Ok(report)
}

/// Removes `run-<pid>` directories left by runs that were killed (their pid is gone).
fn remove_stale_run_dirs(cache: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else { continue };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// `cargo xtask vm-test …`: with no `--bin`/`--script`, the end-to-end test of the real
/// binaries ([`e2e_cli`]); with `--bench`, the engine benchmark ([`bench_cli`]); with
/// `--smoke`, `vm-test-smoke`; otherwise it boots the given binaries with the given
/// driver script.
pub fn vm_test_cli(ws_root: &Path, args: &[String]) -> Result<()> {
    let without = |flag: &str| args.iter().filter(|a| *a != flag).cloned().collect::<Vec<_>>();
    if args.iter().any(|a| a == "--smoke") {
        return smoke_cli(ws_root, &without("--smoke"));
    }
    if args.iter().any(|a| a == "--bench") {
        return bench_cli(ws_root, &without("--bench"));
    }
    if !args.iter().any(|a| a == "--bin" || a == "--script") {
        return e2e_cli(ws_root, args);
    }
    let mut binaries = Vec::new();
    let mut script = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut kernel = GuestKernel::Stable;
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bin" => binaries.push(PathBuf::from(it.next().context("--bin needs a path")?)),
            "--script" => script = Some(PathBuf::from(it.next().context("--script needs a path")?)),
            "--timeout" => timeout = parse_secs(it.next())?,
            "--kernel" => kernel = GuestKernel::parse(it.next())?,
            other => rest.push(other.to_string()),
        }
    }
    if !rest.is_empty() {
        bail!("unknown arguments {rest:?}\n{USAGE}");
    }
    let script = script.with_context(|| format!("--script is required with --bin\n{USAGE}"))?;
    let driver_script =
        std::fs::read_to_string(&script).with_context(|| format!("reading driver script {}", script.display()))?;
    run(ws_root, &VmRun { binaries, driver_script, timeout, kernel }).map(|_| ())
}

/// `cargo xtask vm-test [--mib N] [--compare-mib N] [--rekey-mib N] [--kernel
/// stable|rekey|both] [--timeout SECS]`: builds the relay, the agent and `vm/driver`
/// statically and runs, on the stable kernel, the end-to-end test in the VM (bulk,
/// half-close, resets both ways, data path from the metrics, user space vs kTLS, a
/// KeyUpdate aborting a kTLS stream), then, on the rekey kernel, the KeyUpdate checks.
/// `e2e_cli(ws_root, &[])` (both kernels, default sizes) is the call for `cargo xtask
/// test`.
pub fn e2e_cli(ws_root: &Path, args: &[String]) -> Result<()> {
    let mut opts = E2eOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mib" => opts.mib = parse_mib(a, it.next())?,
            "--compare-mib" => opts.compare_mib = parse_mib(a, it.next())?,
            "--rekey-mib" => opts.rekey_mib = parse_mib(a, it.next())?,
            "--kernel" => opts.kernels = Kernels::parse(it.next())?,
            "--timeout" => opts.timeout = Some(parse_secs(it.next())?),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    e2e::e2e(ws_root, &opts)
}

/// `cargo xtask vm-bench [--mib N] [--engines LIST] [--timeout SECS]` (also `vm-test
/// --bench`): the bulk transfer once per data-path engine, printed as a table.
pub fn bench_cli(ws_root: &Path, args: &[String]) -> Result<()> {
    let mut opts = BenchOptions::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mib" => opts.mib = parse_mib(a, it.next())?,
            "--engines" => opts.engines = it.next().context("--engines needs a comma-separated list")?.clone(),
            "--timeout" => opts.timeout = Some(parse_secs(it.next())?),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    e2e::bench(ws_root, &opts).map(|_| ())
}

/// `cargo xtask vm-test-smoke [--mib N] [--timeout SECS]`: builds `vm/ktls-probe`
/// statically and runs it in the VM (real kTLS: AES-GCM, ChaCha20-Poly1305, splice,
/// close_notify handling).
pub fn smoke_cli(ws_root: &Path, args: &[String]) -> Result<()> {
    let mut mib = 64;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mib" => mib = it.next().context("--mib needs a number")?.parse().context("--mib")?,
            "--timeout" => timeout = parse_secs(it.next())?,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    smoke::smoke(ws_root, mib, timeout).map(|_| ())
}

/// Usage text for the VM subcommands, for the caller's help output.
pub const USAGE: &str = "  vm-test [--mib N] [--compare-mib N] [--rekey-mib N] [--kernel stable|rekey|both]
          [--timeout SECS]
                  build sluice, sluice-agent and vm/driver statically and test them end
                  to end in the kTLS VM (Debian cloud kernels under QEMU). Stable kernel
                  (Debian 12, 6.1): bulk N MiB each way (default 256), half-close, resets,
                  data path from the metrics, user space vs kTLS CPU per GiB (compare,
                  default 32 MiB each way), a peer's TLS KeyUpdate aborting a kTLS stream.
                  Rekey kernel (newest trixie-backports cloud kernel, >= 6.14; pin with
                  SLUICE_VM_REKEY_KERNEL_PKG): kTLS follows KeyUpdates at the agent and at
                  the relay, N MiB each way per check (--rekey-mib, default 16).
                  --kernel picks the boots (default both); --timeout applies to each
  vm-bench [--mib N] [--engines splice,uring,threads,copy,userspace] [--timeout SECS]
                  (also: vm-test --bench) the bulk transfer once per data-path engine,
                  as a table: MiB/s, CPU-s/GiB of relay+agent, user-space copied bytes
  vm-test --bin PATH... --script FILE [--timeout SECS] [--kernel stable|rekey]
                  boot the kTLS VM with these static binaries and this driver script;
                  PASS/FAIL lines are the results
  vm-test-smoke [--mib N] [--timeout SECS]   (also: vm-test --smoke)
                  build vm/ktls-probe statically and run it in the VM: real kTLS with
                  AES-GCM, ChaCha20-Poly1305, splice and close_notify, N MiB each way
";

fn parse_mib(flag: &str, v: Option<&String>) -> Result<u64> {
    let v = v.with_context(|| format!("{flag} needs a number of MiB"))?;
    match v.parse() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{flag} {v:?}: expected a positive number of MiB"),
    }
}

fn parse_secs(v: Option<&String>) -> Result<Duration> {
    let v = v.context("--timeout needs a number of seconds")?;
    Ok(Duration::from_secs(v.parse().with_context(|| format!("--timeout {v:?}"))?))
}

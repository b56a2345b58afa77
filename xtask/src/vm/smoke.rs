//! `cargo xtask vm-test-smoke`: proves the VM really has working kernel TLS by running
//! `vm/ktls-probe` in it (rustls handshake, `ktls` hand-over, AES-128/256-GCM and
//! ChaCha20-Poly1305 in both directions, splice through pipes, close_notify handling).
//!
//! The probe is its own Cargo package (with its own lock file) outside the main
//! workspace. It is built for `x86_64-unknown-linux-gnu` with `+crt-static`, which gives
//! a static-pie binary: the `ktls` crate does not build for musl.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::{GuestKernel, VmReport, VmRun};

const TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds the probe, boots the VM with it, and returns the judged report.
pub fn smoke(ws_root: &Path, mib: usize, timeout: Duration) -> Result<VmReport> {
    let probe = build_probe(ws_root)?;
    let driver_script = format!(
        "echo \"smoke: ktls-probe, {mib} MiB each way per check\"\n\
         ktls-probe --mib {mib}\n"
    );
    super::run(ws_root, &VmRun { binaries: vec![probe], driver_script, timeout, kernel: GuestKernel::Stable })
}

/// `cargo build --release` of vm/ktls-probe as a static binary; returns its path.
fn build_probe(ws_root: &Path) -> Result<PathBuf> {
    let manifest = ws_root.join("vm/ktls-probe/Cargo.toml");
    // The caller's target dir if it set one, else the workspace's: the probe's
    // artifacts land under <target>/x86_64-unknown-linux-gnu/, apart from host builds.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| ws_root.join("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--target", TARGET])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    eprintln!("vm-test: building ktls-probe: {cmd:?}");
    let t = Instant::now();
    let status = cmd.status().context("running cargo build for ktls-probe")?;
    if !status.success() {
        bail!("building ktls-probe failed ({status})");
    }
    eprintln!("vm-test: ktls-probe built in {:.1} s", t.elapsed().as_secs_f64());
    Ok(target_dir.join(TARGET).join("release").join("ktls-probe"))
}

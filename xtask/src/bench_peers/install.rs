//! Gets the peers onto the machine: Debian packages through
//! `scripts/install-bench-peers.sh`, rathole and bore with `cargo install` into
//! `<target>/bench-peers/tools` (cached: skipped when the binary is there).
//!
//! Nothing here is fatal: a peer that cannot be installed is reported "not available"
//! in the table, with the reason, and the others are still measured.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::procs;

/// Runs the apt install script; returns why it failed, if it did.
pub fn debian_packages(root: &Path) -> Option<String> {
    eprintln!("==> install bench peers: bash scripts/install-bench-peers.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("scripts/install-bench-peers.sh")).current_dir(root);
    match procs::run_within("install-bench-peers.sh", cmd, Duration::from_secs(600)) {
        Ok(done) => {
            eprint!("{}{}", done.stdout, done.stderr);
            done.ok("scripts/install-bench-peers.sh").err().map(|e| e.to_string())
        }
        Err(e) => Some(e.to_string()),
    }
}

/// Whether `program` is on the PATH.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// `cargo install CRATE --root TOOLS` (without `--locked`: rathole 0.5.0's lock file
/// does not build on this toolchain) unless `TOOLS/bin/BIN` exists; returns the binary.
pub fn cargo_tool(tools: &Path, krate: &str, bin: &str) -> Result<PathBuf> {
    let path = tools.join("bin").join(bin);
    if path.is_file() {
        eprintln!("    {krate}: cached at {}", path.display());
        return Ok(path);
    }
    eprintln!("==> cargo install {krate} --root {} (a few minutes, once)", tools.display());
    let t = Instant::now();
    let mut cmd = crate::cargo();
    cmd.args(["install", krate, "--root"]).arg(tools).arg("--target-dir").arg(tools.join("build"));
    // Our own build dir and no inherited target dir: the tool build must not touch the workspace's.
    cmd.env_remove("CARGO_TARGET_DIR");
    let done = procs::run_within(&format!("cargo install {krate}"), cmd, Duration::from_secs(1200))?;
    eprintln!("<== cargo install {krate}: {} in {:.0} s", done.status, t.elapsed().as_secs_f64());
    if !done.status.success() {
        let first_error = done.stderr.lines().find(|l| l.starts_with("error")).unwrap_or("no error line");
        bail!("cargo install {krate} failed: {first_error}");
    }
    if !path.is_file() {
        bail!("cargo install {krate} succeeded but {} is missing", path.display());
    }
    Ok(path)
}

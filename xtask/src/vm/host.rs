//! Host tools the VM harness needs: `qemu-system-x86_64` and a statically linked
//! `busybox` (which becomes the guest's whole userland).
//!
//! Missing ones are installed from Debian's packages (`qemu-system-x86`,
//! `busybox-static`) when running as root, so a fresh CI machine needs no set-up step;
//! `apt-get update` runs only if the first install attempt fails. Installing
//! `qemu-system-x86` removes the machine's preinstalled `qemu-utils`, which Sluice does
//! not use. No `cpio` tool is needed: [`super::initramfs`] writes the archive itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::elf;

/// Paths of the host tools, once present.
pub struct Tools {
    pub qemu: PathBuf,
    pub busybox: PathBuf,
}

/// Finds the tools, installing the missing ones with apt when running as root.
pub fn ensure_tools() -> Result<Tools> {
    let mut missing = Vec::new();
    if which("qemu-system-x86_64").is_none() {
        missing.push("qemu-system-x86");
    }
    if static_busybox().is_none() {
        missing.push("busybox-static");
    }
    if !missing.is_empty() {
        install(&missing)?;
    }
    let qemu = which("qemu-system-x86_64").context("qemu-system-x86_64 still missing after install")?;
    let busybox = static_busybox().context("no statically linked busybox after installing busybox-static")?;
    Ok(Tools { qemu, busybox })
}

/// A statically linked busybox: `/bin/busybox` from busybox-static, or one on `PATH`.
fn static_busybox() -> Option<PathBuf> {
    let candidates = [Some(PathBuf::from("/bin/busybox")), Some(PathBuf::from("/usr/bin/busybox")), which("busybox")];
    candidates.into_iter().flatten().find(|p| std::fs::read(p).is_ok_and(|b| elf::is_static_executable(&b)))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join(name)).find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process runs as root: `/proc/self` belongs to the effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn install(packages: &[&str]) -> Result<()> {
    if !is_root() {
        bail!(
            "the VM harness needs {} (apt-get install --no-install-recommends {}); run as root to install them automatically",
            packages.join(", "),
            packages.join(" ")
        );
    }
    eprintln!("vm-test: installing {}", packages.join(" "));
    let apt_install = || -> Result<bool> {
        let status = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get install")?;
        Ok(status.success())
    };
    if apt_install()? {
        return Ok(());
    }
    eprintln!("vm-test: apt-get install failed; running apt-get update and retrying");
    let status = Command::new("apt-get").args(["update", "-q"]).status().context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    if !apt_install()? {
        bail!("apt-get install {} failed", packages.join(" "));
    }
    Ok(())
}

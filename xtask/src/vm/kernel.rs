//! The guest kernel: a stock Debian cloud kernel, which builds `CONFIG_TLS` as a module
//! (the host's kernel has no kTLS at all), and the modules kTLS needs from it.
//!
//! The package is resolved from the `linux-image-cloud-amd64` meta-package (Debian drops
//! old kernel ABI versions from its archive, so a hard-coded version would stop
//! downloading one day), fetched with `apt-get download` (no root needed) and unpacked
//! with `dpkg-deb -x` into `target/vm-cache/kernel/<package>/`. An unpacked kernel in the
//! cache is used as it is, without asking apt; set `SLUICE_VM_KERNEL_PKG` to a package
//! name (e.g. `linux-image-6.1.0-56-cloud-amd64`) to pin one.
//!
//! The package has no `modules.dep` and the machine no `depmod`, so the load order is
//! resolved here from each module's `.modinfo` `depends=` field, and compressed modules
//! (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed on the host for busybox `insmod`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::elf;

/// The meta-package whose dependency names the current cloud kernel.
const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules to load, in any order (dependencies are resolved): `(name, required)`.
/// `tls` is kTLS itself; `aesni_intel` provides `gcm(aes)` (QEMU's `-cpu max` has
/// AES-NI); the ChaCha20-Poly1305 ones are optional because only that suite needs them
/// (6.1 has `chacha_x86_64` and `poly1305_x86_64`; in the 6.18+ kernels the x86 code is in the
/// `libchacha`/`libpoly1305` library modules and `chacha` registers the algorithm).
/// Without `modprobe` in the guest the kernel cannot load algorithm modules on demand,
/// so every algorithm kTLS may ask for must be loaded up front. `sch_netem` (optional)
/// is the delay queueing discipline of the driver's `latency` check.
const KTLS_MODULES: &[(&str, bool)] = &[
    ("aesni_intel", true),
    ("tls", true),
    ("chacha20poly1305", false),
    ("chacha", false),
    ("chacha_x86_64", false),
    ("poly1305_x86_64", false),
    ("sch_netem", false),
];

/// An unpacked kernel package.
pub struct Kernel {
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub version: String,
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` inside the unpacked package.
    modules: PathBuf,
}

/// A module to put in the initramfs, uncompressed, in load order.
pub struct Module {
    pub name: String,
    pub bytes: Vec<u8>,
    /// A required module that fails to load is a `FAIL` in the guest.
    pub required: bool,
}

/// Returns the cached kernel, downloading and unpacking it first if needed.
pub fn ensure_kernel(cache: &Path) -> Result<Kernel> {
    let dir = cache.join("kernel");
    std::fs::create_dir_all(&dir)?;
    let pinned = std::env::var("SLUICE_VM_KERNEL_PKG").ok().filter(|s| !s.is_empty());
    let package = match pinned {
        Some(p) => p,
        None => match newest_unpacked(&dir)? {
            Some(p) => p,
            None => resolve_package()?,
        },
    };
    let unpacked = dir.join(&package);
    if !unpacked.is_dir() {
        download_and_unpack(&dir, &package)?;
    }
    open(&unpacked)
}

/// The newest fully unpacked package in the cache (unpacking renames into place last).
fn newest_unpacked(dir: &Path) -> Result<Option<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("linux-image-") && !n.contains(".tmp"))
        .collect();
    names.sort_by(|a, b| natural_cmp(a, b));
    Ok(names.pop())
}

/// Compares names so that `6.1.0-9` < `6.1.0-56` (digit runs compare as numbers).
pub(super) fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let key = |s: &str| -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut num = String::new();
        let mut text = String::new();
        for c in s.chars() {
            if c.is_ascii_digit() {
                num.push(c);
            } else {
                if !num.is_empty() {
                    out.push((num.parse().unwrap_or(u64::MAX), std::mem::take(&mut text)));
                    num.clear();
                }
                text.push(c);
            }
        }
        out.push((num.parse().unwrap_or(0), text));
        out
    };
    key(a).cmp(&key(b))
}

/// `apt-cache depends linux-image-cloud-amd64` → `linux-image-6.1.0-NN-cloud-amd64`.
fn resolve_package() -> Result<String> {
    let lookup = || -> Result<Option<String>> {
        let out = Command::new("apt-cache").args(["depends", META_PACKAGE]).output().context("running apt-cache")?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends:")?.trim();
            (dep.starts_with("linux-image-") && dep.as_bytes().get(12).is_some_and(u8::is_ascii_digit))
                .then(|| dep.to_string())
        }))
    };
    if let Some(p) = lookup()? {
        return Ok(p);
    }
    // No package lists yet (a fresh machine): update them once and ask again.
    eprintln!("vm-test: apt-cache does not know {META_PACKAGE}; running apt-get update");
    let status = Command::new("apt-get").args(["update", "-q"]).status().context("running apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status}); cannot resolve {META_PACKAGE}");
    }
    lookup()?.with_context(|| format!("cannot resolve the kernel package behind {META_PACKAGE} with apt-cache depends"))
}

fn download_and_unpack(dir: &Path, package: &str) -> Result<()> {
    eprintln!("vm-test: downloading {package}");
    let status = Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(dir)
        .status()
        .context("running apt-get download")?;
    if !status.success() {
        bail!("apt-get download {package} failed ({status})");
    }
    let prefix = format!("{package}_");
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
        .with_context(|| format!("apt-get download left no {prefix}*.deb in {}", dir.display()))?;
    let tmp = dir.join(format!("{package}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp).status().context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    // Renaming last makes a half-unpacked kernel impossible to mistake for a good one.
    std::fs::rename(&tmp, dir.join(package))?;
    std::fs::remove_file(&deb)?;
    Ok(())
}

/// Opens an unpacked kernel: modules under `lib/modules/<release>/` (Debian 12) or
/// `usr/lib/modules/<release>/` (Debian 13, merged /usr); the kernel at
/// `boot/vmlinuz-<release>` or, in the split packages from 6.19 on
/// (`linux-binary-*`), at `usr/lib/modules/<release>/vmlinuz`.
pub(super) fn open(unpacked: &Path) -> Result<Kernel> {
    let modules_root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| unpacked.join(d))
        .find(|d| d.is_dir())
        .with_context(|| format!("{} has no lib/modules or usr/lib/modules", unpacked.display()))?;
    let version = std::fs::read_dir(&modules_root)
        .with_context(|| format!("reading {}", modules_root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{} is empty", modules_root.display()))?;
    let modules = modules_root.join(&version);
    let vmlinuz = [unpacked.join("boot").join(format!("vmlinuz-{version}")), modules.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{} has neither boot/vmlinuz-{version} nor {}/vmlinuz", unpacked.display(), modules.display())
        })?;
    Ok(Kernel { modules, version, vmlinuz })
}

/// Module name as the kernel spells it: file name without `.ko*`, `-` → `_`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = file_name.split_once(".ko").filter(|(_, ext)| ext.is_empty() || ext.starts_with('.'))?.0;
    Some(stem.replace('-', "_"))
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(module_name) {
            index.insert(name, path);
        }
    }
    Ok(())
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` with the host's
/// tools.
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(path)
        .output()
        .with_context(|| format!("running {tool} to decompress {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -d -c {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out.stdout)
}

impl Kernel {
    /// The kTLS modules and their dependencies, in load order. Built-in ones are skipped;
    /// a missing optional module is reported and skipped.
    pub fn ktls_modules(&self) -> Result<Vec<Module>> {
        let mut index = HashMap::new();
        index_modules(&self.modules.join("kernel"), &mut index)?;
        let builtin: HashSet<String> = std::fs::read_to_string(self.modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit('/').next().and_then(module_name))
            .collect();
        let mut order = Vec::new();
        let mut seen = HashSet::new();
        for &(name, required) in KTLS_MODULES {
            if !index.contains_key(name) && !builtin.contains(name) && !required {
                eprintln!("vm-test: kernel {} has no module {name} (optional, skipped)", self.version);
                continue;
            }
            add_with_deps(name, required, &index, &builtin, &mut seen, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }
}

/// Depth-first: dependencies first, each module once.
fn add_with_deps(
    name: &str,
    required: bool,
    index: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    seen: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<Module>,
) -> Result<()> {
    if builtin.contains(name) {
        return Ok(());
    }
    if seen.contains(name) {
        // Already queued; a required user makes it required too.
        if let Some(m) = order.iter_mut().find(|m| m.name == name) {
            m.required |= required;
        }
        return Ok(());
    }
    if stack.iter().any(|s| s == name) {
        bail!("module dependency cycle: {} → {name}", stack.join(" → "));
    }
    let path = index.get(name).with_context(|| format!("kernel module {name} not found (needed by {stack:?})"))?;
    let bytes = read_module(path)?;
    let depends = elf::modinfo(&bytes).into_iter().find(|(k, _)| k == "depends").map(|(_, v)| v).unwrap_or_default();
    stack.push(name.to_string());
    for dep in depends.split(',').filter(|d| !d.is_empty()) {
        add_with_deps(dep, required, index, builtin, seen, stack, order)?;
    }
    stack.pop();
    seen.insert(name.to_string());
    order.push(Module { name: name.to_string(), bytes, required });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("aesni-intel.ko").as_deref(), Some("aesni_intel"));
        assert_eq!(module_name("tls.ko.zst").as_deref(), Some("tls"));
        assert_eq!(module_name("tls.ko.xz").as_deref(), Some("tls"));
        assert_eq!(module_name("modules.order"), None);
        assert_eq!(module_name("foo.kobj"), None);
    }

    #[test]
    fn newest_kernel_sorts_numerically() {
        let mut v = ["linux-image-6.1.0-56-cloud-amd64", "linux-image-6.1.0-9-cloud-amd64"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v[1], "linux-image-6.1.0-56-cloud-amd64");
    }
}

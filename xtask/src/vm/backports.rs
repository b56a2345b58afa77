//! The rekey kernel: the newest Debian cloud kernel from trixie-backports, a kernel whose
//! TLS offload follows a TLS 1.3 KeyUpdate (a second `TLS_RX`/`TLS_TX` `setsockopt` on a
//! live kTLS socket: Linux 6.14 and later). The stable guest kernel (Debian 6.1,
//! [`super::kernel`]) cannot, so `cargo xtask vm-test` boots this one for the driver's
//! `rekey` checks.
//!
//! It is fetched over plain HTTP without touching the host's apt sources (the host may
//! be a different Debian release, and adding a backports source needs root and changes
//! the machine): the archive's `Packages.xz` index of trixie-backports is downloaded,
//! the kernel picked from it by version, its `.deb` files downloaded from the pool,
//! checked against the index's SHA-256 (the index itself comes from `deb.debian.org`
//! over HTTP, unsigned: this guards against truncated and corrupted downloads, not
//! against a hostile mirror — the result only ever runs inside the test VM) and
//! unpacked with `dpkg-deb -x` into `target/vm-cache/kernel-rekey/<package>/`, renamed
//! into place last, so an interrupted download or unpack is never used.
//!
//! Two package layouts exist in the archive, and both are handled:
//!
//! - up to 6.18: `linux-image-<abi>` holds everything (`boot/vmlinuz-<abi>`,
//!   `usr/lib/modules/<abi>/`).
//! - from 6.19: `linux-image-<abi>` is an empty package depending on
//!   `linux-binary-<abi>` (`usr/lib/modules/<abi>/vmlinuz`), `linux-modules-<abi>` and
//!   `linux-base-<abi>` (`modules.builtin`, the config); those are fetched instead. A
//!   version whose binary or modules package the index no longer lists (the archive
//!   drops old builds) is skipped for the next older one.
//!
//! The cache lives apart from the stable kernel's (`target/vm-cache/kernel/`), whose
//! "newest unpacked" choice would otherwise take the backports kernel. An unpacked
//! rekey kernel (>= 6.14) in the cache is used without any network access; set
//! `SLUICE_VM_REKEY_KERNEL_PKG` (e.g. `linux-image-6.18.15+deb13-cloud-amd64`) to pin
//! one.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use super::kernel::{self, Kernel};

/// The backports suite's package index for amd64.
pub const INDEX_URL: &str = "http://deb.debian.org/debian/dists/trixie-backports/main/binary-amd64/Packages.xz";
/// Where the index's `Filename:` paths are relative to.
pub const POOL_URL: &str = "http://deb.debian.org/debian/";
/// Pins the rekey kernel's package (a `linux-image-<abi>` name).
pub const PIN_ENV: &str = "SLUICE_VM_REKEY_KERNEL_PKG";
/// The first kernel whose TLS offload accepts new keys on a live socket (KeyUpdate).
pub const MIN_REKEY: (u64, u64) = (6, 14);
/// Cache directory under `target/vm-cache/`.
pub const CACHE_DIR: &str = "kernel-rekey";

/// One paragraph of a Debian `Packages` index: the fields used here.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stanza {
    pub package: String,
    pub version: String,
    pub filename: String,
    pub sha256: String,
    pub size: u64,
    pub depends: String,
}

/// Parses a `Packages` index (deb822 paragraphs separated by blank lines; continuation
/// lines start with a space). Paragraphs without `Package`, `Version`, `Filename` or
/// `SHA256` are dropped.
pub fn parse_index(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    let mut cur = Stanza::default();
    let mut flush = |cur: &mut Stanza| {
        let s = std::mem::take(cur);
        if !s.package.is_empty() && !s.version.is_empty() && !s.filename.is_empty() && !s.sha256.is_empty() {
            out.push(s);
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut cur);
            continue;
        }
        if line.starts_with([' ', '\t']) {
            continue; // continuation of a multi-line field (Description)
        }
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "Package" => cur.package = value.to_string(),
            "Version" => cur.version = value.to_string(),
            "Filename" => cur.filename = value.to_string(),
            "SHA256" => cur.sha256 = value.to_ascii_lowercase(),
            "Size" => cur.size = value.parse().unwrap_or(0),
            "Depends" => cur.depends = value.to_string(),
            _ => {}
        }
    }
    flush(&mut cur);
    out
}

/// The ABI of a cloud kernel image package: `linux-image-6.18.15+deb13-cloud-amd64` →
/// `6.18.15+deb13-cloud-amd64`. `None` for meta-packages (`linux-image-cloud-amd64`),
/// `-dbg`, `-unsigned` and other flavours.
pub fn image_abi(package: &str) -> Option<&str> {
    let abi = package.strip_prefix("linux-image-")?;
    (abi.ends_with("-cloud-amd64") && abi.starts_with(|c: char| c.is_ascii_digit()) && !abi.contains("-unsigned"))
        .then_some(abi)
}

/// The upstream kernel version at the start of a Debian version or ABI string:
/// `6.18.15-1~bpo13+1` → `(6, 18, 15)`, `6.1.0-57-cloud-amd64` → `(6, 1, 0)`,
/// `7.0` → `(7, 0, 0)`.
pub fn upstream(version: &str) -> Option<(u64, u64, u64)> {
    let end = version.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(version.len());
    let mut parts = version[..end].split('.').filter(|p| !p.is_empty()).map(|p| p.parse::<u64>());
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next().transpose().ok()?.unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether a kernel release or version supports kTLS rekey (>= [`MIN_REKEY`]).
pub fn supports_rekey(version: &str) -> bool {
    upstream(version).is_some_and(|(a, b, _)| (a, b) >= MIN_REKEY)
}

/// A kernel chosen from the index: the image package's name (the cache directory) and
/// the packages whose contents make it up.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub package: String,
    pub version: String,
    pub parts: Vec<Stanza>,
}

/// The packages that carry `image`'s files: the image itself when it is self-contained,
/// else its `linux-binary-<abi>` and `linux-modules-<abi>` (required) and
/// `linux-base-<abi>` (optional: `modules.builtin`), all at the image's version.
/// `Err` names what the index lacks.
fn parts(index: &[Stanza], image: &Stanza) -> Result<Vec<Stanza>, String> {
    let abi = image_abi(&image.package).ok_or_else(|| format!("{} is not a cloud kernel image", image.package))?;
    let depends_on = |name: &str| image.depends.split([',', '|']).any(|d| d.split_whitespace().next() == Some(name));
    let find = |name: &str| index.iter().find(|s| s.package == name && s.version == image.version).cloned();
    let binary = format!("linux-binary-{abi}");
    if !depends_on(&binary) {
        return Ok(vec![image.clone()]);
    }
    let mut out = Vec::new();
    for name in [binary, format!("linux-modules-{abi}")] {
        out.push(find(&name).ok_or_else(|| format!("{name} {} is not in the index", image.version))?);
    }
    if let Some(base) = find(&format!("linux-base-{abi}")) {
        out.push(base);
    }
    Ok(out)
}

/// The newest cloud kernel image >= `min` whose files the index has, or (with `pin`)
/// exactly that package. Candidates skipped for missing parts are returned as notes.
pub fn pick(index: &[Stanza], min: (u64, u64), pin: Option<&str>) -> Result<(Plan, Vec<String>)> {
    let mut images: Vec<(&Stanza, (u64, u64, u64))> = index
        .iter()
        .filter(|s| image_abi(&s.package).is_some())
        .filter(|s| pin.is_none_or(|p| s.package == p))
        .filter_map(|s| Some((s, upstream(&s.version)?)))
        .collect();
    if let Some(p) = pin {
        let Some((s, v)) = images.first() else { bail!("{p} is not in the index {INDEX_URL}") };
        if (v.0, v.1) < min {
            bail!("{p} is version {}, older than {}.{}: its kTLS cannot follow a KeyUpdate", s.version, min.0, min.1);
        }
    }
    images.retain(|(_, v)| (v.0, v.1) >= min);
    images.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| kernel::natural_cmp(&b.0.version, &a.0.version)));
    let mut notes = Vec::new();
    for (image, _) in images {
        match parts(index, image) {
            Ok(parts) => {
                let plan = Plan { package: image.package.clone(), version: image.version.clone(), parts };
                return Ok((plan, notes));
            }
            Err(why) => notes.push(format!("skipping {} {}: {why}", image.package, image.version)),
        }
    }
    bail!(
        "no complete linux-image-*-cloud-amd64 >= {}.{} in {INDEX_URL}{}",
        min.0,
        min.1,
        if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) }
    )
}

/// Compares `sha256sum`'s output (`<hex>  <file>`) with the index's digest.
pub fn check_sha256(expected: &str, sha256sum_output: &str, what: &str) -> Result<()> {
    let got = sha256sum_output.split_whitespace().next().unwrap_or("");
    if got.len() != 64 || !got.eq_ignore_ascii_case(expected.trim()) {
        bail!("{what}: SHA-256 {got:?} does not match the index's {expected:?} (corrupted or truncated download)");
    }
    Ok(())
}

/// Returns the cached rekey kernel, downloading and unpacking it first if needed.
pub fn ensure_rekey_kernel(cache: &Path) -> Result<Kernel> {
    let dir = cache.join(CACHE_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let pin = std::env::var(PIN_ENV).ok().filter(|s| !s.is_empty());
    let cached = match &pin {
        Some(p) => dir.join(p).is_dir().then(|| p.clone()),
        None => newest_unpacked(&dir)?,
    };
    let package = match cached {
        Some(p) => p,
        None => fetch(&dir, pin.as_deref())?,
    };
    let k = kernel::open(&dir.join(&package))?;
    if !supports_rekey(&k.version) {
        bail!(
            "the rekey kernel {} (release {}) is older than {}.{}; remove {} or set {PIN_ENV} to a newer package",
            package,
            k.version,
            MIN_REKEY.0,
            MIN_REKEY.1,
            dir.join(&package).display()
        );
    }
    Ok(k)
}

/// The newest fully unpacked kernel >= [`MIN_REKEY`] in the cache.
fn newest_unpacked(dir: &Path) -> Result<Option<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| image_abi(n).is_some_and(supports_rekey))
        .collect();
    names.sort_by(|a, b| kernel::natural_cmp(a, b));
    Ok(names.pop())
}

/// Downloads the index, picks the kernel, downloads, checks and unpacks its packages;
/// returns the image package's name.
fn fetch(dir: &Path, pin: Option<&str>) -> Result<String> {
    let offline_hint = || {
        format!(
            "the rekey kernel (Linux >= {}.{} for kTLS KeyUpdate) is not cached in {} and cannot be downloaded. \
             Bring the network back, or put an unpacked package there (dpkg-deb -x linux-image-….deb {}/<package>), \
             or run only the stable kernel: cargo xtask vm-test --kernel stable",
            MIN_REKEY.0,
            MIN_REKEY.1,
            dir.display(),
            dir.display()
        )
    };
    remove_stale_tmp(dir);
    eprintln!("vm-test: fetching the backports package index {INDEX_URL}");
    let index_xz = dir.join(format!("Packages.xz.tmp-{}", std::process::id()));
    download(INDEX_URL, &index_xz).with_context(offline_hint)?;
    let out = Command::new("xz").arg("-dc").arg(&index_xz).output().context("running xz -dc (install xz-utils)");
    let _ = std::fs::remove_file(&index_xz);
    let out = out?;
    if !out.status.success() {
        bail!("xz -dc {INDEX_URL} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let index = parse_index(&String::from_utf8_lossy(&out.stdout));
    let (plan, notes) = pick(&index, MIN_REKEY, pin)?;
    for n in notes {
        eprintln!("vm-test: {n}");
    }
    let total: u64 = plan.parts.iter().map(|p| p.size).sum();
    eprintln!(
        "vm-test: rekey kernel {} {} ({}, {:.1} MB)",
        plan.package,
        plan.version,
        plan.parts.iter().map(|p| p.package.as_str()).collect::<Vec<_>>().join(" + "),
        total as f64 / 1e6
    );
    let tmp = dir.join(format!("{}.tmp-{}", plan.package, std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        for part in &plan.parts {
            let deb = dir.join(format!("{}.deb.tmp-{}", part.package, std::process::id()));
            let r = download(&format!("{POOL_URL}{}", part.filename), &deb)
                .with_context(offline_hint)
                .and_then(|()| verify(&deb, part))
                .and_then(|()| unpack(&deb, &tmp));
            let _ = std::fs::remove_file(&deb);
            r?;
        }
        kernel::open(&tmp).map(|_| ())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Renaming last makes a half-fetched kernel impossible to mistake for a good one.
    std::fs::rename(&tmp, dir.join(&plan.package)).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(plan.package)
}

/// Removes `….tmp-<pid>` files and directories left by fetches that were killed (their
/// pid is gone).
fn remove_stale_tmp(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some((_, pid)) = name.rsplit_once(".tmp-") else { continue };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
    }
}

/// `curl` (or `wget`) of `url` into `dest`, failing on HTTP errors.
fn download(url: &str, dest: &Path) -> Result<()> {
    let curl = Command::new("curl")
        .args(["-fsSL", "--retry", "2", "--connect-timeout", "20", "-o"])
        .arg(dest)
        .arg(url)
        .status();
    let status = match curl {
        Ok(s) => s,
        Err(_) => Command::new("wget")
            .args(["-q", "--tries=3", "--timeout=20", "-O"])
            .arg(dest)
            .arg(url)
            .status()
            .context("neither curl nor wget can run (install curl)")?,
    };
    if !status.success() {
        let _ = std::fs::remove_file(dest);
        bail!("downloading {url} failed ({status})");
    }
    Ok(())
}

fn verify(deb: &Path, part: &Stanza) -> Result<()> {
    let out = Command::new("sha256sum").arg(deb).output().context("running sha256sum")?;
    if !out.status.success() {
        bail!("sha256sum {} failed", deb.display());
    }
    check_sha256(&part.sha256, &String::from_utf8_lossy(&out.stdout), &part.filename)
}

fn unpack(deb: &Path, into: &Path) -> Result<()> {
    let status = Command::new("dpkg-deb").arg("-x").arg(deb).arg(into).status().context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA_A: &str = "5a507681ea8c978d02265a7fec2f02c9588fb48b54b7f71edc1059e86007f3ec";

    /// An excerpt shaped like trixie-backports' index: self-contained images up to 6.18,
    /// split ones after, one split version whose modules were dropped, debug and
    /// unsigned flavours, an old kernel and the meta-package.
    fn index() -> Vec<Stanza> {
        let stanza = |p: &str, v: &str, depends: &str| {
            format!(
                "Package: {p}\nSource: linux-signed-amd64\nVersion: {v}\nDepends: {depends}\nDescription: Linux\n \
                 continuation: not a field\nFilename: pool/main/l/{p}_{v}_amd64.deb\nSize: 1000\nSHA256: {SHA_A}\n\n"
            )
        };
        let split =
            |abi: &str| format!("kmod, linux-base-{abi} (= x), linux-binary-{abi} (= x), linux-modules-{abi} (= x)");
        let mut text = String::new();
        text += &stanza("linux-image-6.12.9+deb13-cloud-amd64", "6.12.9-1~bpo13+1", "kmod");
        text += &stanza("linux-image-6.18.9+deb13-cloud-amd64", "6.18.9-1~bpo13+1", "kmod");
        text += &stanza("linux-image-6.18.15+deb13-cloud-amd64", "6.18.15-1~bpo13+1", "kmod, linux-base-6.18.15");
        text += &stanza("linux-image-6.18.15+deb13-cloud-amd64-dbg", "6.18.15-1~bpo13+1", "");
        text += &stanza("linux-image-6.18.15+deb13-cloud-amd64-unsigned", "6.18.15-1~bpo13+1", "kmod");
        text += &stanza("linux-image-7.1.13+deb13-cloud-amd64", "7.1.13-1~bpo13+1", &split("7.1.13+deb13-cloud-amd64"));
        text += &stanza("linux-binary-7.1.13+deb13-cloud-amd64", "7.1.13-1~bpo13+1", "");
        text += &stanza("linux-image-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", &split("7.3.4+deb13-cloud-amd64"));
        text += &stanza("linux-binary-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", "");
        text += &stanza("linux-modules-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", "kmod");
        text += &stanza("linux-base-7.3.4+deb13-cloud-amd64", "7.3.4-1~bpo13+1", "");
        text += &stanza("linux-image-cloud-amd64", "7.3.4-1~bpo13+1", "linux-image-7.3.4+deb13-cloud-amd64");
        text += "Package: broken-no-filename\nVersion: 1\n";
        parse_index(&text)
    }

    #[test]
    fn parses_the_index() {
        let idx = index();
        assert_eq!(idx.len(), 12, "the paragraph without Filename/SHA256 is dropped");
        let s = &idx[2];
        assert_eq!(s.package, "linux-image-6.18.15+deb13-cloud-amd64");
        assert_eq!(s.version, "6.18.15-1~bpo13+1");
        assert_eq!(s.filename, "pool/main/l/linux-image-6.18.15+deb13-cloud-amd64_6.18.15-1~bpo13+1_amd64.deb");
        assert_eq!((s.size, s.sha256.as_str(), s.depends.as_str()), (1000, SHA_A, "kmod, linux-base-6.18.15"));
        // CRLF-free, last paragraph without a trailing blank line.
        let one = parse_index("Package: a\nVersion: 1\nFilename: f\nSHA256: AB");
        assert_eq!((one.len(), one[0].sha256.as_str()), (1, "ab"));
    }

    #[test]
    fn image_names_and_versions() {
        assert_eq!(image_abi("linux-image-6.18.15+deb13-cloud-amd64"), Some("6.18.15+deb13-cloud-amd64"));
        assert_eq!(image_abi("linux-image-6.1.0-57-cloud-amd64"), Some("6.1.0-57-cloud-amd64"));
        assert_eq!(image_abi("linux-image-6.18.15+deb13-cloud-amd64-dbg"), None);
        assert_eq!(image_abi("linux-image-6.18.15+deb13-cloud-amd64-unsigned"), None);
        assert_eq!(image_abi("linux-image-cloud-amd64"), None);
        assert_eq!(image_abi("linux-image-6.18.15+deb13-amd64"), None);
        assert_eq!(upstream("6.18.15-1~bpo13+1"), Some((6, 18, 15)));
        assert_eq!(upstream("6.1.0-57-cloud-amd64"), Some((6, 1, 0)));
        assert_eq!(upstream("7.0"), Some((7, 0, 0)));
        assert_eq!(upstream("cloud"), None);
        assert!(supports_rekey("6.14.0-1-cloud-amd64"));
        assert!(supports_rekey("7.3.4+deb13-cloud-amd64"));
        assert!(!supports_rekey("6.13.12"));
        assert!(!supports_rekey("6.1.0-57-cloud-amd64"));
    }

    #[test]
    fn picks_the_newest_complete_kernel() {
        let (plan, notes) = pick(&index(), MIN_REKEY, None).unwrap();
        assert_eq!(plan.package, "linux-image-7.3.4+deb13-cloud-amd64");
        let parts: Vec<&str> = plan.parts.iter().map(|p| p.package.as_str()).collect();
        assert_eq!(
            parts,
            [
                "linux-binary-7.3.4+deb13-cloud-amd64",
                "linux-modules-7.3.4+deb13-cloud-amd64",
                "linux-base-7.3.4+deb13-cloud-amd64"
            ]
        );
        assert!(notes.is_empty());

        // Without the 7.3.4 modules: 7.1.13 lacks its modules too, so 6.18.15 (numerically
        // newer than 6.18.9) is next, self-contained.
        let idx: Vec<Stanza> = index().into_iter().filter(|s| !s.package.starts_with("linux-modules-7.3")).collect();
        let (plan, notes) = pick(&idx, MIN_REKEY, None).unwrap();
        assert_eq!(plan.package, "linux-image-6.18.15+deb13-cloud-amd64");
        assert_eq!(plan.parts.len(), 1);
        assert_eq!(plan.parts[0].package, plan.package);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[0].contains("linux-modules-7.3.4"), "{notes:?}");

        // Nothing new enough.
        let old: Vec<Stanza> = index().into_iter().filter(|s| s.package.contains("6.12")).collect();
        assert!(pick(&old, MIN_REKEY, None).unwrap_err().to_string().contains(">= 6.14"));
    }

    #[test]
    fn honours_a_pin() {
        let (plan, _) = pick(&index(), MIN_REKEY, Some("linux-image-6.18.9+deb13-cloud-amd64")).unwrap();
        assert_eq!(plan.version, "6.18.9-1~bpo13+1");
        let err = pick(&index(), MIN_REKEY, Some("linux-image-6.12.9+deb13-cloud-amd64")).unwrap_err();
        assert!(err.to_string().contains("older than 6.14"), "{err}");
        let err = pick(&index(), MIN_REKEY, Some("linux-image-9.9.9-cloud-amd64")).unwrap_err();
        assert!(err.to_string().contains("not in the index"), "{err}");
        let err = pick(&index(), MIN_REKEY, Some("linux-image-7.1.13+deb13-cloud-amd64")).unwrap_err();
        assert!(err.to_string().contains("linux-modules-7.1.13"), "{err}");
    }

    #[test]
    fn checks_sha256() {
        let out = format!("{}  /tmp/x.deb\n", SHA_A.to_ascii_uppercase());
        check_sha256(SHA_A, &out, "x").unwrap();
        let bad = format!("{}  /tmp/x.deb\n", SHA_A.replace('5', "6"));
        assert!(check_sha256(SHA_A, &bad, "x").unwrap_err().to_string().contains("does not match"));
        assert!(check_sha256(SHA_A, "", "x").is_err());
        assert!(check_sha256(SHA_A, &SHA_A[..63], "x").is_err());
    }
}

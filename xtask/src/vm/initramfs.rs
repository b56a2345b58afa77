//! The guest's root file system: a newc ("070701") cpio archive that the kernel unpacks
//! into RAM and whose `/init` it runs.
//!
//! The archive is written here directly rather than with the `cpio` tool: device nodes
//! (`/dev/console`, needed before `/init` can print anything) go in without `mknod` or
//! root, nothing is staged on disk, and the output is byte-for-byte reproducible (fixed
//! inode numbers, owners and times).
//!
//! Layout:
//!
//! ```text
//! /init                  vm/init.sh (mounts, insmod, lo up, kTLS check, driver, VM-DONE)
//! /driver.sh             the caller's driver script
//! /bin/busybox           static busybox; /init adds its applet links
//! /usr/local/bin/<name>  the caller's static binaries
//! /lib/modules/*.ko      the kTLS modules, uncompressed
//! /lib/modules/load.list "name path required|optional", in load order
//! /dev/console, /proc, /sys, /tmp, /root
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::VmRun;
use super::kernel::Kernel;
use crate::elf;

/// The guest's `/init`.
const INIT: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../vm/init.sh"));

/// Writes the initramfs for `run` to `out`.
pub fn build(out: &Path, busybox: &Path, kernel: &Kernel, run: &VmRun) -> Result<()> {
    let modules = kernel.ktls_modules()?;
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Newc::new(BufWriter::new(file));
    for dir in ["bin", "dev", "proc", "sys", "tmp", "root", "usr", "usr/local", "usr/local/bin", "lib", "lib/modules"] {
        cpio.dir(dir)?;
    }
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, INIT.as_bytes())?;
    cpio.file("driver.sh", 0o755, run.driver_script.as_bytes())?;
    let bb = std::fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &bb)?;

    let mut load_list = String::new();
    for m in &modules {
        let path = format!("lib/modules/{}.ko", m.name);
        cpio.file(&path, 0o644, &m.bytes)?;
        load_list += &format!("{} /{path} {}\n", m.name, if m.required { "required" } else { "optional" });
    }
    cpio.file("lib/modules/load.list", 0o644, load_list.as_bytes())?;

    let mut names = std::collections::HashSet::new();
    for bin in &run.binaries {
        let name = bin
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("binary path {} has no file name", bin.display()))?;
        if !names.insert(name.to_string()) {
            bail!("two binaries are named {name}");
        }
        let bytes = std::fs::read(bin).with_context(|| format!("reading binary {}", bin.display()))?;
        if !elf::is_static_executable(&bytes) {
            bail!(
                "{} is not a statically linked executable; the VM has no libc \
                 (build with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu)",
                bin.display()
            );
        }
        cpio.file(&format!("usr/local/bin/{name}"), 0o755, &bytes)?;
    }
    cpio.finish()?.flush()?;
    Ok(())
}

/// A streaming writer of the newc cpio format (see the kernel's
/// Documentation/driver-api/early-userspace/buffer-format.rst).
struct Newc<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
}

impl<W: Write> Newc<W> {
    fn new(out: W) -> Self {
        Newc { out, written: 0, next_ino: 1 }
    }

    fn dir(&mut self, path: &str) -> Result<()> {
        self.entry(path, 0o040_000 | 0o755, (0, 0), &[])
    }

    fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(path, 0o100_000 | perm, (0, 0), data)
    }

    fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(path, 0o020_000 | perm, (major, minor), &[])
    }

    /// Writes the trailer and returns the inner writer.
    fn finish(mut self) -> Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0), 0)?;
        Ok(self.out)
    }

    fn entry(&mut self, path: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        let size = u32::try_from(data.len()).context("file too large for cpio (4 GiB)")?;
        self.header(path, ino, mode, rdev, size)?;
        self.write(data)?;
        self.pad()
    }

    fn header(&mut self, name: &str, ino: u32, mode: u32, rdev: (u32, u32), size: u32) -> Result<()> {
        let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
        let namesize = u32::try_from(name.len() + 1)?;
        // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
        // rdevmajor, rdevminor, namesize, check
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08x}"));
        }
        self.write(h.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    /// Pads to a multiple of 4 bytes, as newc requires after names and file data.
    fn pad(&mut self) -> Result<()> {
        let n = (4 - (self.written % 4) as usize) % 4;
        self.write(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed archive entry: name, mode, rdev (major, minor), data.
    type Entry = (String, u32, (u32, u32), Vec<u8>);

    /// Parses a newc archive back into its entries.
    fn parse(mut b: &[u8]) -> Vec<Entry> {
        let mut out = Vec::new();
        let mut pos = 0usize;
        let align = |p: usize| p.div_ceil(4) * 4;
        loop {
            assert_eq!(&b[..6], b"070701");
            let field =
                |i: usize| u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap();
            let (mode, size, rdev, namesize) = (field(1), field(6) as usize, (field(9), field(10)), field(11) as usize);
            let name = std::str::from_utf8(&b[110..110 + namesize - 1]).unwrap().to_string();
            let data_start = align(pos + 110 + namesize) - pos;
            let data = b[data_start..data_start + size].to_vec();
            let next = align(pos + data_start + size) - pos;
            if name == "TRAILER!!!" {
                assert_eq!(next, b.len(), "trailer ends the archive");
                return out;
            }
            out.push((name, mode, rdev, data));
            pos += next;
            b = &b[next..];
        }
    }

    #[test]
    fn newc_round_trip() {
        let mut c = Newc::new(Vec::new());
        c.dir("bin").unwrap();
        c.file("bin/x", 0o755, b"hello").unwrap();
        c.char_device("dev/console", 0o600, 5, 1).unwrap();
        c.file("e", 0o644, b"").unwrap();
        let bytes = c.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].0, "bin");
        assert_eq!(entries[0].1, 0o040_755);
        assert_eq!((entries[1].0.as_str(), entries[1].1, entries[1].3.as_slice()), ("bin/x", 0o100_755, &b"hello"[..]));
        assert_eq!((entries[2].1, entries[2].2), (0o020_600, (5, 1)));
        assert!(entries[3].3.is_empty());
    }

    #[test]
    fn init_script_has_the_protocol_lines() {
        assert!(INIT.starts_with("#!/bin/busybox sh"));
        assert!(INIT.contains("VM-DONE rc=$rc"));
        assert!(INIT.contains("FAIL ktls-module"));
        assert!(INIT.contains("poweroff -f"));
    }
}

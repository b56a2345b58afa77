//! The few ELF facts `dist` and the VM harness need, read without any ELF library:
//!
//! - whether an executable is statically linked (no `PT_INTERP` program header): `dist`
//!   ships only static binaries, and the VM harness refuses on the host a binary that
//!   would fail in the libc-less guest with a baffling "not found";
//! - whether its relative relocations are packed (`DT_RELR` in its dynamic section), which
//!   `dist` requires (see `dist::RUSTFLAGS`);
//! - the `.modinfo` section of a kernel module (`depends=`, `name=`), from which the
//!   module load order is resolved, since the kernel package ships no `modules.dep`
//!   and the machine has no `depmod`.
//!
//! Only 64-bit little-endian ELF (x86_64) is understood; anything else reads as "not
//! static" / "no modinfo".

/// Reads a little-endian integer of `N` bytes at `off`, if in bounds.
fn le<const N: usize>(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(N)?)?;
    Some(s.iter().rev().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
}

fn is_elf64_le(b: &[u8]) -> bool {
    b.len() >= 64 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1
}

/// True for an ELF64 executable (`ET_EXEC` or `ET_DYN`, i.e. PIE) without an
/// interpreter: static and static-pie binaries.
pub fn is_static_executable(b: &[u8]) -> bool {
    const PT_INTERP: u64 = 3;
    if !is_elf64_le(b) {
        return false;
    }
    let (Some(e_type), Some(phoff), Some(phentsize), Some(phnum)) =
        (le::<2>(b, 16), le::<8>(b, 32), le::<2>(b, 54), le::<2>(b, 56))
    else {
        return false;
    };
    if !(e_type == 2 || e_type == 3) || phnum == 0 {
        return false;
    }
    (0..phnum).all(|i| {
        let off = phoff + i * phentsize;
        usize::try_from(off).ok().and_then(|o| le::<4>(b, o)).is_some_and(|p_type| p_type != PT_INTERP)
    })
}

/// True when an ELF64 image's dynamic section (`PT_DYNAMIC`) has a `DT_RELR` entry
/// before its `DT_NULL`: relative relocations packed as bitmaps, a few KiB where
/// `DT_RELA` spends 24 bytes on each.
pub fn has_packed_relocs(b: &[u8]) -> bool {
    const PT_DYNAMIC: u64 = 2;
    const DT_NULL: u64 = 0;
    const DT_RELR: u64 = 36;
    if !is_elf64_le(b) {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (le::<8>(b, 32), le::<2>(b, 54), le::<2>(b, 56)) else {
        return false;
    };
    // Program header: p_type u32 @0, p_offset u64 @8, p_filesz u64 @32. A dynamic
    // entry: d_tag u64, d_val u64.
    let dynamic_has_relr = |h: usize| -> Option<bool> {
        let (off, size) = (usize::try_from(le::<8>(b, h + 8)?).ok()?, usize::try_from(le::<8>(b, h + 32)?).ok()?);
        for entry in (off..off.checked_add(size)?).step_by(16) {
            match le::<8>(b, entry)? {
                DT_NULL => return Some(false),
                DT_RELR => return Some(true),
                _ => {}
            }
        }
        Some(false)
    };
    (0..phnum).any(|i| {
        let h = usize::try_from(phoff + i * phentsize).ok();
        h.is_some_and(|h| le::<4>(b, h) == Some(PT_DYNAMIC) && dynamic_has_relr(h) == Some(true))
    })
}

/// The `key=value` entries of a kernel module's `.modinfo` section.
pub fn modinfo(b: &[u8]) -> Vec<(String, String)> {
    section(b, ".modinfo")
        .map(|data| {
            data.split(|&c| c == 0)
                .filter_map(|entry| {
                    let s = std::str::from_utf8(entry).ok()?;
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The bytes of the section named `want`.
fn section<'a>(b: &'a [u8], want: &str) -> Option<&'a [u8]> {
    if !is_elf64_le(b) {
        return None;
    }
    let shoff = usize::try_from(le::<8>(b, 40)?).ok()?;
    let shentsize = usize::try_from(le::<2>(b, 58)?).ok()?;
    let shnum = usize::try_from(le::<2>(b, 60)?).ok()?;
    let shstrndx = usize::try_from(le::<2>(b, 62)?).ok()?;
    // Section header: sh_name u32 @0, sh_offset u64 @24, sh_size u64 @32.
    let header = |i: usize| -> Option<(usize, &'a [u8])> {
        let h = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = usize::try_from(le::<4>(b, h)?).ok()?;
        let off = usize::try_from(le::<8>(b, h + 24)?).ok()?;
        let size = usize::try_from(le::<8>(b, h + 32)?).ok()?;
        Some((name, b.get(off..off.checked_add(size)?)?))
    };
    let (_, names) = header(shstrndx)?;
    (0..shnum).filter_map(header).find_map(|(name, data)| {
        let n = names.get(name..)?;
        let n = &n[..n.iter().position(|&c| c == 0)?];
        (n == want.as_bytes()).then_some(data)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with a section string table and one `.modinfo` section.
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[16] = 1; // ET_REL
        let strtab_off = b.len();
        b.extend_from_slice(shstrtab);
        let modinfo_off = b.len();
        b.extend_from_slice(modinfo);
        while !b.len().is_multiple_of(8) {
            b.push(0);
        }
        let shoff = b.len();
        let mut sh = |name: u32, off: usize, size: usize| {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            b.extend_from_slice(&h);
        };
        sh(0, 0, 0);
        sh(1, strtab_off, shstrtab.len());
        sh(11, modinfo_off, modinfo.len());
        b[40..48].copy_from_slice(&(shoff as u64).to_le_bytes());
        b[58..60].copy_from_slice(&64u16.to_le_bytes());
        b[60..62].copy_from_slice(&3u16.to_le_bytes());
        b[62..64].copy_from_slice(&1u16.to_le_bytes());
        b
    }

    /// A 64-bit PIE: the header, one program header per type in `phdrs`, and the
    /// dynamic entries `dynamic` (tag, value) that every header points at.
    fn fake_executable(phdrs: &[u32], dynamic: &[(u64, u64)]) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[16] = 3; // ET_DYN
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
        let dynamic_at = 64 + 56 * phdrs.len() as u64;
        for &kind in phdrs {
            let mut h = [0u8; 56];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..16].copy_from_slice(&dynamic_at.to_le_bytes());
            h[32..40].copy_from_slice(&(16 * dynamic.len() as u64).to_le_bytes());
            b.extend_from_slice(&h);
        }
        for (tag, value) in dynamic {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&value.to_le_bytes());
        }
        b
    }

    #[test]
    fn tells_static_from_dynamic_executables() {
        assert!(is_static_executable(&fake_executable(&[1, 2], &[(0, 0)])));
        assert!(!is_static_executable(&fake_executable(&[1, 3, 2], &[(0, 0)])), "PT_INTERP: dynamic");
        // This test binary is dynamically linked (no crt-static for tests).
        assert!(!is_static_executable(&std::fs::read(std::env::current_exe().unwrap()).unwrap()));
    }

    #[test]
    fn finds_packed_relocations_in_the_dynamic_section() {
        // DT_RELA (7), DT_RELR (36), DT_NULL.
        assert!(has_packed_relocs(&fake_executable(&[1, 2], &[(7, 0x100), (36, 0x200), (0, 0)])));
        // Only DT_RELA; DT_RELR after DT_NULL; DT_RELR bytes under a header that is not PT_DYNAMIC.
        assert!(!has_packed_relocs(&fake_executable(&[2], &[(7, 0x100), (0, 0)])));
        assert!(!has_packed_relocs(&fake_executable(&[2], &[(7, 0x100), (0, 0), (36, 0x200)])));
        assert!(!has_packed_relocs(&fake_executable(&[1], &[(36, 0x200), (0, 0)])));
        // A dynamic section running past the end of the file, and not an ELF at all.
        let mut cut = fake_executable(&[2], &[(7, 0x100), (36, 0x200)]);
        cut.truncate(cut.len() - 20);
        assert!(!has_packed_relocs(&cut));
        assert!(!has_packed_relocs(b"not an elf"));
    }

    #[test]
    fn reads_modinfo() {
        let m = fake_module(b"alias=tcp-ulp-tls\0depends=crypto_simd,cryptd\0name=aesni_intel\0");
        let info = modinfo(&m);
        assert!(info.contains(&("depends".into(), "crypto_simd,cryptd".into())));
        assert!(info.contains(&("name".into(), "aesni_intel".into())));
        assert!(modinfo(b"not an elf").is_empty());
        assert!(!is_static_executable(&m), "a relocatable object is not an executable");
    }
}

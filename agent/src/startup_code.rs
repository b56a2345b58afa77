//! Gives back the pages of code that only start-up ran.
//!
//! Most of the agent's resident memory is its own binary's code and read-only data,
//! mapped from the page cache: parsing the command line, enrolling, loading the eBPF
//! program (and the kernel's BTF) and the first full TLS handshakes touch code that a
//! running agent never runs again, and on Linux 6.x every page of it touched pulls a
//! whole 64 KiB page-cache folio into the process. Once the agent is up (its first
//! session holds a full pool of data connections), [`release`] unmaps the binary's
//! read-only segments from the process (`MADV_DONTNEED`) after marking their pages
//! cold (`MADV_COLD`, so the page cache drops them first under memory pressure and a
//! container's working set no longer counts them). What the agent runs afterwards
//! faults back in from the page cache; `cargo xtask dist` lays that code out together
//! (`agent/link-order.txt`), so it comes back as a few dense folios.
//!
//! Only segments the process never writes are touched: a read-only `PT_LOAD` of a
//! binary without text relocations holds exactly the file's bytes, so dropping its
//! pages loses nothing (writable and RELRO segments, which hold relocated pointers,
//! are left alone). docs/benchmarks.md, "Memory: what the agent's RSS is made of",
//! has the measurements.

use std::sync::Once;

static RELEASED: Once = Once::new();

/// True until [`agent_is_up`] has run: callers skip working out whether it is time.
pub fn pending() -> bool {
    !RELEASED.is_completed()
}

/// Releases the start-up code once per process, the first time the agent is up;
/// later calls do nothing. `SLUICE_KEEP_STARTUP_CODE=1` turns it off (for measuring
/// what it saves).
pub fn agent_is_up() {
    RELEASED.call_once(|| {
        if std::env::var_os("SLUICE_KEEP_STARTUP_CODE").is_some_and(|v| v == "1") {
            tracing::debug!("keeping start-up code mapped (SLUICE_KEEP_STARTUP_CODE=1)");
            return;
        }
        // Said before the pages go: formatting the line afterwards would fault code
        // back in that nothing else runs.
        let said = |segments: &[(usize, usize)], rss_kib: Option<u64>| {
            tracing::info!(
                unmapping_bytes = segments.iter().map(|s| s.1).sum::<usize>(),
                rss_kib,
                "up: giving back the pages of code only start-up ran"
            )
        };
        if let Err(why) = release(said) {
            tracing::info!(reason = %why, "start-up code pages kept");
        }
    });
}

/// Marks the pages of the running binary's read-only segments cold and unmaps them
/// from this process, and trims the heap. Code and constants still in use fault back
/// in on their next use. `before` is told the segments and the resident size first;
/// returns the bytes unmapped.
pub fn release(before: impl FnOnce(&[(usize, usize)], Option<u64>)) -> Result<usize, String> {
    let segments = read_only_segments()?;
    before(&segments, rss_kib());
    let mut bytes = 0;
    for (start, len) in segments {
        // SAFETY: [start, start + len) lies inside a read-only PT_LOAD segment of the
        // main program, mapped for the life of the process from the file, and the
        // program has no text relocations (checked by `read_only_segments`), so its
        // pages equal the file's: MADV_COLD only ages them, and after MADV_DONTNEED
        // the next access maps the same bytes again from the page cache.
        unsafe {
            let addr = start as *mut libc::c_void;
            // Best effort: a kernel without MADV_COLD (before 5.4) just unmaps.
            libc::madvise(addr, len, libc::MADV_COLD);
            if libc::madvise(addr, len, libc::MADV_DONTNEED) != 0 {
                return Err(format!("madvise(MADV_DONTNEED): {}", std::io::Error::last_os_error()));
            }
        }
        bytes += len;
    }
    // And the heap start-up freed (enrolment, the first handshakes): glibc keeps freed
    // chunks resident otherwise.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(bytes)
}

/// The main program's read-only `PT_LOAD` segments as page-aligned (address, length).
fn read_only_segments() -> Result<Vec<(usize, usize)>, String> {
    let mut found: Option<Result<Vec<(usize, usize)>, String>> = None;
    unsafe extern "C" fn first(info: *mut libc::dl_phdr_info, _size: libc::size_t, data: *mut libc::c_void) -> i32 {
        // SAFETY: dl_iterate_phdr passes a valid info for the call's duration, and
        // `data` is the `found` below, alive for the whole iteration.
        unsafe {
            let found = &mut *(data as *mut Option<Result<Vec<(usize, usize)>, String>>);
            let info = &*info;
            let phdrs = std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize);
            *found = Some(segments_of(info.dlpi_addr as usize, phdrs));
        }
        1 // the main program comes first: stop there
    }
    // SAFETY: `first` matches dl_iterate_phdr's callback type and only reads what it is
    // given; `found` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(first), &mut found as *mut _ as *mut libc::c_void) };
    found.unwrap_or_else(|| Err("dl_iterate_phdr reported no program".into()))
}

/// The page-aligned read-only `PT_LOAD` ranges of a program loaded at `bias`, or why
/// none may be released.
///
/// # Safety
/// `phdrs` must be the program's own headers, loaded at `bias` (its `PT_DYNAMIC` is
/// read).
unsafe fn segments_of(bias: usize, phdrs: &[libc::Elf64_Phdr]) -> Result<Vec<(usize, usize)>, String> {
    const DT_TEXTREL: i64 = 22;
    const DT_FLAGS: i64 = 30;
    const DF_TEXTREL: u64 = 4;
    if let Some(dynamic) = phdrs.iter().find(|p| p.p_type == libc::PT_DYNAMIC) {
        /// An `Elf64_Dyn` entry (the libc crate has no such type).
        #[repr(C)]
        struct Dyn {
            tag: i64,
            val: u64,
        }
        let mut d = (bias + dynamic.p_vaddr as usize) as *const Dyn;
        // SAFETY: the caller vouches the headers are the loaded program's, whose
        // dynamic section is mapped and ends with DT_NULL.
        unsafe {
            while (*d).tag != 0 {
                if (*d).tag == DT_TEXTREL || ((*d).tag == DT_FLAGS && (*d).val & DF_TEXTREL != 0) {
                    return Err("the binary has text relocations".into());
                }
                d = d.add(1);
            }
        }
    }
    Ok(read_only_ranges(bias, phdrs, page_size()))
}

/// The whole pages of read-only `PT_LOAD` segments (neither writable nor in the RELRO
/// range), shifted by `bias`.
fn read_only_ranges(bias: usize, phdrs: &[libc::Elf64_Phdr], page: usize) -> Vec<(usize, usize)> {
    let relro: Vec<(usize, usize)> = phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_GNU_RELRO)
        .map(|p| (p.p_vaddr as usize, (p.p_vaddr + p.p_memsz) as usize))
        .collect();
    phdrs
        .iter()
        .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_W == 0 && p.p_filesz > 0)
        .filter_map(|p| {
            // Only pages wholly inside the segment's file-backed part: the page shared
            // with a neighbouring segment may hold that segment's written bytes.
            let start = (p.p_vaddr as usize).next_multiple_of(page);
            let end = (p.p_vaddr + p.p_filesz) as usize / page * page;
            let overlaps_relro = relro.iter().any(|&(lo, hi)| start < hi && lo < end);
            (end > start && !overlaps_relro).then(|| (bias + start, end - start))
        })
        .collect()
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

/// This process's resident size (`VmRSS`), in KiB.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phdr(p_type: u32, p_flags: u32, p_vaddr: u64, p_filesz: u64, p_memsz: u64) -> libc::Elf64_Phdr {
        libc::Elf64_Phdr {
            p_type,
            p_flags,
            p_offset: p_vaddr,
            p_vaddr,
            p_paddr: p_vaddr,
            p_filesz,
            p_memsz,
            p_align: 4096,
        }
    }

    #[test]
    fn only_whole_pages_of_segments_never_written_are_released() {
        let (r, rx, rw) = (libc::PF_R, libc::PF_R | libc::PF_X, libc::PF_R | libc::PF_W);
        let phdrs = [
            phdr(libc::PT_PHDR, r, 0x40, 0x200, 0x200),
            phdr(libc::PT_LOAD, r, 0, 0x2_0100, 0x2_0100), // headers + rodata
            phdr(libc::PT_LOAD, rx, 0x2_1100, 0x5_0000, 0x5_0000), // text, starts mid-page
            phdr(libc::PT_LOAD, rw, 0x7_2100, 0x3000, 0x3000), // RELRO + data: written
            phdr(libc::PT_GNU_RELRO, r, 0x7_2100, 0x1000, 0x1f00),
            phdr(libc::PT_LOAD, r, 0x8_0000, 0, 0x1000), // no file bytes
        ];
        assert_eq!(
            read_only_ranges(0x5555_0000_0000, &phdrs, 4096),
            vec![(0x5555_0000_0000, 0x2_0000), (0x5555_0002_2000, 0x4_f000)]
        );
    }

    #[test]
    fn a_read_only_segment_inside_relro_is_kept() {
        let phdrs = [
            phdr(libc::PT_LOAD, libc::PF_R, 0x1_0000, 0x4000, 0x4000),
            phdr(libc::PT_GNU_RELRO, libc::PF_R, 0x1_2000, 0x1000, 0x1000),
        ];
        assert!(read_only_ranges(0, &phdrs, 4096).is_empty());
    }

    #[test]
    fn releasing_this_test_binarys_code_drops_its_pages_and_keeps_it_running() {
        // The test binary itself: its read-only segments are found, dropped, and the
        // code and constants used afterwards fault back in unchanged.
        let greeting = String::from("still here");
        let mut told = None;
        let bytes = release(|segments, rss| told = Some((segments.len(), rss))).expect("release");
        let (segments, before) = told.expect("the segments were not told first");
        let (before, after) = (before.expect("VmRSS"), rss_kib().expect("VmRSS"));
        assert!(segments > 0 && bytes > 0, "no read-only segment found");
        // The pages the test harness ran before are no longer this process's.
        assert!(after < before, "RSS did not drop: {before} -> {after} KiB");
        let mut v: Vec<u32> = (0..1000).rev().collect();
        v.sort();
        assert_eq!(v[999], 999);
        assert_eq!(format!("{greeting}, {}", bytes > 0), "still here, true");
    }
}

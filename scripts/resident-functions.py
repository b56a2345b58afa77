#!/usr/bin/env python3
"""Which of the agent's functions were read, for scripts/profile-agent-code.sh.

    resident-functions.py --at-release PID FILE LOG PAGES
                                     waits for LOG to say the agent gave back its
                                     start-up code, writes the pages of FILE in the page
                                     cache (mincore) to PAGES, then takes them out of
                                     process PID (process_madvise MADV_PAGEOUT) and out of
                                     the page cache (posix_fadvise DONTNEED); root
    resident-functions.py FILE COPY OUT [PAGES]
                                     names of FILE's functions with a page in the page
                                     cache (or in PAGES), without their build hash;
                                     symbols are read from COPY, the same binary
                                     elsewhere, so that reading them caches nothing of FILE

FILE is the profiling build (every function starts a page) on a filesystem that reads
one page per fault, so a cached page names one function that ran. Names are stripped as
xtask/src/link_order.rs stable_name does.
"""
import ctypes
import mmap
import os
import re
import struct
import subprocess
import sys
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
PAGE = 4096


def cached_pages(path):
    """The file's pages in the page cache, as a set of page indexes."""
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    n = (size + PAGE - 1) // PAGE
    vec = (ctypes.c_ubyte * n)()
    if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
        sys.exit(f"mincore: {os.strerror(ctypes.get_errno())}")
    libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    os.close(fd)
    return {i for i in range(n) if vec[i] & 1}


def load_segments(path):
    """(vaddr, file offset, file size) of each PT_LOAD of a 64-bit ELF file."""
    with open(path, "rb") as f:
        head = f.read(64)
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    segs = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
        if p_type == 1:
            segs.append((p_vaddr, p_offset, p_filesz))
    return segs


def stable(name):
    m = re.match(r"^(.*)\.(\d+)$", name)
    if m:
        name = m.group(1).removesuffix(".llvm")
    return re.sub(r"17h[0-9a-f]{16}E$", "E", name)


def read_functions(path, copy, out, pages=None):
    cached = {int(x) for x in open(pages).read().split()} if pages else cached_pages(path)
    segs = load_segments(copy)

    def offset(va):
        for vaddr, off, size in segs:
            if vaddr <= va < vaddr + size:
                return va - vaddr + off
        return None

    nm = subprocess.run(["nm", "--numeric-sort", "--print-size", "--defined-only", copy],
                        capture_output=True, text=True, check=True).stdout
    names, seen, size = [], set(), 0
    for line in nm.splitlines():
        f = line.split()
        if len(f) != 4 or f[2] not in ("t", "T", "W"):
            continue
        addr, n = int(f[0], 16), int(f[1], 16)
        first, last = offset(addr), offset(addr + max(n, 1) - 1)
        if first is None or last is None:
            continue
        if any(p in cached for p in range(first // PAGE, last // PAGE + 1)):
            size += n
            s = stable(f[3])
            if s not in seen:
                seen.add(s)
                names.append(s)
    with open(out, "w") as o:
        o.write("".join(n + "\n" for n in names))
    print(f"{len(names)} functions read ({size / 1e6:.2f} MB) -> {out}")


def evict(pid, path):
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    if pidfd < 0:
        sys.exit(f"pidfd_open: {os.strerror(ctypes.get_errno())}")

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    exe = os.readlink(f"/proc/{pid}/exe")
    for line in open(f"/proc/{pid}/maps"):
        f = line.split()
        if len(f) > 5 and f[5] == exe and "w" not in f[1]:
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            iov = IoVec(lo, hi - lo)
            # process_madvise(pidfd, iov, 1, MADV_PAGEOUT, 0): unmaps and reclaims the
            # file's pages the process still maps.
            libc.syscall(440, pidfd, ctypes.byref(iov), 1, 21, 0)
    os.close(pidfd)
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    left = len(cached_pages(path))
    print(f"evicted: {left} pages of the binary still cached")


def at_release(pid, path, log, pages):
    # Polled often: what runs between the release and the eviction is missed.
    for _ in range(4000):
        if "giving back the pages of code" in open(log, errors="replace").read():
            break
        time.sleep(0.002)
    else:
        sys.exit("the agent never gave back its start-up code")
    cached = cached_pages(path)
    evict(pid, path)
    with open(pages, "w") as o:
        o.write(" ".join(map(str, sorted(cached))))


if __name__ == "__main__":
    if sys.argv[1] == "--at-release":
        at_release(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        read_functions(*sys.argv[1:])

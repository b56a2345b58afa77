//! The system calls of the kernel-TLS path, each wrapped once: attaching the TLS ULP,
//! installing keys, splice through a pipe, and reading and sending records of a given
//! TLS content type with `recvmsg`/`sendmsg` control messages.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::CryptoInfo;

/// `SOL_TLS` socket option level (linux/socket.h).
pub const SOL_TLS: libc::c_int = 282;
/// Send a record of the content type in the cmsg (linux/tls.h).
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// The content type of a received record (linux/tls.h).
const TLS_GET_RECORD_TYPE: libc::c_int = 2;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn check_len(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret as usize) }
}

/// Attaches the kernel's TLS upper-layer protocol to a connected TCP socket. `ENOENT`
/// means the kernel has no TLS support (module `tls` not loaded or not built).
pub fn attach_tls_ulp(fd: RawFd) -> io::Result<()> {
    let name = b"tls";
    // SAFETY: plain setsockopt with a valid pointer and length.
    check(unsafe { libc::setsockopt(fd, libc::SOL_TCP, libc::TCP_ULP, name.as_ptr().cast(), name.len() as _) })
}

/// Installs one direction's keys (`libc::TLS_TX` or `libc::TLS_RX`).
pub fn set_crypto(fd: RawFd, direction: libc::c_int, info: &CryptoInfo) -> io::Result<()> {
    let (ptr, len) = info.as_raw();
    // SAFETY: `ptr`/`len` describe a live, fully initialized crypto_info struct.
    check(unsafe { libc::setsockopt(fd, SOL_TLS, direction, ptr, len as _) })
}

/// A pipe for splice, both ends non-blocking when asked.
#[derive(Debug)]
pub struct Pipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
    /// What the pipe holds at most.
    pub capacity: usize,
}

impl Pipe {
    /// A pipe of (up to) `want` bytes; the kernel may grant less (then the default 64 KiB).
    pub fn new(nonblocking: bool, want: usize) -> io::Result<Pipe> {
        let mut fds = [0; 2];
        let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        check(unsafe { libc::pipe2(fds.as_mut_ptr(), flags) })?;
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own.
        let size = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want as libc::c_int) };
        let capacity = if size > 0 {
            size as usize
        } else {
            // SAFETY: as above.
            (unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) }).max(4096) as usize
        };
        Ok(Pipe { read, write, capacity })
    }
}

/// `splice(2)` without offsets; `nonblocking` adds `SPLICE_F_NONBLOCK`.
pub fn splice(from: RawFd, to: RawFd, len: usize, nonblocking: bool) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | if nonblocking { libc::SPLICE_F_NONBLOCK } else { 0 };
    // SAFETY: null offsets are allowed for pipes and sockets.
    check_len(unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) })
}

/// Reads from a kernel-TLS socket with `recvmsg`, returning the byte count and the TLS
/// content type of what was read (23 = application data when the kernel sends no
/// control message). Records of another type than application data are returned one
/// at a time, which is how close_notify and other alerts are read after offload.
pub fn recv_record(fd: RawFd, buf: &mut [u8], nonblocking: bool) -> io::Result<(usize, u8)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    // SAFETY: zeroed msghdr is valid; we point it at live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
    let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: every pointer in `msg` refers to a buffer that outlives the call.
    let n = check_len(unsafe { libc::recvmsg(fd, &mut msg, flags) })?;
    let mut record_type = super::records::APPLICATION_DATA;
    // SAFETY: CMSG_* walk the control buffer the kernel just filled, within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = *libc::CMSG_DATA(cmsg);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, record_type))
}

/// Sends `data` as one record of TLS content type `record_type` on a kernel-TLS socket.
pub fn send_record(fd: RawFd, record_type: u8, data: &[u8], nonblocking: bool) -> io::Result<usize> {
    let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut _, iov_len: data.len() };
    let mut cbuf = [0u64; 4];
    // SAFETY: zeroed msghdr is valid; we point it at live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE/LEN are pure arithmetic; CMSG_FIRSTHDR/DATA address inside
    // `cbuf`, which is large enough for one cmsg with one byte of data.
    unsafe {
        msg.msg_controllen = libc::CMSG_SPACE(1) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = record_type;
    }
    let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: every pointer in `msg` refers to a buffer that outlives the call.
    check_len(unsafe { libc::sendmsg(fd, &msg, flags) })
}

/// `read(2)` (the `copy` engine).
#[cfg(feature = "bench-engines")]
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    check_len(unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) })
}

/// `send(2)` without SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of its length.
    check_len(unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) })
}

/// Shuts down the write side (sends FIN once queued data is out).
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the caller keeps open.
    check(unsafe { libc::shutdown(fd, libc::SHUT_WR) })
}

/// Sets `SO_RCVTIMEO` and `SO_SNDTIMEO`, so blocking calls wake up to check for
/// cancellation (the thread engines).
#[cfg(feature = "bench-engines")]
pub fn set_timeouts(fd: RawFd, every: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: every.as_secs() as _, tv_usec: every.subsec_micros() as _ };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt with a valid timeval.
        check(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as _,
            )
        })?;
    }
    Ok(())
}

/// True for the errors that say "a non-data TLS record is next": `read` gives `EIO`,
/// `splice` (and io_uring's splice) `EINVAL`.
pub fn is_control_record_next(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
}

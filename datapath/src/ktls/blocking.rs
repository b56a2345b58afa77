//! The thread-per-direction engines: each direction of a stream on its own thread with
//! blocking sockets, splicing socket → pipe → socket either with the `splice(2)` system
//! call ([`Splicer::Syscall`]) or through an io_uring ring ([`Splicer::Uring`], whose
//! splice the kernel runs on its io-wq workers).
//!
//! They exist to be measured against the readiness-driven engine ([`super::pump`]).
//! Sockets get 250 ms receive/send timeouts so a thread notices within that time when
//! the stream is cancelled or its other direction failed; cancelling resets both
//! sockets (SO_LINGER 0) and the threads close them on their way out.

use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::pump::{Pending, RECORD_BUF, TunnelTls, truncated};
use super::records::{self, Received};
use super::sys;
use crate::{KtlsEngine, PIPE_SIZE, Side, StreamEnd, Transfer};

/// How often blocked threads wake to check for cancellation.
const WAKE_EVERY: Duration = Duration::from_millis(250);
/// Thread stacks: the loops are shallow.
const STACK: usize = 128 * 1024;

/// How one splice is issued.
pub(crate) enum Splicer {
    Syscall,
    Uring(Box<io_uring::IoUring>),
}

impl Splicer {
    /// The splicer of a thread engine: [`KtlsEngine::Threads`] or [`KtlsEngine::Uring`].
    fn new(engine: KtlsEngine) -> io::Result<Splicer> {
        Ok(match engine {
            KtlsEngine::Threads => Splicer::Syscall,
            KtlsEngine::Uring => Splicer::Uring(Box::new(io_uring::IoUring::new(4)?)),
            KtlsEngine::Splice | KtlsEngine::Copy => unreachable!("{engine:?} is not a thread-per-direction engine"),
        })
    }

    fn splice(&mut self, from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        match self {
            Splicer::Syscall => sys::splice(from, to, len, false),
            Splicer::Uring(ring) => {
                use io_uring::{opcode, types};
                let len = len.min(u32::MAX as usize) as u32;
                let sqe =
                    opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len).flags(libc::SPLICE_F_MOVE).build();
                // SAFETY: the SQE refers only to descriptors that stay open until its
                // completion, which is awaited right here.
                unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("io_uring queue full"))?;
                ring.submit_and_wait(1)?;
                let cqe = ring.completion().next().ok_or_else(|| io::Error::other("io_uring: no completion"))?;
                let res = cqe.result();
                if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) }
            }
        }
    }
}

/// Shared between a stream's two threads and its task.
struct Shared {
    tunnel: StdTcpStream,
    plain: StdTcpStream,
    tls: TunnelTls,
    stop: AtomicBool,
    up: AtomicU64,
    down: AtomicU64,
    copied: AtomicU64,
}

impl Shared {
    /// Retries `f` while it times out (EAGAIN from SO_RCVTIMEO/SO_SNDTIMEO) or is
    /// interrupted, until the stream is stopped.
    fn retry<T>(&self, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::Error::other("stream stopped"));
            }
            match f() {
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
                r => return r,
            }
        }
    }

    fn drain_pipe(&self, s: &mut Splicer, pipe: &sys::Pipe, to: RawFd, mut n: usize, c: &AtomicU64) -> io::Result<()> {
        while n > 0 {
            let m = self.retry(|| s.splice(pipe.read.as_raw_fd(), to, n))?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            n -= m;
            c.fetch_add(m as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    fn write_all(&self, fd: RawFd, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = self.retry(|| sys::send(fd, data))?;
            data = &data[n..];
        }
        Ok(())
    }

    /// plain → tunnel.
    fn up(&self, engine: KtlsEngine) -> Result<(), (Side, io::Error)> {
        let (pfd, tfd) = (self.plain.as_raw_fd(), self.tunnel.as_raw_fd());
        let mut s = Splicer::new(engine).map_err(|e| (Side::Plain, e))?;
        let pipe = sys::Pipe::new(false, PIPE_SIZE).map_err(|e| (Side::Plain, e))?;
        loop {
            let n =
                self.retry(|| s.splice(pfd, pipe.write.as_raw_fd(), pipe.capacity)).map_err(|e| (Side::Plain, e))?;
            if n == 0 {
                let close = || {
                    if self.tls == TunnelTls::Kernel {
                        self.retry(|| sys::send_record(tfd, records::ALERT, &records::CLOSE_NOTIFY, false))?;
                    }
                    sys::shutdown_write(tfd)
                };
                return close().map_err(|e| (Side::Tunnel, e));
            }
            self.drain_pipe(&mut s, &pipe, tfd, n, &self.up).map_err(|e| (Side::Tunnel, e))?;
        }
    }

    /// tunnel → plain.
    fn down(&self, pending: Pending, engine: KtlsEngine) -> Result<(), (Side, io::Error)> {
        let (pfd, tfd) = (self.plain.as_raw_fd(), self.tunnel.as_raw_fd());
        let plain_err = |e| (Side::Plain, e);
        if !pending.bytes.is_empty() {
            self.write_all(pfd, &pending.bytes).map_err(plain_err)?;
            self.down.fetch_add(pending.bytes.len() as u64, Ordering::Relaxed);
            self.copied.fetch_add(pending.bytes.len() as u64, Ordering::Relaxed);
        }
        if pending.peer_closed {
            return sys::shutdown_write(pfd).map_err(plain_err);
        }
        let mut s = Splicer::new(engine).map_err(plain_err)?;
        let pipe = sys::Pipe::new(false, PIPE_SIZE).map_err(plain_err)?;
        let mut record = Vec::new();
        loop {
            match self.retry(|| s.splice(tfd, pipe.write.as_raw_fd(), pipe.capacity)) {
                Ok(0) if self.tls == TunnelTls::Plain => return sys::shutdown_write(pfd).map_err(plain_err),
                Ok(0) => return Err((Side::Tunnel, truncated())),
                Ok(n) => self.drain_pipe(&mut s, &pipe, pfd, n, &self.down).map_err(plain_err)?,
                Err(e) if self.tls == TunnelTls::Kernel && sys::is_control_record_next(&e) => {
                    record.resize(RECORD_BUF, 0);
                    let (n, ty) =
                        self.retry(|| sys::recv_record(tfd, &mut record, false)).map_err(|e| (Side::Tunnel, e))?;
                    if n == 0 {
                        return Err((Side::Tunnel, truncated()));
                    }
                    match records::classify(ty, &record[..n]) {
                        Received::Data => {
                            self.write_all(pfd, &record[..n]).map_err(plain_err)?;
                            self.down.fetch_add(n as u64, Ordering::Relaxed);
                            self.copied.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Received::CloseNotify => return sys::shutdown_write(pfd).map_err(plain_err),
                        Received::Ignore(_) => {}
                        Received::Fatal(why) => return Err((Side::Tunnel, io::Error::other(why))),
                        // The benchmark engines do not follow key updates (the splice
                        // engine of production builds does).
                        Received::KeyUpdate { .. } => {
                            return Err((Side::Tunnel, io::Error::other("KeyUpdate: not followed by this engine")));
                        }
                    }
                }
                Err(e) => return Err((Side::Tunnel, e)),
            }
        }
    }
}

fn into_blocking(s: TcpStream) -> io::Result<StdTcpStream> {
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    sys::set_timeouts(s.as_raw_fd(), WAKE_EVERY)?;
    Ok(s)
}

/// Runs a stream on two threads; returns how it ended. Live counts reach `transfer`
/// every [`WAKE_EVERY`] and exactly at the end.
pub(crate) async fn run(
    tunnel: TcpStream,
    plain: TcpStream,
    pending: Pending,
    engine: KtlsEngine,
    tls: TunnelTls,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamEnd {
    let (tunnel, plain) = match (into_blocking(tunnel), into_blocking(plain)) {
        (Ok(t), Ok(p)) => (t, p),
        (Err(e), _) => return StreamEnd::Aborted { side: Side::Tunnel, error: e },
        (_, Err(e)) => return StreamEnd::Aborted { side: Side::Plain, error: e },
    };
    let shared = Arc::new(Shared {
        tunnel,
        plain,
        tls,
        stop: AtomicBool::new(false),
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        copied: AtomicU64::new(0),
    });
    let (up_tx, mut up_rx) = oneshot::channel();
    let (down_tx, mut down_rx) = oneshot::channel();
    let spawn = |name: &str| std::thread::Builder::new().name(name.into()).stack_size(STACK);
    let s = shared.clone();
    let started = spawn("sluice-up").spawn(move || {
        let _ = up_tx.send(s.up(engine));
    });
    let s = shared.clone();
    let started = started.and_then(|_| {
        spawn("sluice-down").spawn(move || {
            let _ = down_tx.send(s.down(pending, engine));
        })
    });
    if let Err(e) = started {
        shared.stop.store(true, Ordering::Relaxed);
        return StreamEnd::Aborted { side: Side::Plain, error: e };
    }
    let sync = |s: &Shared| {
        transfer.plain_to_tunnel.store(s.up.load(Ordering::Relaxed), Ordering::Relaxed);
        transfer.tunnel_to_plain.store(s.down.load(Ordering::Relaxed), Ordering::Relaxed);
        transfer.copied.store(s.copied.load(Ordering::Relaxed), Ordering::Relaxed);
    };
    let (mut up_done, mut down_done) = (false, false);
    let mut tick = tokio::time::interval(WAKE_EVERY);
    let end = loop {
        tokio::select! {
            r = &mut up_rx, if !up_done => match r {
                Ok(Ok(())) => up_done = true,
                Ok(Err((side, error))) => break StreamEnd::Aborted { side, error },
                Err(_) => break StreamEnd::Aborted { side: Side::Plain, error: io::Error::other("engine thread died") },
            },
            r = &mut down_rx, if !down_done => match r {
                Ok(Ok(())) => down_done = true,
                Ok(Err((side, error))) => break StreamEnd::Aborted { side, error },
                Err(_) => break StreamEnd::Aborted { side: Side::Tunnel, error: io::Error::other("engine thread died") },
            },
            _ = tick.tick() => sync(&shared),
            _ = cancel.cancelled() => break StreamEnd::Cancelled,
        }
        if up_done && down_done {
            break StreamEnd::Clean;
        }
    };
    sync(&shared);
    if matches!(end, StreamEnd::Clean) {
        crate::close_gracefully_fd(shared.plain.as_raw_fd());
    } else {
        // The threads drop their references within WAKE_EVERY; the last one closes the
        // sockets, which then reset.
        shared.stop.store(true, Ordering::Relaxed);
        crate::reset_fd(shared.tunnel.as_raw_fd());
        crate::reset_fd(shared.plain.as_raw_fd());
    }
    end
}

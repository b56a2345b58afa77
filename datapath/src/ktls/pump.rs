//! The readiness-driven engines: both directions of a stream in one tokio task, each
//! system call made when epoll says the socket is ready.
//!
//! - [`Mover::Splice`]: socket → pipe → socket with `splice(2)`; the payload stays in
//!   kernel pages (kernel TLS decrypts into them and encrypts out of them).
//! - `Mover::Copy` (`bench-engines` only): `recvmsg`/`read` into a buffer and `send`
//!   out of it: kernel TLS with one user-space copy per byte (the comparison point).
//!
//! Ends follow the data path's rules: EOF on the plain socket becomes close_notify +
//! FIN on the tunnel; a close_notify from the tunnel becomes FIN on the plain socket; a
//! tunnel FIN without close_notify, an alert, or any error aborts the stream.
//!
//! A stream shares its tokio worker with the control session, heartbeats, accepts and
//! timers. While both of its sockets stay ready (the usual case when this end is the
//! slowest part of a transfer: kernel TLS does the crypto inside these system calls) a
//! loop of successful calls would never give the worker back, and tasks queued behind it
//! would wait for the whole transfer (issue #11 row 10: an agent's pings stopped for 20 s
//! during a 256 MiB transfer in the VM, and the relay declared it dead). So each
//! direction yields to the runtime after every [`SLICE`] of work ([`Turn`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::TcpStream;
use tracing::debug;

use super::key_update::{self, KeySchedule, Rekeying};
use super::records::{self, Received};
use super::sys;
#[cfg(feature = "bench-engines")]
use crate::COPY_BUF;
use crate::{PIPE_SIZE, Side, Transfer};

/// How payload moves once the kernel does the TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mover {
    Splice,
    #[cfg(feature = "bench-engines")]
    Copy,
}

/// Whether the tunnel socket really runs kernel TLS. `Plain` exists for tests and
/// benchmarks of the engines on kernels without TLS: ends are then plain FINs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TunnelTls {
    Kernel,
    #[cfg(any(test, feature = "bench-engines"))]
    Plain,
}

/// What an offload hands to the engine: plaintext rustls decrypted before offload,
/// whether it had seen close_notify, and the key schedule for following key updates.
#[derive(Debug)]
pub(crate) struct Pending {
    pub bytes: Vec<u8>,
    pub peer_closed: bool,
    pub key_schedule: Result<KeySchedule, String>,
    /// See [`super::Offloaded::send_records_per_key`].
    pub send_records_per_key: Option<u64>,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            bytes: Vec::new(),
            peer_closed: false,
            key_schedule: Err("no traffic secrets were handed over".into()),
            send_records_per_key: None,
        }
    }
}

type Failure = (Side, io::Error);

/// How long one direction of a stream may keep its tokio worker busy before it lets the
/// runtime's other tasks run. A few system calls' worth: a 64 KiB splice through kernel
/// TLS takes well under a millisecond on real hardware and a few under emulation.
pub(crate) const SLICE: Duration = Duration::from_millis(5);

/// One direction's time on its worker since it last gave the worker back.
pub(crate) struct Turn {
    since: Instant,
}

impl Turn {
    pub(crate) fn new() -> Turn {
        Turn { since: Instant::now() }
    }

    /// Called after each system call that moved bytes: once this direction has run for
    /// [`SLICE`], yields, so queued tasks, timers and I/O events are served before it
    /// goes on.
    pub(crate) async fn moved(&mut self) {
        if self.since.elapsed() >= SLICE {
            tokio::task::yield_now().await;
            self.since = Instant::now();
        }
    }
}

/// Moves both directions until both end cleanly, or one fails.
pub(crate) async fn run(
    tunnel: &TcpStream,
    plain: &TcpStream,
    pending: Pending,
    mover: Mover,
    tls: TunnelTls,
    transfer: &Transfer,
) -> Result<(), Failure> {
    let Pending { bytes, peer_closed, key_schedule, send_records_per_key } = pending;
    let rekeying = Rekeying::new(key_schedule, send_records_per_key);
    let up = up(plain, tunnel, mover, tls, transfer, &rekeying);
    let down = down(tunnel, plain, (bytes, peer_closed), mover, tls, transfer, &rekeying);
    tokio::try_join!(up, down).map(|_| ())
}

/// Sends a KeyUpdate and switches to the next send key when one is due: the answer
/// this end owes the peer (RFC 8446 §4.6.3: before its next application data record),
/// or its own key's record budget is spent. Called before each write of application
/// data to the tunnel.
async fn update_send_key(tunnel: &TcpStream, rekeying: &Rekeying) -> io::Result<()> {
    if !rekeying.take_send_key_update() {
        return Ok(());
    }
    let fd = tunnel.as_raw_fd();
    let msg = &key_update::KEY_UPDATE_NOT_REQUESTED;
    let n = when_ready(tunnel, Interest::WRITABLE, || sys::send_record(fd, records::HANDSHAKE, msg, true)).await?;
    if n != msg.len() {
        return Err(io::Error::other(format!("kernel TLS took {n} of the KeyUpdate's {} bytes", msg.len())));
    }
    rekeying.next_send_key(fd)?;
    debug!("sent a TLS key update; sending under the next key");
    Ok(())
}

/// Retries `f` whenever the socket is not ready, waiting for readiness in between.
async fn when_ready<T>(s: &TcpStream, interest: Interest, mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match s.try_io(interest, &mut f) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready(interest).await?;
            }
            r => return r,
        }
    }
}

async fn write_all(s: &TcpStream, mut data: &[u8], turn: &mut Turn) -> io::Result<()> {
    while !data.is_empty() {
        let n = when_ready(s, Interest::WRITABLE, || sys::send(s.as_raw_fd(), data)).await?;
        data = &data[n..];
        turn.moved().await;
    }
    Ok(())
}

/// Plaintext bytes in a full TLS record.
const MAX_RECORD: usize = 16 * 1024;

/// Writes the `n` bytes in `pipe` to `dst`. Returns how many TLS records kernel TLS
/// makes of them at least (each call ends a record; a record holds 16 KiB at most).
async fn drain_pipe(
    pipe: &sys::Pipe,
    dst: &TcpStream,
    mut n: usize,
    counter: &AtomicU64,
    turn: &mut Turn,
) -> io::Result<u64> {
    let mut records = 0;
    while n > 0 {
        let m = when_ready(dst, Interest::WRITABLE, || sys::splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), n, true))
            .await?;
        if m == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        n -= m;
        records += m.div_ceil(MAX_RECORD) as u64;
        counter.fetch_add(m as u64, Ordering::Relaxed);
        turn.moved().await;
    }
    Ok(records)
}

/// Ends the tunnel's sending direction cleanly: close_notify, then FIN.
pub(crate) async fn finish_tunnel(tunnel: &TcpStream, tls: TunnelTls) -> io::Result<()> {
    let fd = tunnel.as_raw_fd();
    if tls == TunnelTls::Kernel {
        when_ready(tunnel, Interest::WRITABLE, || sys::send_record(fd, records::ALERT, &records::CLOSE_NOTIFY, true))
            .await?;
    }
    sys::shutdown_write(fd)
}

/// plain → tunnel.
async fn up(
    plain: &TcpStream,
    tunnel: &TcpStream,
    mover: Mover,
    tls: TunnelTls,
    transfer: &Transfer,
    rekeying: &Rekeying,
) -> Result<(), Failure> {
    let pfd = plain.as_raw_fd();
    let counter = &transfer.plain_to_tunnel;
    let tunnel_err = |e| (Side::Tunnel, e);
    let mut turn = Turn::new();
    match mover {
        Mover::Splice => {
            let pipe = sys::Pipe::new(true, PIPE_SIZE).map_err(|e| (Side::Plain, e))?;
            loop {
                let n = when_ready(plain, Interest::READABLE, || {
                    sys::splice(pfd, pipe.write.as_raw_fd(), pipe.capacity, true)
                })
                .await
                .map_err(|e| (Side::Plain, e))?;
                if n == 0 {
                    return finish_tunnel(tunnel, tls).await.map_err(tunnel_err);
                }
                update_send_key(tunnel, rekeying).await.map_err(tunnel_err)?;
                let records = drain_pipe(&pipe, tunnel, n, counter, &mut turn).await.map_err(tunnel_err)?;
                rekeying.sent_records(records);
            }
        }
        #[cfg(feature = "bench-engines")]
        Mover::Copy => {
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let n = when_ready(plain, Interest::READABLE, || sys::read(pfd, &mut buf))
                    .await
                    .map_err(|e| (Side::Plain, e))?;
                if n == 0 {
                    return finish_tunnel(tunnel, tls).await.map_err(tunnel_err);
                }
                update_send_key(tunnel, rekeying).await.map_err(tunnel_err)?;
                write_all(tunnel, &buf[..n], &mut turn).await.map_err(tunnel_err)?;
                rekeying.sent_records(n.div_ceil(MAX_RECORD) as u64);
                counter.fetch_add(n as u64, Ordering::Relaxed);
                transfer.copied.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
}

/// What the receive loop does after a record read with `recvmsg`.
enum Next {
    Continue,
    Done,
}

/// Acts on one record read with `recvmsg` from `tunnel`: payload goes to `plain`.
async fn on_record(
    record_type: u8,
    data: &[u8],
    tunnel: &TcpStream,
    plain: &TcpStream,
    transfer: &Transfer,
    turn: &mut Turn,
    rekeying: &Rekeying,
) -> Result<Next, Failure> {
    let (counter, copied) = (&transfer.tunnel_to_plain, &transfer.copied);
    match records::classify(record_type, data) {
        Received::Data => {
            write_all(plain, data, turn).await.map_err(|e| (Side::Plain, e))?;
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            copied.fetch_add(data.len() as u64, Ordering::Relaxed);
            Ok(Next::Continue)
        }
        Received::CloseNotify => {
            sys::shutdown_write(plain.as_raw_fd()).map_err(|e| (Side::Plain, e))?;
            Ok(Next::Done)
        }
        Received::Ignore(what) => {
            debug!(what, "ignoring a TLS record after kernel offload");
            Ok(Next::Continue)
        }
        Received::KeyUpdate { update_requested } => {
            rekeying.follow(tunnel.as_raw_fd(), update_requested).map_err(|e| (Side::Tunnel, e))?;
            debug!(update_requested, "followed the peer's TLS key update");
            Ok(Next::Continue)
        }
        Received::Fatal(why) => Err((Side::Tunnel, io::Error::other(why))),
    }
}

/// The tunnel's FIN: clean only without TLS (tests, benchmarks); with TLS it means
/// truncation. (`plain` goes unused where only kernel TLS is built.)
#[cfg_attr(not(any(test, feature = "bench-engines")), allow(unused_variables))]
fn tunnel_eof(plain: &TcpStream, tls: TunnelTls) -> Result<(), Failure> {
    match tls {
        #[cfg(any(test, feature = "bench-engines"))]
        TunnelTls::Plain => sys::shutdown_write(plain.as_raw_fd()).map_err(|e| (Side::Plain, e)),
        TunnelTls::Kernel => Err((Side::Tunnel, truncated())),
    }
}

pub(crate) fn truncated() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the tunnel closed without TLS close_notify (stream truncated)")
}

/// tunnel → plain.
async fn down(
    tunnel: &TcpStream,
    plain: &TcpStream,
    (pending, peer_closed): (Vec<u8>, bool),
    mover: Mover,
    tls: TunnelTls,
    transfer: &Transfer,
    rekeying: &Rekeying,
) -> Result<(), Failure> {
    let (counter, copied) = (&transfer.tunnel_to_plain, &transfer.copied);
    let tfd = tunnel.as_raw_fd();
    let mut turn = Turn::new();
    if !pending.is_empty() {
        write_all(plain, &pending, &mut turn).await.map_err(|e| (Side::Plain, e))?;
        counter.fetch_add(pending.len() as u64, Ordering::Relaxed);
        copied.fetch_add(pending.len() as u64, Ordering::Relaxed);
    }
    if peer_closed {
        return sys::shutdown_write(plain.as_raw_fd()).map_err(|e| (Side::Plain, e));
    }
    match mover {
        Mover::Splice => {
            let pipe = sys::Pipe::new(true, PIPE_SIZE).map_err(|e| (Side::Plain, e))?;
            let mut record = Vec::new();
            loop {
                let r = when_ready(tunnel, Interest::READABLE, || {
                    sys::splice(tfd, pipe.write.as_raw_fd(), pipe.capacity, true)
                })
                .await;
                match r {
                    Ok(0) => return tunnel_eof(plain, tls),
                    Ok(n) => {
                        drain_pipe(&pipe, plain, n, counter, &mut turn).await.map_err(|e| (Side::Plain, e))?;
                    }
                    Err(e) if tls == TunnelTls::Kernel && sys::is_control_record_next(&e) => {
                        record.resize(RECORD_BUF, 0);
                        let (n, ty) =
                            when_ready(tunnel, Interest::READABLE, || sys::recv_record(tfd, &mut record, true))
                                .await
                                .map_err(|e| (Side::Tunnel, e))?;
                        if n == 0 {
                            return tunnel_eof(plain, tls);
                        }
                        if let Next::Done =
                            on_record(ty, &record[..n], tunnel, plain, transfer, &mut turn, rekeying).await?
                        {
                            return Ok(());
                        }
                    }
                    Err(e) => return Err((Side::Tunnel, e)),
                }
            }
        }
        #[cfg(feature = "bench-engines")]
        Mover::Copy => {
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let (n, ty) = when_ready(tunnel, Interest::READABLE, || sys::recv_record(tfd, &mut buf, true))
                    .await
                    .map_err(|e| (Side::Tunnel, e))?;
                if n == 0 {
                    return tunnel_eof(plain, tls);
                }
                if let Next::Done = on_record(ty, &buf[..n], tunnel, plain, transfer, &mut turn, rekeying).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// Room for one TLS record's plaintext (16 KiB) and then some.
pub(crate) const RECORD_BUF: usize = 16 * 1024 + 256;

#[cfg(test)]
mod turn_tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn a_direction_gives_the_worker_back_after_its_slice() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ran = Arc::new(AtomicBool::new(false));
            let r = ran.clone();
            tokio::spawn(async move { r.store(true, Ordering::Relaxed) });
            let mut turn = Turn::new();
            // Busy past the slice, as a splice loop whose sockets stay ready would be.
            let t = Instant::now();
            while t.elapsed() < SLICE {
                std::hint::spin_loop();
            }
            turn.moved().await;
            assert!(ran.load(Ordering::Relaxed), "the queued task did not run");
        });
    }
}

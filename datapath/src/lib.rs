//! The data path: moving one stream's bytes between a tunnel (TLS) connection and a
//! plain TCP socket, in both directions, with exact end-of-stream semantics.
//!
//! Relay and agent use it the same way: [`DataPath::new`] once at start (it asks the
//! kernel what it supports; [`DataPath::describe`] says what was chosen), then per
//! stream [`DataPath::prepare`] once the last control frame is through — which hands
//! the connection's TLS keys to the kernel when it can — and [`PreparedStream::run`].
//! Before that, the tunnel's TLS session runs over a [`TunnelSocket`], which keeps the
//! connection at a TLS record boundary so the kernel can take it over.
//!
//! Paths ([`PathKind`], defined with the wire protocol in `sluice-proto`):
//! - kernel TLS + splice (the default where the kernel has TLS): payload moves socket →
//!   pipe → socket in kernel pages, never copied through user space;
//! - user-space rustls ([`userspace`]): where the kernel has no TLS, the cipher cannot
//!   be offloaded, the operator forces it, or a connection refuses the ULP;
//! - with the cargo feature `bench-engines` only, three more kernel-TLS engines kept to
//!   be measured against splice ([`KtlsEngine`]: io_uring, blocking threads, copy) and
//!   `engines_without_tls`, which drives them on plain sockets for benchmarks. Production
//!   builds of `sluice` and `sluice-agent` leave the feature off (docs/ktls.md).
//!
//! Semantics, identical on every path:
//! - A clean end of one direction (EOF on the plain socket, TLS `close_notify` on the
//!   tunnel, or the empty chunk of a framed stream) is propagated as a half-close: the
//!   other side is shut down for writing (TCP FIN, `close_notify` + FIN, or the empty
//!   chunk), and the opposite direction keeps flowing. A framed stream
//!   ([`DataPath::prepare_framed`], user space only) that ends cleanly hands its tunnel
//!   connection back for the next stream.
//! - Anything else (a reset, a TLS error or alert, a TCP FIN without `close_notify`) is
//!   an abort: both sockets are reset (RST) at once, so neither peer mistakes a
//!   truncated stream for a complete one.
//! - A process that dies mid-stream cannot reset anything itself, so each plain socket
//!   is armed with [`reset_on_close`] (SO_LINGER 0) when it is accepted or connected:
//!   the kernel resets it when the process's descriptors close. Only a clean end
//!   disarms it, so the bytes still queued drain before the FIN.
//!
//! `unsafe` is confined to the system calls (`ktls/sys.rs`, key wiping and the ring in
//! `ktls/`, [`reset`]) and one `ReadBuf` hand-over in `tunnel_socket.rs`, each with a
//! SAFETY comment.

pub mod buffers;
pub mod ktls;
mod tunnel_socket;
mod userspace;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;

pub use ktls::KtlsSupport;
pub use ktls::key_update::{TrafficSecrets, key_updates};
pub use sluice_proto::wire::PathKind;
pub use tunnel_socket::TunnelSocket;

use ktls::pump::{self, Mover, Pending, TunnelTls};
use ktls::{Offload, Offloaded};

/// Bytes buffered per direction of a stream on the copying paths. 64 KiB holds four
/// full TLS records, which keeps syscalls per GiB low without costing much memory.
pub const COPY_BUF: usize = 64 * 1024;

/// Pipe size per direction on the splice paths (the kernel default; larger pipes cost
/// unprivileged users their pipe-pages quota with many streams).
pub const PIPE_SIZE: usize = 64 * 1024;

/// A tunnel connection on either end: rustls over a [`TunnelSocket`].
pub type Tunnel = TlsStream<TunnelSocket>;

/// Which data path an end may use (`SLUICE_DATA_PATH`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataPathMode {
    /// Kernel TLS where the kernel supports it, else user-space rustls.
    #[default]
    Auto,
    /// Always user-space rustls.
    Userspace,
}

impl FromStr for DataPathMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DataPathMode::Auto),
            "userspace" => Ok(DataPathMode::Userspace),
            _ => Err(format!("unknown data path {s:?}: expected `auto` (kernel TLS when available) or `userspace`")),
        }
    }
}

/// How kernel-TLS streams move bytes (`SLUICE_KTLS_ENGINE`). Production builds have
/// only [`KtlsEngine::Splice`], the one that measured fastest (docs/benchmarks.md); the
/// others exist with the cargo feature `bench-engines`, to be measured against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KtlsEngine {
    /// splice through a pipe when epoll says ready (tokio).
    #[default]
    Splice,
    /// splice through a pipe, submitted to io_uring, a thread per direction.
    #[cfg(feature = "bench-engines")]
    Uring,
    /// blocking splice, one thread per direction.
    #[cfg(feature = "bench-engines")]
    Threads,
    /// read/write through a buffer (not zero-copy).
    #[cfg(feature = "bench-engines")]
    Copy,
}

impl KtlsEngine {
    /// Every engine this build carries.
    #[cfg(feature = "bench-engines")]
    pub const ALL: &[KtlsEngine] = &[KtlsEngine::Splice, KtlsEngine::Copy, KtlsEngine::Threads, KtlsEngine::Uring];
    /// Every engine this build carries.
    #[cfg(not(feature = "bench-engines"))]
    pub const ALL: &[KtlsEngine] = &[KtlsEngine::Splice];

    /// The path label of streams this engine moves.
    pub fn path(self) -> PathKind {
        match self {
            KtlsEngine::Splice => PathKind::KtlsSplice,
            #[cfg(feature = "bench-engines")]
            KtlsEngine::Uring => PathKind::KtlsUring,
            #[cfg(feature = "bench-engines")]
            KtlsEngine::Threads => PathKind::KtlsThreads,
            #[cfg(feature = "bench-engines")]
            KtlsEngine::Copy => PathKind::KtlsCopy,
        }
    }

    /// False for the engine that copies payload through user space.
    fn zero_copy(self) -> bool {
        #[cfg(feature = "bench-engines")]
        if self == KtlsEngine::Copy {
            return false;
        }
        true
    }
}

impl FromStr for KtlsEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "splice" => Ok(KtlsEngine::Splice),
            #[cfg(feature = "bench-engines")]
            "uring" => Ok(KtlsEngine::Uring),
            #[cfg(feature = "bench-engines")]
            "threads" => Ok(KtlsEngine::Threads),
            #[cfg(feature = "bench-engines")]
            "copy" => Ok(KtlsEngine::Copy),
            #[cfg(feature = "bench-engines")]
            _ => Err(format!("unknown kernel TLS engine {s:?}: expected splice, uring, threads or copy")),
            #[cfg(not(feature = "bench-engines"))]
            "uring" | "threads" | "copy" => Err(format!(
                "kernel TLS engine {s:?} is kept for benchmarks and not in this build, which has only `splice`: \
                 rebuild with the cargo feature `bench-engines` (e.g. `cargo build --release -p sluice-relay \
                 --features bench-engines`) to measure it"
            )),
            #[cfg(not(feature = "bench-engines"))]
            _ => Err(format!("unknown kernel TLS engine {s:?}: expected splice")),
        }
    }
}

/// Live byte counts of one stream, updated as bytes are written (readable while the
/// stream runs, for stats).
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes read from the plain socket and written into the tunnel.
    pub plain_to_tunnel: AtomicU64,
    /// Bytes read from the tunnel and written to the plain socket.
    pub tunnel_to_plain: AtomicU64,
    /// Payload bytes (either direction) that passed through a user-space buffer: all of
    /// them on the copying paths, next to none with splice.
    pub copied: AtomicU64,
}

impl Transfer {
    /// Snapshot `(plain_to_tunnel, tunnel_to_plain)`.
    pub fn get(&self) -> (u64, u64) {
        (self.plain_to_tunnel.load(Ordering::Relaxed), self.tunnel_to_plain.load(Ordering::Relaxed))
    }

    /// Payload bytes copied through user space so far.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

/// Which side of a stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Tunnel,
    Plain,
}

/// How a stream ended.
#[derive(Debug)]
pub enum StreamEnd {
    /// Both directions reached a clean end and were propagated.
    Clean,
    /// One side failed; both sockets were reset.
    Aborted { side: Side, error: io::Error },
    /// The stream was cut from outside (revocation, shutdown); both sockets were reset.
    Cancelled,
}

impl StreamEnd {
    /// Short description for logs.
    pub fn describe(&self) -> String {
        match self {
            StreamEnd::Clean => "clean".into(),
            StreamEnd::Aborted { side: Side::Tunnel, error } => format!("aborted: tunnel side failed: {error}"),
            StreamEnd::Aborted { side: Side::Plain, error } => format!("aborted: socket side failed: {error}"),
            StreamEnd::Cancelled => "cancelled".into(),
        }
    }

    /// `clean`, `aborted` or `cancelled`: the metric label.
    pub fn label(&self) -> &'static str {
        match self {
            StreamEnd::Clean => "clean",
            StreamEnd::Aborted { .. } => "aborted",
            StreamEnd::Cancelled => "cancelled",
        }
    }
}

/// What [`PreparedStream::run`] reports.
#[derive(Debug)]
pub struct StreamReport {
    pub path: PathKind,
    pub end: StreamEnd,
    /// A framed stream that ended cleanly gives its tunnel connection back, ready for
    /// the next stream's `StreamOpen` ([`DataPath::prepare_framed`]). Boxed, as it was
    /// while the stream ran: the report is small, and so are the futures that hold it.
    pub reusable: Option<Box<Tunnel>>,
}

/// One end's data path choice, made once at start.
#[derive(Debug, Clone)]
pub struct DataPath {
    mode: DataPathMode,
    engine: KtlsEngine,
    support: KtlsSupport,
}

impl DataPath {
    /// Decides the path: with [`DataPathMode::Auto`] asks the kernel which TLS ciphers
    /// it can take over.
    pub fn new(mode: DataPathMode, engine: KtlsEngine) -> DataPath {
        let support = match mode {
            DataPathMode::Auto => KtlsSupport::probe(),
            DataPathMode::Userspace => KtlsSupport::with(Vec::new(), Some("user-space path forced".into())),
        };
        DataPath { mode, engine, support }
    }

    /// A path with the given kernel support (tests).
    pub fn with_support(mode: DataPathMode, engine: KtlsEngine, support: KtlsSupport) -> DataPath {
        DataPath { mode, engine, support }
    }

    /// True when this end's streams follow a peer's TLS key update: on user-space TLS
    /// always, on kernel TLS where the kernel takes new keys (what [`Capabilities`]
    /// announces as `key_updates`).
    ///
    /// [`Capabilities`]: sluice_proto::wire::Capabilities
    pub fn follows_key_updates(&self) -> bool {
        !self.kernel_tls() || self.support.follows_key_updates
    }

    /// A warning for the start-up log when a testing knob changes how TLS behaves.
    pub fn testing_knob_warning(&self) -> Option<String> {
        sluice_proto::tls::key_update_records().map(|n| {
            format!(
                "{}={n} is set: TLS keys are updated every {n} records instead of every 2^24 (a testing knob; \
                 unset it in production)",
                sluice_proto::tls::KEY_UPDATE_RECORDS_ENV
            )
        })
    }

    /// True when streams will be offered to the kernel.
    pub fn kernel_tls(&self) -> bool {
        self.mode == DataPathMode::Auto && self.support.unavailable.is_none()
    }

    /// The path streams take, as `ktls_splice` or `userspace`.
    pub fn default_path(&self) -> PathKind {
        if self.kernel_tls() { self.engine.path() } else { PathKind::Userspace }
    }

    /// One line for the start-up log: which path, and why.
    pub fn describe(&self) -> String {
        match (&self.mode, &self.support.unavailable) {
            (DataPathMode::Userspace, _) => "user-space rustls (forced by SLUICE_DATA_PATH=userspace)".into(),
            (DataPathMode::Auto, Some(why)) => format!("user-space rustls: {why}"),
            (DataPathMode::Auto, None) => format!(
                "kernel TLS, engine {} ({}; offloadable: {:?}; {})",
                self.engine.path().as_str(),
                if self.engine.zero_copy() { "zero-copy splice" } else { "payload copied through user space" },
                self.support.ciphers,
                if self.support.follows_key_updates {
                    "follows TLS key updates"
                } else {
                    "this kernel cannot follow TLS key updates (Linux < 6.14): a stream whose peer runs \
                     user-space TLS ends when that peer updates its keys, after 2^24 records \
                     (docs/ktls.md, \"Key updates\")"
                }
            ),
        }
    }

    /// Chooses the path of one stream whose control frames are done, handing the
    /// connection's TLS to the kernel when possible. `peer_follows_key_updates`: the
    /// other end announced `key_updates`, so a kernel-TLS send direction may update its
    /// key ([`ktls::key_update`]). An error means the keys had left rustls when the
    /// kernel refused them: the tunnel connection was reset.
    pub fn prepare(&self, tunnel: Tunnel, peer_follows_key_updates: bool) -> io::Result<PreparedStream> {
        if self.mode == DataPathMode::Userspace {
            return Ok(Self::prepare_framed_or_raw(tunnel, false));
        }
        Ok(match ktls::offload(tunnel, &self.support)? {
            Offload::Kernel(mut o) => {
                if self.support.follows_key_updates && peer_follows_key_updates {
                    o.send_records_per_key = Some(ktls::key_update::send_records_per_key());
                }
                PreparedStream { inner: Prepared::Kernel(Box::new(o), self.engine), path: self.engine.path() }
            }
            Offload::Userspace { tls, reason } => {
                if self.support.unavailable.is_none() {
                    tracing::debug!(%reason, "stream stays on user-space rustls");
                }
                Self::prepare_framed_or_raw(*tls, false)
            }
        })
    }

    /// Prepares a framed stream (`StreamOpen::framed`): always user-space rustls, whose
    /// connection goes back to its pool after a clean end ([`StreamReport::reusable`]).
    /// Only ends whose streams run on user-space TLS agree to frame (the agent's
    /// `reuse` capability; the relay frames only when its own path is user-space).
    pub fn prepare_framed(&self, tunnel: Tunnel) -> PreparedStream {
        Self::prepare_framed_or_raw(tunnel, true)
    }

    fn prepare_framed_or_raw(tunnel: Tunnel, framed: bool) -> PreparedStream {
        forget_secrets(&tunnel);
        PreparedStream { inner: Prepared::Userspace(Box::new(tunnel), framed), path: PathKind::Userspace }
    }
}

/// A stream that stays on user-space TLS never follows a key update by hand (rustls
/// does): the traffic secrets its handshake recorded go now, not when it closes.
fn forget_secrets(tunnel: &Tunnel) {
    if let Some(s) = tunnel.get_ref().0.traffic_secrets() {
        s.forget();
    }
}

/// A stream whose path is chosen.
#[derive(Debug)]
pub struct PreparedStream {
    inner: Prepared,
    path: PathKind,
}

#[derive(Debug)]
enum Prepared {
    /// The tunnel, and whether the stream is framed.
    Userspace(Box<Tunnel>, bool),
    Kernel(Box<Offloaded>, KtlsEngine),
}

impl PreparedStream {
    /// The path this stream takes.
    pub fn path(&self) -> PathKind {
        self.path
    }

    /// The tunnel's TCP socket.
    pub fn tunnel_tcp(&self) -> &TcpStream {
        match &self.inner {
            Prepared::Userspace(tls, _) => tls.get_ref().0.tcp(),
            Prepared::Kernel(o, _) => &o.tcp,
        }
    }

    /// Moves the stream's bytes between the tunnel and `plain` until both directions
    /// end, then closes both. On abort, or when `cancel` fires (credentials revoked,
    /// shutdown), both TCP sockets are reset. On a clean end `plain` closes gracefully
    /// (its queued bytes drain, then FIN) even if it was armed with [`reset_on_close`];
    /// a framed stream's tunnel then comes back in [`StreamReport::reusable`].
    pub async fn run(self, plain: TcpStream, transfer: &Transfer, cancel: &CancellationToken) -> StreamReport {
        let (end, reusable) = match self.inner {
            // Each path's future on the heap: the stream holds only the one it runs.
            Prepared::Userspace(tls, framed) => Box::pin(userspace::run(tls, plain, framed, transfer, cancel)).await,
            Prepared::Kernel(o, engine) => {
                let pending = Pending {
                    bytes: o.pending,
                    peer_closed: o.peer_closed,
                    key_schedule: o.key_schedule,
                    send_records_per_key: o.send_records_per_key,
                };
                let run = Box::pin(run_engine(engine, o.tcp, plain, pending, TunnelTls::Kernel, transfer, cancel));
                (run.await, None)
            }
        };
        StreamReport { path: self.path, end, reusable }
    }
}

/// Runs a kernel-TLS engine over an offloaded tunnel (or, in tests and benchmarks, a
/// plain one).
async fn run_engine(
    engine: KtlsEngine,
    tunnel: TcpStream,
    plain: TcpStream,
    pending: Pending,
    tls: TunnelTls,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamEnd {
    match engine {
        KtlsEngine::Splice => run_pump_with(tunnel, plain, pending, Mover::Splice, tls, transfer, cancel).await,
        #[cfg(feature = "bench-engines")]
        KtlsEngine::Copy => run_pump_with(tunnel, plain, pending, Mover::Copy, tls, transfer, cancel).await,
        #[cfg(feature = "bench-engines")]
        KtlsEngine::Uring | KtlsEngine::Threads => {
            ktls::blocking::run(tunnel, plain, pending, engine, tls, transfer, cancel).await
        }
    }
}

async fn run_pump_with(
    tunnel: TcpStream,
    plain: TcpStream,
    pending: Pending,
    mover: Mover,
    tls: TunnelTls,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamEnd {
    let end = tokio::select! {
        r = pump::run(&tunnel, &plain, pending, mover, tls, transfer) => match r {
            Ok(()) => StreamEnd::Clean,
            Err((side, error)) => StreamEnd::Aborted { side, error },
        },
        _ = cancel.cancelled() => StreamEnd::Cancelled,
    };
    if matches!(end, StreamEnd::Clean) {
        close_gracefully_fd(plain.as_raw_fd());
    } else {
        reset(&tunnel);
        reset(&plain);
    }
    end
}

/// TCP keepalive for tunnel sockets, so a vanished peer is noticed even on an idle
/// stream (30 s idle, then 3 probes 10 s apart).
pub fn tune_tunnel_socket(tcp: &TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}

/// True when an idle connection can no longer carry a stream: the peer closed or reset
/// it, or sent something (on an idle tunnel connection the peer sends nothing until it
/// is used, so any byte is its TLS close). One non-blocking `MSG_PEEK`; reads nothing.
pub fn idle_connection_gone(tcp: &TcpStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: recv into a 1-byte buffer we own, on a descriptor the caller keeps open.
    let n =
        unsafe { libc::recv(tcp.as_raw_fd(), (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted);
    }
    true
}

/// Makes the next close of `tcp` send RST instead of FIN (SO_LINGER 0).
pub fn reset(tcp: &TcpStream) {
    reset_fd(tcp.as_raw_fd());
}

/// Arms `tcp` to be reset when closed, however it closes — by an error path, a dropped
/// task, or the process dying (SIGKILL, OOM): the kernel then sends RST, never a FIN
/// that would make a truncated stream look complete. Called on each plain socket of a
/// stream (the platform client at the relay, the private service at the agent) as soon
/// as it exists; [`PreparedStream::run`] disarms it on a clean end only, so the queued
/// bytes still drain and the peer gets its FIN.
pub fn reset_on_close(tcp: &TcpStream) {
    reset_fd(tcp.as_raw_fd());
}

/// Undoes [`reset_on_close`] after a clean end: close sends the queued bytes, then FIN.
pub(crate) fn close_gracefully_fd(fd: RawFd) {
    let linger = libc::linger { l_onoff: 0, l_linger: 0 };
    // SAFETY: setsockopt with a valid struct on a descriptor the caller keeps open.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as _,
        );
    }
}

/// [`reset`] for a raw descriptor the caller keeps open.
pub(crate) fn reset_fd(fd: RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt with a valid struct on a descriptor the caller keeps open.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as _,
        );
    }
}

/// Entry point for the criterion benchmarks (`bench-engines` only): the kernel-TLS
/// engines driven over plain sockets (no TLS), which measures their mechanics on any
/// kernel.
#[cfg(feature = "bench-engines")]
#[doc(hidden)]
pub mod engines_without_tls {
    use super::*;

    pub use super::KtlsEngine as Engine;

    /// Every engine, in the order the benchmarks report them.
    pub const ALL: &[Engine] = Engine::ALL;

    /// Runs `engine` between `tunnel` and `plain`; `pending` plays the plaintext rustls
    /// held at offload. `kernel_tls` makes a bare tunnel FIN an abort, as with kTLS.
    pub async fn run(
        engine: Engine,
        tunnel: TcpStream,
        plain: TcpStream,
        pending: Vec<u8>,
        kernel_tls: bool,
        transfer: &Transfer,
        cancel: &CancellationToken,
    ) -> StreamEnd {
        let tls = if kernel_tls { TunnelTls::Kernel } else { TunnelTls::Plain };
        let pending = Pending { bytes: pending, ..Pending::default() };
        run_engine(engine, tunnel, plain, pending, tls, transfer, cancel).await
    }
}

#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

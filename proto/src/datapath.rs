//! The data path: moving one stream's bytes between a tunnel (TLS) connection and a
//! plain TCP socket, in both directions, with exact end-of-stream semantics.
//!
//! [`run_stream`] is the single entry point used by relay and agent. It picks the path
//! for a stream (today the user-space rustls copy; kernel TLS + splice slots in here as
//! another [`PathKind`]) and reports how the stream ended and how many bytes moved.
//!
//! Semantics, identical on every path:
//! - A clean end of one direction (EOF on the plain socket, TLS `close_notify` on the
//!   tunnel) is propagated as a half-close: the other side is shut down for writing
//!   (TCP FIN, or `close_notify` + FIN), and the opposite direction keeps flowing.
//! - Anything else (a reset, a TLS error, a TCP FIN without `close_notify`) is an abort:
//!   both sockets are reset (RST) at once, so neither peer mistakes a truncated stream
//!   for a complete one.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;

/// Bytes buffered per direction of a stream on the user-space path. 64 KiB holds four
/// full TLS records, which keeps syscalls per GiB low without costing much memory.
pub const COPY_BUF: usize = 64 * 1024;

/// How a stream's bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// rustls in user space; payload is copied through a user-space buffer.
    Userspace,
}

impl PathKind {
    /// Short name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            PathKind::Userspace => "userspace",
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
}

impl Transfer {
    /// Snapshot `(plain_to_tunnel, tunnel_to_plain)`.
    pub fn get(&self) -> (u64, u64) {
        (self.plain_to_tunnel.load(Ordering::Relaxed), self.tunnel_to_plain.load(Ordering::Relaxed))
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
}

/// What [`run_stream`] reports.
#[derive(Debug)]
pub struct StreamReport {
    pub path: PathKind,
    pub end: StreamEnd,
}

/// Moves one stream's bytes between `tunnel` and `plain` until both directions end,
/// then closes both. On abort, or when `cancel` fires (credentials revoked, shutdown),
/// both TCP sockets are reset.
pub async fn run_stream(
    mut tunnel: TlsStream<TcpStream>,
    mut plain: TcpStream,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamReport {
    let copy = Bidirectional {
        tunnel: &mut tunnel,
        plain: &mut plain,
        up: Direction::new(),
        down: Direction::new(),
        transfer,
    };
    let end = tokio::select! {
        r = copy => match r {
            Ok(()) => StreamEnd::Clean,
            Err((side, error)) => StreamEnd::Aborted { side, error },
        },
        _ = cancel.cancelled() => StreamEnd::Cancelled,
    };
    if !matches!(end, StreamEnd::Clean) {
        reset(tunnel.get_ref().0);
        reset(&plain);
    }
    StreamReport { path: PathKind::Userspace, end }
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

/// Makes the next close of `tcp` send RST instead of FIN (SO_LINGER 0).
pub fn reset(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

/// Copies both directions of a stream in one task, without splitting either stream
/// (which would put a lock on every read and write of the TLS side).
struct Bidirectional<'a, T, P> {
    tunnel: &'a mut T,
    plain: &'a mut P,
    /// plain → tunnel
    up: Direction,
    /// tunnel → plain
    down: Direction,
    transfer: &'a Transfer,
}

impl<T, P> Future for Bidirectional<'_, T, P>
where
    T: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    type Output = Result<(), (Side, io::Error)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let up = this
            .up
            .poll_copy(cx, &mut *this.plain, &mut *this.tunnel, &this.transfer.plain_to_tunnel)
            .map_err(|(failed_reading, e)| (if failed_reading { Side::Plain } else { Side::Tunnel }, e))?;
        let down = this
            .down
            .poll_copy(cx, &mut *this.tunnel, &mut *this.plain, &this.transfer.tunnel_to_plain)
            .map_err(|(failed_reading, e)| (if failed_reading { Side::Tunnel } else { Side::Plain }, e))?;
        if up.is_ready() && down.is_ready() { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}

/// One direction of a stream: a fixed buffer and where the copy stands.
struct Direction {
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
}

impl Direction {
    fn new() -> Self {
        Direction {
            buf: vec![0u8; COPY_BUF].into_boxed_slice(),
            pos: 0,
            filled: 0,
            eof: false,
            done: false,
            need_flush: false,
        }
    }

    /// Copies until the reader would block, or to the end (EOF propagated as a
    /// shutdown of the writer). Errors say whether reading (`true`) or writing failed.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        counter: &AtomicU64,
    ) -> Poll<Result<(), (bool, io::Error)>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.filled && !self.eof {
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (false, e))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err((true, e))),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.eof = true;
                        } else {
                            self.pos = 0;
                            self.filled = n;
                        }
                    }
                }
            }
            while self.pos < self.filled {
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled]))
                    .map_err(|e| (false, e))?;
                if n == 0 {
                    return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())));
                }
                self.pos += n;
                self.need_flush = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
            }
            if self.eof {
                ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|e| (false, e))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    async fn bidi(tunnel: &mut DuplexStream, plain: &mut DuplexStream, t: &Transfer) -> Result<(), (Side, io::Error)> {
        Bidirectional { tunnel, plain, up: Direction::new(), down: Direction::new(), transfer: t }.await
    }

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut tunnel, mut agent_end) = duplex(4096);
        let (mut plain, mut client_end) = duplex(4096);
        let t = Transfer::default();
        let pump = bidi(&mut tunnel, &mut plain, &t);
        let client = async {
            // The client sends a request and half-closes, then still reads the reply.
            client_end.write_all(&vec![1u8; 100_000]).await.unwrap();
            client_end.shutdown().await.unwrap();
            let mut reply = Vec::new();
            client_end.read_to_end(&mut reply).await.unwrap();
            reply
        };
        let agent = async {
            let mut req = Vec::new();
            agent_end.read_to_end(&mut req).await.unwrap(); // sees EOF: half-close arrived
            agent_end.write_all(&vec![2u8; req.len() / 2]).await.unwrap();
            agent_end.shutdown().await.unwrap();
            req.len()
        };
        let (res, reply, got) = tokio::join!(pump, client, agent);
        res.unwrap();
        assert_eq!(got, 100_000);
        assert_eq!(reply, vec![2u8; 50_000]);
        assert_eq!(t.get(), (100_000, 50_000));
    }

    /// A reader that fails after yielding some bytes, like a reset socket.
    struct Failing(usize);
    impl AsyncRead for Failing {
        fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            if self.0 == 0 {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let n = self.0.min(buf.remaining());
            buf.put_slice(&vec![9u8; n]);
            self.0 -= n;
            Poll::Ready(Ok(()))
        }
    }
    impl AsyncWrite for Failing {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_failing_side_aborts_and_is_named() {
        let (mut tunnel, _agent_end) = duplex(1 << 20);
        let mut plain = Failing(10);
        let t = Transfer::default();
        let err = Bidirectional {
            tunnel: &mut tunnel,
            plain: &mut plain,
            up: Direction::new(),
            down: Direction::new(),
            transfer: &t,
        }
        .await
        .unwrap_err();
        assert_eq!(err.0, Side::Plain);
        assert_eq!(err.1.kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(t.get().0, 10, "bytes before the failure are delivered and counted");
    }

    #[tokio::test]
    async fn slow_writer_gets_every_byte_in_order() {
        let (mut tunnel, mut agent_end) = duplex(17); // tiny pipe: many partial writes
        let (mut plain, mut client_end) = duplex(1 << 16);
        let t = Transfer::default();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let send = async {
            client_end.write_all(&data).await.unwrap();
            client_end.shutdown().await.unwrap();
        };
        let recv = async {
            let mut got = Vec::new();
            agent_end.read_to_end(&mut got).await.unwrap();
            agent_end.shutdown().await.unwrap();
            got
        };
        let (res, (), got) = tokio::join!(bidi(&mut tunnel, &mut plain, &t), send, recv);
        res.unwrap();
        assert!(got == data);
    }
}

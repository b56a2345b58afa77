//! The user-space path: rustls encrypts and decrypts, and each direction copies through
//! a buffer it holds only while bytes flow ([`buffers`]). Used when the kernel has no TLS offload, when offload is switched
//! off, or when a connection cannot be offloaded.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{Side, StreamEnd, Transfer, TunnelSocket, buffers, close_gracefully_fd, reset};

/// Moves one stream until both directions end, one side fails, or `cancel` fires; on
/// anything but a clean end both sockets are reset.
pub(crate) async fn run(
    mut tunnel: TlsStream<TunnelSocket>,
    mut plain: TcpStream,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamEnd {
    tunnel.get_mut().0.unbound();
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
    let (up, down) = transfer.get();
    transfer.copied.store(up + down, Ordering::Relaxed);
    if matches!(end, StreamEnd::Clean) {
        close_gracefully_fd(plain.as_raw_fd());
    } else {
        reset(tunnel.get_ref().0.tcp());
        reset(&plain);
    }
    end
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

/// One direction of a stream: where the copy stands, and the buffer it borrowed while
/// bytes flow (none while the direction idles: see [`buffers`]).
struct Direction {
    buf: Option<Box<[u8]>>,
    pos: usize,
    filled: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
}

impl Direction {
    fn new() -> Self {
        Direction { buf: None, pos: 0, filled: 0, eof: false, done: false, need_flush: false }
    }

    /// Gives the buffer back; only called with nothing buffered in it.
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            buffers::give_back(buf);
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
                let mut rb = ReadBuf::new(self.buf.get_or_insert_with(buffers::take));
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (false, e))?;
                            self.need_flush = false;
                        }
                        // Nothing buffered and nothing to read: lend the buffer back
                        // until bytes flow again, so an idle stream holds none.
                        self.release();
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
                let buf = self.buf.as_deref().expect("bytes are buffered only in a held buffer");
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.pos..self.filled]))
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
                self.release();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    async fn bidi(tunnel: &mut DuplexStream, plain: &mut DuplexStream, t: &Transfer) -> Result<(), (Side, io::Error)> {
        Bidirectional { tunnel, plain, up: Direction::new(), down: Direction::new(), transfer: t }.await
    }

    /// Polls `d` once; true when it is waiting (pending).
    async fn poll_once(d: &mut Direction, r: &mut DuplexStream, w: &mut DuplexStream) -> bool {
        let counter = AtomicU64::new(0);
        std::future::poll_fn(|cx| Poll::Ready(d.poll_copy(cx, &mut *r, &mut *w, &counter).is_pending())).await
    }

    /// An idle held-open stream owns no copy buffer: after bytes pass and the reader
    /// would block, the direction has given its buffer back.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (mut from, mut reader) = duplex(4096);
        let (mut writer, mut to) = duplex(4096);
        let mut d = Direction::new();
        assert!(poll_once(&mut d, &mut reader, &mut writer).await);
        assert!(d.buf.is_none(), "nothing read yet, yet a buffer is held");
        from.write_all(b"x").await.unwrap();
        assert!(poll_once(&mut d, &mut reader, &mut writer).await);
        let mut got = [0u8; 1];
        to.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
        assert!(d.buf.is_none(), "the direction kept its buffer while idle");
        // A writer that cannot take the bytes keeps them buffered: the buffer stays.
        from.write_all(&[7u8; 3000]).await.unwrap();
        let (mut tiny_writer, _tiny_peer) = duplex(100);
        assert!(poll_once(&mut d, &mut reader, &mut tiny_writer).await);
        assert!(d.buf.is_some() && d.pos < d.filled);
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

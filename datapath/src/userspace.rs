//! The user-space path: rustls encrypts and decrypts, and each direction copies through
//! a buffer it holds only while bytes flow ([`buffers`]). Used when the kernel has no TLS
//! offload, when offload is switched off, or when a connection cannot be offloaded.
//!
//! A stream is raw (its end is the TLS `close_notify`, which ends the connection) or
//! framed (chunks behind a 4-byte length, an empty chunk ending each direction:
//! [`sluice_proto::wire::frame_header`]); a framed stream that ends cleanly hands its
//! tunnel connection back for the next stream.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use sluice_proto::wire::{FRAME_HEADER_LEN, frame_header};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;

use super::{Side, StreamEnd, Transfer, TunnelSocket, buffers, close_gracefully_fd, reset};

/// Moves one stream until both directions end, one side fails, or `cancel` fires; on
/// anything but a clean end both sockets are reset. A `framed` stream that ends cleanly
/// returns its tunnel connection, at the position where the next stream's frames start.
pub(crate) async fn run(
    mut tunnel: Box<TlsStream<TunnelSocket>>,
    mut plain: TcpStream,
    framed: bool,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> (StreamEnd, Option<Box<TlsStream<TunnelSocket>>>) {
    tunnel.get_mut().0.unbound();
    let (up, down) = if framed {
        (Direction::new(Framing::Encode { end_sent: 0 }), Direction::new(Framing::decode()))
    } else {
        (Direction::new(Framing::Raw), Direction::new(Framing::Raw))
    };
    let copy = Bidirectional { tunnel: &mut *tunnel, plain: &mut plain, up, down, transfer };
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
        return (end, framed.then_some(tunnel));
    }
    reset(tunnel.get_ref().0.tcp());
    reset(&plain);
    (end, None)
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

/// How a direction's bytes are laid out on its writer's side.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// As read; the end is the reader's EOF, passed on by shutting the writer down.
    Raw,
    /// plain → tunnel of a framed stream: each read goes out as one chunk behind its
    /// header, EOF as the empty chunk (`end_sent` of its header bytes written so far);
    /// the tunnel stays open.
    Encode { end_sent: usize },
    /// tunnel → plain of a framed stream: headers are read exactly (`have` of 4 so far)
    /// and at most `left` bytes of the current chunk, so the read never passes the
    /// empty chunk into what follows the stream on the connection.
    Decode { header: [u8; FRAME_HEADER_LEN], have: usize, left: usize },
}

impl Framing {
    fn decode() -> Framing {
        Framing::Decode { header: [0; FRAME_HEADER_LEN], have: 0, left: 0 }
    }
}

/// One direction of a stream: where the copy stands, and the buffer it borrowed while
/// bytes flow (none while the direction idles: see [`buffers`]).
struct Direction {
    framing: Framing,
    buf: Option<Box<[u8]>>,
    /// Buffered bytes `pos..filled` are still to be written; the first `header` of the
    /// buffer are a chunk header, not payload (not counted).
    pos: usize,
    filled: usize,
    header: usize,
    eof: bool,
    done: bool,
    need_flush: bool,
}

impl Direction {
    fn new(framing: Framing) -> Self {
        Direction { framing, buf: None, pos: 0, filled: 0, header: 0, eof: false, done: false, need_flush: false }
    }

    /// Gives the buffer back; only called with nothing buffered in it.
    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            buffers::give_back(buf);
        }
    }

    /// Reads what comes next into the buffer (or, framed, a chunk header), setting
    /// `pos..filled` to the bytes to write, or `eof` at the direction's end.
    fn poll_fill<R: AsyncRead + Unpin>(&mut self, cx: &mut Context<'_>, reader: &mut R) -> Poll<io::Result<()>> {
        let buf = self.buf.get_or_insert_with(buffers::take);
        match &mut self.framing {
            Framing::Raw => {
                let mut rb = ReadBuf::new(buf);
                ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                (self.pos, self.filled, self.header, self.eof) = (0, n, 0, n == 0);
            }
            Framing::Encode { .. } => {
                let mut rb = ReadBuf::new(&mut buf[FRAME_HEADER_LEN..]);
                ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    buf[..FRAME_HEADER_LEN].copy_from_slice(&frame_header(n as u32));
                    (self.pos, self.filled, self.header) = (0, FRAME_HEADER_LEN + n, FRAME_HEADER_LEN);
                }
            }
            Framing::Decode { header, have, left } => {
                while *left == 0 {
                    let mut rb = ReadBuf::new(&mut header[*have..]);
                    ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(ended_inside_the_stream()));
                    }
                    *have += n;
                    if *have < FRAME_HEADER_LEN {
                        continue;
                    }
                    *have = 0;
                    match u32::from_be_bytes(*header) as usize {
                        0 => {
                            self.eof = true;
                            return Poll::Ready(Ok(()));
                        }
                        len => *left = len,
                    }
                }
                let want = (*left).min(buf.len());
                let mut rb = ReadBuf::new(&mut buf[..want]);
                ready!(Pin::new(&mut *reader).poll_read(cx, &mut rb))?;
                let n = rb.filled().len();
                if n == 0 {
                    return Poll::Ready(Err(ended_inside_the_stream()));
                }
                *left -= n;
                (self.pos, self.filled, self.header) = (0, n, 0);
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Copies until the reader would block, or to the end (EOF propagated as a
    /// shutdown of the writer, or as the empty chunk when encoding). Errors say whether
    /// reading (`true`) or writing failed.
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
                match self.poll_fill(cx, reader) {
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
                    Poll::Ready(Ok(())) => {}
                }
            }
            while self.pos < self.filled {
                let buf = self.buf.as_deref().expect("bytes are buffered only in a held buffer");
                let n = ready!(Pin::new(&mut *writer).poll_write(cx, &buf[self.pos..self.filled]))
                    .map_err(|e| (false, e))?;
                if n == 0 {
                    return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())));
                }
                let payload = (self.pos + n).max(self.header) - self.pos.max(self.header);
                self.pos += n;
                self.need_flush = true;
                counter.fetch_add(payload as u64, Ordering::Relaxed);
            }
            if self.eof {
                if let Framing::Encode { end_sent } = &mut self.framing {
                    let end = frame_header(0);
                    while *end_sent < end.len() {
                        let n =
                            ready!(Pin::new(&mut *writer).poll_write(cx, &end[*end_sent..])).map_err(|e| (false, e))?;
                        if n == 0 {
                            return Poll::Ready(Err((false, io::ErrorKind::WriteZero.into())));
                        }
                        *end_sent += n;
                    }
                    ready!(Pin::new(&mut *writer).poll_flush(cx)).map_err(|e| (false, e))?;
                } else {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx)).map_err(|e| (false, e))?;
                }
                self.done = true;
                self.release();
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// A framed stream's tunnel ended (a TLS close or a bare FIN) before the empty chunk
/// that ends the direction: the stream is truncated, so it is an abort.
fn ended_inside_the_stream() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the tunnel connection ended inside a framed stream, before its end")
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
        Bidirectional {
            tunnel,
            plain,
            up: Direction::new(Framing::Raw),
            down: Direction::new(Framing::Raw),
            transfer: t,
        }
        .await
    }

    fn future_size<F: FnOnce(A, B, C, D, E) -> R, A, B, C, D, E, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    fn future_size4<F: FnOnce(A, B, C, D) -> R, A, B, C, D, R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// A held stream keeps these futures for its life: `PreparedStream::run`, which
    /// keeps each data path's loop on the heap (the kernel-TLS one alone is about
    /// 3 KiB, and user-space streams carried it inline), and this path's loop, whose
    /// TLS connection stays boxed; a direction borrows its buffer only while bytes
    /// flow, so an idle stream costs little beyond them.
    #[test]
    fn a_running_stream_future_stays_small() {
        let prepared =
            future_size4::<_, crate::PreparedStream, TcpStream, &'static Transfer, &'static CancellationToken, _>(
                &crate::PreparedStream::run,
            );
        assert!(prepared <= 512, "PreparedStream::run's future is {prepared} bytes");
        let size = future_size::<
            _,
            Box<TlsStream<TunnelSocket>>,
            TcpStream,
            bool,
            &'static Transfer,
            &'static CancellationToken,
            _,
        >(&run);
        assert!(size <= 1024, "a running stream's future is {size} bytes");
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
        let mut d = Direction::new(Framing::Raw);
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
            up: Direction::new(Framing::Raw),
            down: Direction::new(Framing::Raw),
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

    /// One framed stream between a relay end and an agent end joined by a tunnel
    /// (`tunnel_a`, `tunnel_b`): client and service each send their bytes and
    /// half-close at once; returns what the service and the client received.
    async fn framed_stream(
        tunnel_a: &mut DuplexStream,
        tunnel_b: &mut DuplexStream,
        up: &[u8],
        down: &[u8],
        plain_capacity: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let (mut relay_plain, client) = duplex(plain_capacity);
        let (mut agent_plain, service) = duplex(plain_capacity);
        let (ta, tb) = (Transfer::default(), Transfer::default());
        let framed = || (Direction::new(Framing::Encode { end_sent: 0 }), Direction::new(Framing::decode()));
        let (a_up, a_down) = framed();
        let relay_end =
            Bidirectional { tunnel: tunnel_a, plain: &mut relay_plain, up: a_up, down: a_down, transfer: &ta };
        let (b_up, b_down) = framed();
        let agent_end =
            Bidirectional { tunnel: tunnel_b, plain: &mut agent_plain, up: b_up, down: b_down, transfer: &tb };
        let peer = |sock: DuplexStream, send: Vec<u8>| async move {
            let (mut r, mut w) = tokio::io::split(sock);
            let write = async {
                w.write_all(&send).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let read = async {
                let mut got = Vec::new();
                r.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(write, read).1
        };
        let (a, b, at_client, at_service) =
            tokio::join!(relay_end, agent_end, peer(client, up.to_vec()), peer(service, down.to_vec()));
        a.unwrap();
        b.unwrap();
        assert_eq!(ta.get(), (up.len() as u64, down.len() as u64), "relay end's payload counts");
        assert_eq!(tb.get(), (down.len() as u64, up.len() as u64), "agent end's payload counts");
        (at_service, at_client)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// Whatever the sizes and however small the pipes (so reads and writes split
        /// headers and chunks anywhere), framed streams in a row on one tunnel deliver
        /// every byte once and in order both ways, end cleanly, and leave the tunnel
        /// exactly at the next frame: the decoder never reads past an end marker.
        #[test]
        fn framed_streams_in_a_row_deliver_every_byte_and_stop_at_their_end(
            sizes in proptest::collection::vec((0usize..150_000, 0usize..150_000), 1..4),
            tunnel_capacity in 1usize..5000,
            plain_capacity in 1usize..5000,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut tunnel_a, mut tunnel_b) = duplex(tunnel_capacity);
                for (i, &(up_len, down_len)) in sizes.iter().enumerate() {
                    let (up, down) = (pattern(up_len, i as u8), pattern(down_len, 100 + i as u8));
                    let (at_service, at_client) =
                        framed_stream(&mut tunnel_a, &mut tunnel_b, &up, &down, plain_capacity).await;
                    assert!(at_service == up, "stream {i}: {} of {up_len} bytes reached the service", at_service.len());
                    assert!(at_client == down, "stream {i}: {} of {down_len} bytes reached the client", at_client.len());
                }
                // The next control frame on the same tunnel arrives intact, both ways.
                let open = sluice_proto::wire::StreamOpen { stream_id: 9, client_addr: "c".into(), framed: true };
                let (sent, got) = tokio::join!(
                    sluice_proto::wire::write_frame(&mut tunnel_a, &open),
                    sluice_proto::wire::read_frame::<_, sluice_proto::wire::StreamOpen>(&mut tunnel_b),
                );
                sent.unwrap();
                assert_eq!(got.unwrap(), open);
            });
        }
    }

    /// A framed direction whose tunnel ends before the empty chunk (inside a header or
    /// a chunk) is truncated: an error of the tunnel side, never a clean end.
    #[tokio::test]
    async fn a_framed_stream_cut_before_its_end_marker_is_an_error() {
        for wire in [vec![0u8, 0], [&frame_header(10)[..], &[1u8; 5][..]].concat(), frame_header(3).to_vec()] {
            let (mut tunnel, mut agent_end) = duplex(4096);
            let (mut plain, _client) = duplex(4096);
            agent_end.write_all(&wire).await.unwrap();
            drop(agent_end);
            let mut down = Direction::new(Framing::decode());
            let counter = AtomicU64::new(0);
            let r = std::future::poll_fn(|cx| down.poll_copy(cx, &mut tunnel, &mut plain, &counter)).await;
            let (reading, e) = r.expect_err("a cut framed stream must fail");
            assert!(reading, "the tunnel side (the reader) failed");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{wire:?}");
        }
    }
}

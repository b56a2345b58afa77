//! The TCP socket under a tunnel's TLS session, reading one TLS record at a time until
//! the stream's path is chosen.
//!
//! Handing a connection to kernel TLS needs rustls to hold no bytes it has read from the
//! socket but not yet decrypted: the kernel takes over at the socket's current position
//! in the record stream, with the record sequence numbers rustls reports. A plain
//! `TcpStream` lets rustls read as far ahead as the socket buffer allows (the peer may
//! already be sending payload right after the last control frame), so the tunnel socket
//! never returns bytes past the end of the TLS record being read. Once a stream stays on
//! the user-space path, [`TunnelSocket::unbound`] switches to plain reads again, so bulk
//! transfers do not pay two reads per record.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// TLS record header: content type (1), legacy version (2), length (2).
const HEADER_LEN: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadState {
    /// Reading a record header; `have` of its 5 bytes are in `header`.
    Header { header: [u8; HEADER_LEN], have: usize },
    /// Reading a record body; `left` bytes of it remain.
    Body { left: usize },
    /// Plain reads: no record tracking.
    Unbound,
}

/// A tunnel's TCP socket. Reads stop at TLS record boundaries until [`unbound`](Self::unbound).
#[derive(Debug)]
pub struct TunnelSocket {
    tcp: TcpStream,
    state: ReadState,
}

impl TunnelSocket {
    /// Wraps a freshly connected socket (before the TLS handshake).
    pub fn new(tcp: TcpStream) -> Self {
        TunnelSocket { tcp, state: ReadState::Header { header: [0; HEADER_LEN], have: 0 } }
    }

    /// The socket.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Unwraps the socket.
    pub fn into_tcp(self) -> TcpStream {
        self.tcp
    }

    /// True when every byte read so far belongs to a complete TLS record: what rustls
    /// holds can then be handed over without losing any ciphertext.
    pub fn at_record_boundary(&self) -> bool {
        matches!(self.state, ReadState::Header { have: 0, .. })
    }

    /// Stops tracking records: reads return whatever the socket has.
    pub fn unbound(&mut self) {
        self.state = ReadState::Unbound;
    }
}

impl AsFd for TunnelSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp.as_fd()
    }
}

impl AsRawFd for TunnelSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp.as_raw_fd()
    }
}

impl AsyncRead for TunnelSocket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let limit = match this.state {
            ReadState::Unbound => return Pin::new(&mut this.tcp).poll_read(cx, buf),
            ReadState::Header { have, .. } => HEADER_LEN - have,
            ReadState::Body { left } => left,
        };
        let want = limit.min(buf.remaining());
        if want == 0 {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        {
            let mut part = buf.take(want);
            ready!(Pin::new(&mut this.tcp).poll_read(cx, &mut part))?;
            let n = part.filled().len();
            // SAFETY: `part` initialized the first `n` bytes of `buf`'s unfilled region.
            unsafe { buf.assume_init(n) };
            buf.advance(n);
        }
        let got = &buf.filled()[start..];
        if got.is_empty() {
            // EOF: let rustls report a truncated record, if any.
            return Poll::Ready(Ok(()));
        }
        this.state = advance(this.state, got);
        Poll::Ready(Ok(()))
    }
}

/// The read state after `got` more bytes (never more than the current part).
fn advance(state: ReadState, got: &[u8]) -> ReadState {
    match state {
        ReadState::Header { mut header, have } => {
            header[have..have + got.len()].copy_from_slice(got);
            let have = have + got.len();
            if have < HEADER_LEN {
                return ReadState::Header { header, have };
            }
            match u16::from_be_bytes([header[3], header[4]]) as usize {
                0 => ReadState::Header { header: [0; HEADER_LEN], have: 0 },
                len => ReadState::Body { left: len },
            }
        }
        ReadState::Body { left } if left == got.len() => ReadState::Header { header: [0; HEADER_LEN], have: 0 },
        ReadState::Body { left } => ReadState::Body { left: left - got.len() },
        ReadState::Unbound => ReadState::Unbound,
    }
}

impl AsyncWrite for TunnelSocket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    fn record(body_len: usize, fill: u8) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&(body_len as u16).to_be_bytes());
        r.extend(std::iter::repeat_n(fill, body_len));
        r
    }

    async fn pair() -> (TunnelSocket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (TunnelSocket::new(c), s)
    }

    #[tokio::test]
    async fn never_reads_past_the_record_being_read() {
        let (mut sock, mut peer) = pair().await;
        // Two records arrive together; a large read must stop at the first one's end.
        let mut wire = record(300, 1);
        wire.extend(record(40, 2));
        peer.write_all(&wire).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while got.len() < 305 {
            let n = sock.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            assert!(got.len() <= 305, "read past the first record: {} bytes", got.len());
        }
        assert!(sock.at_record_boundary());
        // The second record is still in the kernel's buffer, in full.
        let mut rest = vec![0u8; 45];
        sock.into_tcp().read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, record(40, 2));
    }

    #[tokio::test]
    async fn unbound_reads_everything_available() {
        let (mut sock, mut peer) = pair().await;
        sock.unbound();
        let mut wire = record(100, 1);
        wire.extend(record(100, 2));
        peer.write_all(&wire).await.unwrap();
        peer.shutdown().await.unwrap();
        let mut all = Vec::new();
        sock.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, wire);
    }

    #[test]
    fn state_tracks_split_headers_and_bodies() {
        // Property: any split of a record stream into reads ends exactly on boundaries.
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let lens: Vec<usize> = (0..rng.random_range(1..6)).map(|_| rng.random_range(0..2000)).collect();
            let mut wire = Vec::new();
            let mut ends = Vec::new();
            for l in &lens {
                wire.extend(record(*l, 9));
                ends.push(wire.len());
            }
            let mut state = ReadState::Header { header: [0; HEADER_LEN], have: 0 };
            let mut pos = 0;
            while pos < wire.len() {
                let limit = match state {
                    ReadState::Header { have, .. } => HEADER_LEN - have,
                    ReadState::Body { left } => left,
                    ReadState::Unbound => unreachable!(),
                };
                let n = rng.random_range(1..=limit);
                state = advance(state, &wire[pos..pos + n]);
                pos += n;
                let boundary = matches!(state, ReadState::Header { have: 0, .. });
                assert_eq!(boundary, ends.contains(&pos), "at {pos} of {lens:?}");
            }
        }
    }
}

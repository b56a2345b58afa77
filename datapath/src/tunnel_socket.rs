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
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::ktls::key_update::TrafficSecrets;

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
    /// The connection's traffic secrets, caught during its handshake, for following key
    /// updates after a kernel-TLS offload (data connections only).
    secrets: Option<Arc<TrafficSecrets>>,
}

impl TunnelSocket {
    /// Wraps a freshly connected socket (before the TLS handshake).
    pub fn new(tcp: TcpStream) -> Self {
        TunnelSocket { tcp, state: ReadState::Header { header: [0; HEADER_LEN], have: 0 }, secrets: None }
    }

    /// Wraps a socket whose handshake will record its traffic secrets into `secrets` (the
    /// `key_log` of this connection's TLS configuration): a kernel-TLS stream on it can
    /// then follow the peer's key updates ([`crate::ktls::key_update`]).
    pub fn with_traffic_secrets(tcp: TcpStream, secrets: Arc<TrafficSecrets>) -> Self {
        TunnelSocket { secrets: Some(secrets), ..TunnelSocket::new(tcp) }
    }

    /// The secrets recorded by the handshake, if this connection records them.
    pub fn traffic_secrets(&self) -> Option<&TrafficSecrets> {
        self.secrets.as_deref()
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
    use crate::testing::{tcp_pair, tls_record as record};
    use proptest::prelude::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TunnelSocket, TcpStream) {
        let (c, s) = tcp_pair().await;
        (TunnelSocket::new(c), s)
    }

    /// A stream of records with the given body lengths, and the offset where each ends.
    fn records(lens: &[usize]) -> (Vec<u8>, Vec<usize>) {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for (i, l) in lens.iter().enumerate() {
            wire.extend(record(*l, i as u8));
            ends.push(wire.len());
        }
        (wire, ends)
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

    /// What [`chunked_reads`] saw: every byte in order, and where reads ended.
    struct Reads {
        got: Vec<u8>,
        /// `(offset after the read, at_record_boundary() then, still bound)` per read.
        marks: Vec<(usize, bool, bool)>,
    }

    /// Sends `wire` in `write_chunks`-sized writes (cycled; the writer yields between
    /// them so the reader sees them apart or coalesced), then FIN; reads with
    /// `read_sizes`-sized buffers (cycled) until EOF, calling `unbound` before read
    /// number `unbind_at`.
    fn chunked_reads(wire: &[u8], write_chunks: &[usize], read_sizes: &[usize], unbind_at: Option<usize>) -> Reads {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (mut sock, mut peer) = pair().await;
            peer.set_nodelay(true).unwrap();
            let to_send = wire.to_vec();
            let chunks = write_chunks.to_vec();
            let writer = tokio::spawn(async move {
                let mut rest = &to_send[..];
                for &n in chunks.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let n = n.min(rest.len());
                    peer.write_all(&rest[..n]).await.unwrap();
                    rest = &rest[n..];
                    tokio::task::yield_now().await;
                }
                peer.shutdown().await.unwrap();
                peer
            });
            let mut reads = Reads { got: Vec::new(), marks: Vec::new() };
            let mut bound = true;
            for (i, &size) in read_sizes.iter().cycle().enumerate() {
                if Some(i) == unbind_at {
                    sock.unbound();
                    bound = false;
                }
                let mut buf = vec![0u8; size];
                let n = sock.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                reads.got.extend_from_slice(&buf[..n]);
                reads.marks.push((reads.got.len(), sock.at_record_boundary(), bound));
            }
            let _peer = writer.await.unwrap();
            reads
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the chunking of the TLS byte stream on the wire and of the reads,
        /// a bound socket never returns bytes past the end of the record a read starts
        /// in, reports a record boundary exactly at record ends, and every byte arrives
        /// exactly once, in order — also after `unbound` at any point.
        #[test]
        fn arbitrary_chunking_stops_at_record_ends_and_delivers_every_byte_once(
            lens in prop::collection::vec(0usize..3000, 1..8),
            write_chunks in prop::collection::vec(1usize..4000, 1..16),
            read_sizes in prop::collection::vec(1usize..5000, 1..16),
            unbind_at in prop::option::weighted(0.3, 0usize..12),
        ) {
            let (wire, ends) = records(&lens);
            let reads = chunked_reads(&wire, &write_chunks, &read_sizes, unbind_at);
            prop_assert_eq!(&reads.got, &wire, "bytes lost, repeated or reordered");
            let mut start = 0;
            for &(end, boundary, bound) in &reads.marks {
                if bound {
                    let record_end = *ends.iter().find(|&&e| e > start).unwrap();
                    prop_assert!(end <= record_end, "a read from {} ran to {}, past the record end {}", start, end, record_end);
                    prop_assert_eq!(boundary, ends.contains(&end), "boundary flag wrong at {}", end);
                }
                start = end;
            }
        }

        /// The read state alone: any split of a record stream into reads no longer than
        /// the state allows ends exactly on record boundaries.
        #[test]
        fn state_tracks_split_headers_and_bodies(
            lens in prop::collection::vec(0usize..2000, 1..6),
            cuts in prop::collection::vec(1usize..2100, 1..64),
        ) {
            let (wire, ends) = records(&lens);
            let mut state = ReadState::Header { header: [0; HEADER_LEN], have: 0 };
            let mut pos = 0;
            for &cut in cuts.iter().cycle() {
                if pos == wire.len() {
                    break;
                }
                let limit = match state {
                    ReadState::Header { have, .. } => HEADER_LEN - have,
                    ReadState::Body { left } => left,
                    ReadState::Unbound => unreachable!(),
                };
                let n = cut.min(limit);
                state = advance(state, &wire[pos..pos + n]);
                pos += n;
                let boundary = matches!(state, ReadState::Header { have: 0, .. });
                prop_assert_eq!(boundary, ends.contains(&pos), "at {} of {:?}", pos, lens);
            }
        }
    }
}

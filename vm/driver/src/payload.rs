//! Deterministic pseudo-random byte streams and their SHA-256, written and read in fixed
//! chunks: a transfer of any size holds one 64 KiB buffer, never the payload.
//!
//! Each side hashes what it sends while sending and what it receives while receiving,
//! so an intact transfer is "the receiver's digest equals the sender's" without a second
//! pass over the data.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Bytes per `read`/`write` call; a multiple of 8 so the generator's output does not
/// depend on where chunks are cut.
pub const CHUNK: usize = 64 * 1024;

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// A fast deterministic byte stream (xorshift64*), different for every seed.
pub struct Payload {
    state: u64,
}

impl Payload {
    pub fn new(seed: u64) -> Self {
        Payload { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for out in buf.chunks_mut(8) {
            let mut x = self.state;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.state = x;
            let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            out.copy_from_slice(&v[..out.len()]);
        }
    }
}

/// Writes `len` bytes of `Payload::new(seed)`, counting them in `progress`; returns their
/// SHA-256. Does not shut the writer down: the caller decides how the stream ends.
pub fn send(w: &mut impl Write, len: u64, seed: u64, progress: &AtomicU64) -> io::Result<[u8; 32]> {
    let mut p = Payload::new(seed);
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        p.fill(&mut buf[..n]);
        hash.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        progress.fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    Ok(hash.finalize().into())
}

/// How a read loop ended.
#[derive(Debug)]
pub enum End {
    /// `read` returned 0: the peer half-closed (FIN).
    Eof,
    /// `read` failed, e.g. with ECONNRESET.
    Error(io::Error),
    /// Nothing arrived within the socket's read timeout.
    Stalled,
}

impl End {
    /// `eof`, `stalled`, or the error's kind and text.
    pub fn describe(&self) -> String {
        match self {
            End::Eof => "clean EOF".into(),
            End::Error(e) => format!("error {:?} ({e})", e.kind()),
            End::Stalled => "stalled (read timeout)".into(),
        }
    }
}

/// What a read loop got.
#[derive(Debug)]
pub struct Received {
    pub bytes: u64,
    pub digest: [u8; 32],
    pub end: End,
}

/// Reads until EOF, an error or a read timeout, hashing everything; counts bytes in
/// `progress`.
pub fn receive(r: &mut impl Read, progress: &AtomicU64) -> Received {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0u64;
    let end = loop {
        match r.read(&mut buf) {
            Ok(0) => break End::Eof,
            Ok(n) => {
                hash.update(&buf[..n]);
                bytes += n as u64;
                progress.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break End::Stalled,
            Err(e) => break End::Error(e),
        }
    };
    Received { bytes, digest: hash.finalize().into(), end }
}

/// The first 8 hex digits of a digest, for log lines.
pub fn short(d: &[u8; 32]) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_does_not_depend_on_chunking() {
        let mut a = vec![0u8; 1000];
        Payload::new(7).fill(&mut a);
        let mut b = vec![0u8; 1000];
        let mut p = Payload::new(7);
        p.fill(&mut b[..512]);
        p.fill(&mut b[512..]);
        assert_eq!(a, b);
        let mut c = vec![0u8; 1000];
        Payload::new(8).fill(&mut c);
        assert_ne!(a, c);
    }

    #[test]
    fn send_and_receive_agree() {
        let mut wire = Vec::new();
        let progress = AtomicU64::new(0);
        let sent = send(&mut wire, 3 * CHUNK as u64 + 5, 42, &progress).unwrap();
        assert_eq!(progress.load(Ordering::Relaxed), wire.len() as u64);
        let got = receive(&mut wire.as_slice(), &AtomicU64::new(0));
        assert_eq!(got.bytes, 3 * CHUNK as u64 + 5);
        assert_eq!(got.digest, sent);
        assert!(matches!(got.end, End::Eof));
    }
}

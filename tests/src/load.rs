//! Traffic for tests and benchmarks: deterministic pseudo-random payloads, SHA-256 of
//! everything sent and received, and small backends (echo, sink+source).

use std::net::SocketAddr;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// A fast deterministic byte stream (xorshift64*), different for every seed, so a
/// reordered or duplicated chunk changes the digest.
pub struct Payload {
    state: u64,
}

impl Payload {
    pub fn new(seed: u64) -> Self {
        Payload { state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 }
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Calls `f` with consecutive chunks of `len` bytes of `Payload::new(seed)`.
fn chunks(len: u64, seed: u64, mut f: impl FnMut(&[u8])) {
    let mut p = Payload::new(seed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        f(&buf[..n]);
        left -= n as u64;
    }
}

/// Writes `len` bytes of `Payload::new(seed)` and half-closes; returns their SHA-256.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, len: u64, seed: u64) -> std::io::Result<[u8; 32]> {
    let mut p = Payload::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
    w.shutdown().await?;
    Ok(h.finalize().into())
}

/// Reads to EOF; returns the byte count and SHA-256.
pub async fn receive<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u64, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, h.finalize().into()));
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
}

/// SHA-256 of `len` bytes of `Payload::new(seed)`, without sending them.
pub fn expected_digest(len: u64, seed: u64) -> [u8; 32] {
    let mut h = Sha256::new();
    chunks(len, seed, |c| h.update(c));
    h.finalize().into()
}

/// An echo service on loopback: every connection gets its bytes back, then a FIN after
/// the client's FIN.
pub async fn echo_server() -> SocketAddr {
    echo_server_at("127.0.0.1".parse().unwrap()).await
}

/// [`echo_server`] listening on `ip`.
pub async fn echo_server_at(ip: std::net::IpAddr) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// What a sink+source backend connection saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SinkReport {
    pub received: u64,
    pub received_digest: [u8; 32],
    pub sent_digest: [u8; 32],
}

/// A backend that, per connection, sends `reply_len` bytes of `Payload::new(seed)` while
/// hashing everything it receives; reports each connection on the returned channel.
pub async fn sink_source_server(
    reply_len: u64,
    seed: u64,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SinkReport>) {
    sink_source_server_at("127.0.0.1".parse().unwrap(), reply_len, seed).await
}

/// [`sink_source_server`] listening on `ip` (e.g. the host's end of a test namespace).
pub async fn sink_source_server_at(
    ip: std::net::IpAddr,
    reply_len: u64,
    seed: u64,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<SinkReport>) {
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let (recv, sent) = tokio::join!(receive(&mut r), send(&mut w, reply_len, seed));
                if let (Ok((received, received_digest)), Ok(sent_digest)) = (recv, sent) {
                    let _ = tx.send(SinkReport { received, received_digest, sent_digest });
                }
            });
        }
    });
    (addr, rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_deterministic_and_seed_dependent() {
        let (mut a, mut b, mut c) = (Payload::new(1), Payload::new(1), Payload::new(2));
        let (mut x, mut y, mut z) = ([0u8; 100], [0u8; 100], [0u8; 100]);
        a.fill(&mut x);
        b.fill(&mut y);
        c.fill(&mut z);
        assert_eq!(x, y);
        assert_ne!(x, z);
    }
}

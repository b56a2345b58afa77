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
    let digest = write_payload(w, len, seed, 256 * 1024).await?;
    w.shutdown().await?;
    Ok(digest)
}

/// Writes `len` bytes of `Payload::new(seed)` in chunks of at most `chunk` bytes (small
/// chunks keep thousands of concurrent streams cheap); returns their SHA-256.
async fn write_payload<W: AsyncWrite + Unpin>(
    w: &mut W,
    len: u64,
    seed: u64,
    chunk: usize,
) -> std::io::Result<[u8; 32]> {
    let mut p = Payload::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (chunk as u64).min(len.max(1)) as usize];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n]).await?;
        left -= n as u64;
    }
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

// === exchange: mixed-size streams checked in both directions ===

/// Chunk size for [`exchange`] and [`exchange_server`]: 2,000 streams × 4 buffers stay
/// near 128 MiB in the test process.
const EXCHANGE_CHUNK: usize = 16 * 1024;

/// Bytes of the header a client sends first: the reply's length and seed (u64, LE).
const EXCHANGE_HEADER: usize = 16;

/// Bytes of the trailer the server sends after its reply: the count of bytes it received
/// after the header (u64, LE), their SHA-256, and the SHA-256 of the reply it sent.
const EXCHANGE_TRAILER: usize = 8 + 32 + 32;

/// One stream's traffic: `up` bytes client → service, `down` bytes service → client,
/// each from its own seed.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    pub up: u64,
    pub up_seed: u64,
    pub down: u64,
    pub down_seed: u64,
}

/// How an [`exchange`] ended badly: `Failed` is visible (an error, a reset, a short
/// stream); `Corrupted` means bytes arrived complete but differ from what was sent.
#[derive(Debug, Clone, PartialEq)]
pub enum ExchangeError {
    Failed(String),
    Corrupted(String),
}

/// What a good [`exchange`] measured.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeTiming {
    /// From `connect` to the first reply byte: relay accept, a data connection, the
    /// stream's open at the agent and the service's connect.
    pub first_byte: std::time::Duration,
    pub total: std::time::Duration,
}

/// Runs one [`Exchange`] against an [`exchange_server`] at `addr` (through a tunnel or
/// not). `ready` runs once the first reply byte arrived (at once for an empty reply) and
/// before the upload starts, so a caller can hold many streams open at once. Checks both directions: the server's
/// digest of the upload against the client's, the client's digest of the reply against
/// the server's, and both byte counts.
pub async fn exchange<F: std::future::Future<Output = ()>>(
    addr: &str,
    ex: Exchange,
    ready: impl FnOnce() -> F,
) -> Result<ExchangeTiming, ExchangeError> {
    use std::time::Instant;
    let fail = |what: &str, e: std::io::Error| ExchangeError::Failed(format!("{what}: {e}"));
    let start = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.map_err(|e| fail("connect", e))?;
    let mut header = [0u8; EXCHANGE_HEADER];
    header[..8].copy_from_slice(&ex.down.to_le_bytes());
    header[8..].copy_from_slice(&ex.down_seed.to_le_bytes());
    s.write_all(&header).await.map_err(|e| fail("header", e))?;
    let (mut r, mut w) = s.split();
    let mut reply = ReplyReader::new(ex.down);
    let mut buf = vec![0u8; EXCHANGE_CHUNK];
    // An empty reply's first byte is the trailer, which the server sends only after the
    // upload: then there is nothing to wait for before uploading.
    if ex.down > 0 {
        let n = r.read(&mut buf).await.map_err(|e| fail("first reply byte", e))?;
        if n == 0 {
            return Err(ExchangeError::Failed("the stream ended before any reply byte".into()));
        }
        reply.take(&buf[..n])?;
    }
    let first_byte = start.elapsed();
    ready().await;
    let upload = async {
        let digest = write_payload(&mut w, ex.up, ex.up_seed, EXCHANGE_CHUNK).await.map_err(|e| fail("upload", e))?;
        w.shutdown().await.map_err(|e| fail("half-close", e))?;
        Ok::<_, ExchangeError>(digest)
    };
    let download = async {
        loop {
            let n = r.read(&mut buf).await.map_err(|e| fail("reply", e))?;
            if n == 0 {
                return Ok::<_, ExchangeError>(());
            }
            reply.take(&buf[..n])?;
        }
    };
    let (sent, ()) = tokio::try_join!(upload, download)?;
    let (received, server) = reply.finish()?;
    if server.received != ex.up || server.received_digest != sent {
        return Err(ExchangeError::Corrupted(format!(
            "upload: sent {} bytes, the service received {} with another SHA-256",
            ex.up, server.received
        )));
    }
    if received != server.sent_digest {
        return Err(ExchangeError::Corrupted(format!("reply of {} bytes: SHA-256 differs at the two ends", ex.down)));
    }
    Ok(ExchangeTiming { first_byte, total: start.elapsed() })
}

/// The client's side of a reply: hashes the first `len` bytes, keeps the trailer.
struct ReplyReader {
    len: u64,
    seen: u64,
    hash: Sha256,
    trailer: Vec<u8>,
}

impl ReplyReader {
    fn new(len: u64) -> Self {
        ReplyReader { len, seen: 0, hash: Sha256::new(), trailer: Vec::with_capacity(EXCHANGE_TRAILER) }
    }

    fn take(&mut self, mut bytes: &[u8]) -> Result<(), ExchangeError> {
        if self.seen < self.len {
            let n = (self.len - self.seen).min(bytes.len() as u64) as usize;
            self.hash.update(&bytes[..n]);
            self.seen += n as u64;
            bytes = &bytes[n..];
        }
        if self.trailer.len() + bytes.len() > EXCHANGE_TRAILER {
            return Err(ExchangeError::Corrupted(format!("more than {} reply bytes", self.len)));
        }
        self.trailer.extend_from_slice(bytes);
        Ok(())
    }

    /// The reply's digest and the server's report, once the stream ended.
    fn finish(self) -> Result<([u8; 32], SinkReport), ExchangeError> {
        if self.trailer.len() != EXCHANGE_TRAILER {
            return Err(ExchangeError::Failed(format!(
                "the stream ended after {} of {} reply bytes (+{} of {} trailer bytes)",
                self.seen,
                self.len,
                self.trailer.len(),
                EXCHANGE_TRAILER
            )));
        }
        let t = &self.trailer;
        let report = SinkReport {
            received: u64::from_le_bytes(t[..8].try_into().unwrap()),
            received_digest: t[8..40].try_into().unwrap(),
            sent_digest: t[40..72].try_into().unwrap(),
        };
        Ok((self.hash.finalize().into(), report))
    }
}

/// The service side of [`exchange`]: per connection, reads the header, sends the reply
/// it names while hashing everything the client sends, then the trailer and a FIN.
pub async fn exchange_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                // EMFILE and the like: wait instead of spinning; the client sees the delay.
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let mut header = [0u8; EXCHANGE_HEADER];
                if r.read_exact(&mut header).await.is_err() {
                    return;
                }
                let len = u64::from_le_bytes(header[..8].try_into().unwrap());
                let seed = u64::from_le_bytes(header[8..].try_into().unwrap());
                let receive = async {
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; EXCHANGE_CHUNK];
                    let mut total = 0u64;
                    loop {
                        let n = r.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>((total, <[u8; 32]>::from(h.finalize())));
                        }
                        h.update(&buf[..n]);
                        total += n as u64;
                    }
                };
                let reply = write_payload(&mut w, len, seed, EXCHANGE_CHUNK);
                let Ok(((received, received_digest), sent_digest)) = tokio::try_join!(receive, reply) else {
                    return;
                };
                let mut trailer = Vec::with_capacity(EXCHANGE_TRAILER);
                trailer.extend_from_slice(&received.to_le_bytes());
                trailer.extend_from_slice(&received_digest);
                trailer.extend_from_slice(&sent_digest);
                if w.write_all(&trailer).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
    addr
}

// === process figures ===

/// Open file descriptors of process `pid` (0 when it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of process `pid`, KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft descriptor limit to its hard limit (the Rust runtime does
/// not); returns the new soft limit. Thousands of streams need thousands of sockets.
pub fn raise_own_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct we own; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

/// The `p`-th percentile (0–100) of `sorted` (nearest rank).
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
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

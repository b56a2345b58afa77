//! The private service behind the agent: a loopback TCP server whose behaviour per
//! connection is chosen by the client, in a fixed header that is the first thing it
//! sends through the tunnel.
//!
//! Header (40 bytes): `SLVM`, mode (1 byte), 3 zero bytes, then little-endian `u64`s:
//! test id, `up` (bytes the client sends or the backend reads), `down` (bytes the
//! backend sends), seed. Modes:
//!
//! - [`Mode::Bulk`]: read everything until EOF while sending `down` bytes, then half-close.
//! - [`Mode::HalfClose`]: read the request until EOF, *then* send the `down`-byte reply and
//!   half-close.
//! - [`Mode::BackendAbort`]: read `up` bytes, send `down` bytes, then reset the connection
//!   (`SO_LINGER` 0 + close).
//! - [`Mode::ClientAbort`]: send one byte `R` (ready), then read until the stream ends;
//!   the client resets its side.
//!
//! Every connection ends with a [`Report`] sent to the test, found by its id.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::payload::{self, Received};

/// Length of the header a client sends first.
pub const HEADER_LEN: usize = 40;

/// Seed offset of the backend → client stream, so the two directions differ.
pub const DOWN_SEED: u64 = 0xD0D0_D0D0;

/// How long a socket may see no progress before a read or write gives up.
pub const STALL: Duration = Duration::from_secs(90);

/// What the backend does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Bulk = 1,
    HalfClose = 2,
    BackendAbort = 3,
    ClientAbort = 4,
}

/// The header a client sends first.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub id: u64,
    pub mode: Mode,
    pub up: u64,
    pub down: u64,
    pub seed: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..4].copy_from_slice(b"SLVM");
        h[4] = self.mode as u8;
        for (i, v) in [self.id, self.up, self.down, self.seed].into_iter().enumerate() {
            h[8 + 8 * i..16 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h
    }

    pub fn decode(h: &[u8; HEADER_LEN]) -> Result<Header> {
        if &h[..4] != b"SLVM" {
            bail!("bad magic {:?}", &h[..4]);
        }
        let mode = match h[4] {
            1 => Mode::Bulk,
            2 => Mode::HalfClose,
            3 => Mode::BackendAbort,
            4 => Mode::ClientAbort,
            m => bail!("unknown mode {m}"),
        };
        let u = |i: usize| u64::from_le_bytes(h[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
        Ok(Header { id: u(0), mode, up: u(1), down: u(2), seed: u(3) })
    }
}

/// What the backend saw on one connection.
#[derive(Debug)]
pub struct Report {
    pub id: u64,
    /// What it read after the header (for [`Mode::BackendAbort`]: only the `up` bytes).
    pub received: Received,
    /// Bytes it sent and their SHA-256, when it sent without error.
    pub sent: Option<(u64, [u8; 32])>,
    /// Why sending failed, if it did.
    pub send_error: Option<String>,
}

/// The running backend.
pub struct Backend {
    reports: Receiver<Report>,
    /// Reports that arrived while waiting for another id.
    early: HashMap<u64, Report>,
}

impl Backend {
    /// Listens on `127.0.0.1:port` and serves every connection on its own thread.
    pub fn start(port: u16) -> Result<Backend> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("backend: cannot listen on 127.0.0.1:{port}"))?;
        let (tx, reports) = mpsc::channel();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                match s {
                    Ok(s) => {
                        let tx = tx.clone();
                        std::thread::spawn(move || serve(s, tx));
                    }
                    Err(e) => eprintln!("backend: accept failed: {e}"),
                }
            }
        });
        Ok(Backend { reports, early: HashMap::new() })
    }

    /// Waits up to `timeout` for the report of connection `id`.
    pub fn report(&mut self, id: u64, timeout: Duration) -> Result<Report> {
        if let Some(r) = self.early.remove(&id) {
            return Ok(r);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.reports.recv_timeout(left) {
                Ok(r) if r.id == id => return Ok(r),
                Ok(r) => {
                    self.early.insert(r.id, r);
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!(
                        "the backend reported nothing on connection {id} within {} s (the stream never reached \
                         it, or it is still open)",
                        timeout.as_secs()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => bail!("the backend's accept loop ended"),
            }
        }
    }
}

/// Sets `SO_LINGER` to 0 and closes: the kernel answers with RST instead of FIN.
pub fn reset(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

fn serve(mut s: TcpStream, tx: Sender<Report>) {
    let _ = s.set_read_timeout(Some(STALL));
    let _ = s.set_write_timeout(Some(STALL));
    let mut h = [0u8; HEADER_LEN];
    let header = match s.read_exact(&mut h).map_err(anyhow::Error::from).and_then(|()| Header::decode(&h)) {
        Ok(h) => h,
        Err(e) => return eprintln!("backend: connection without a valid header: {e:#}"),
    };
    let progress = AtomicU64::new(0);
    let down_seed = header.seed ^ DOWN_SEED;
    let report = match header.mode {
        Mode::Bulk => {
            let mut w = match s.try_clone() {
                Ok(w) => w,
                Err(e) => return eprintln!("backend: cannot clone the socket: {e}"),
            };
            let sender = std::thread::spawn(move || {
                let r = payload::send(&mut w, header.down, down_seed, &AtomicU64::new(0));
                let _ = w.shutdown(Shutdown::Write);
                r
            });
            let received = payload::receive(&mut s, &progress);
            let sent = sender.join().unwrap_or_else(|_| Err(io::Error::other("sender thread panicked")));
            report(header, received, sent)
        }
        Mode::HalfClose => {
            let received = payload::receive(&mut s, &progress);
            let sent = if matches!(received.end, payload::End::Eof) {
                let r = payload::send(&mut s, header.down, down_seed, &AtomicU64::new(0));
                let _ = s.shutdown(Shutdown::Write);
                r
            } else {
                Err(io::Error::other(format!("request did not end cleanly: {}", received.end.describe())))
            };
            report(header, received, sent)
        }
        Mode::BackendAbort => {
            let received = payload::receive(&mut (&mut s).take(header.up), &progress);
            let sent = payload::send(&mut s, header.down, down_seed, &AtomicU64::new(0));
            reset(s);
            report(header, received, sent)
        }
        Mode::ClientAbort => {
            let ready = s.write_all(b"R");
            let received = payload::receive(&mut s, &progress);
            report(header, received, ready.map(|()| [0u8; 32]))
        }
    };
    let _ = tx.send(report);
}

fn report(h: Header, received: Received, sent: io::Result<[u8; 32]>) -> Report {
    let (sent, send_error) = match sent {
        Ok(d) => (Some((h.down, d)), None),
        Err(e) => (None, Some(format!("{:?} ({e})", e.kind()))),
    };
    Report { id: h.id, received, sent, send_error }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header { id: 3, mode: Mode::HalfClose, up: 1 << 40, down: 5, seed: u64::MAX };
        let d = Header::decode(&h.encode()).unwrap();
        assert_eq!((d.id, d.mode, d.up, d.down, d.seed), (3, Mode::HalfClose, 1 << 40, 5, u64::MAX));
        let mut bad = h.encode();
        bad[0] = b'X';
        assert!(Header::decode(&bad).is_err());
    }
}

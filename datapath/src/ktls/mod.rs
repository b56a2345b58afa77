//! Kernel TLS: handing a tunnel connection's keys to the kernel after the handshake,
//! and the engines that then move a stream's bytes without copying them through user
//! space.
//!
//! - [`KtlsSupport::probe`] asks the kernel once, at start, whether it has the TLS ULP
//!   and which TLS 1.3 ciphers it accepts (by installing throw-away keys on a loopback
//!   connection).
//! - [`offload`] takes one connection's rustls session at a record boundary (see
//!   [`super::TunnelSocket`]), drains plaintext rustls already decrypted, extracts the
//!   keys and sequence numbers and installs them with `setsockopt(SOL_TLS, TLS_TX/RX)`.
//!   If the kernel refuses before the keys left rustls, the stream stays on rustls.
//! - [`key_update`] follows the peer's TLS key updates after offload (Linux ≥ 6.14);
//! - [`records`] decides what non-data records mean; [`sys`] wraps the system calls;
//!   [`pump`] runs the readiness-driven engines (splice, and with `bench-engines`
//!   read/write copy) on tokio; `blocking` (`bench-engines` only) runs the
//!   thread-per-direction engines (plain splice, or io_uring splice).

#[cfg(feature = "bench-engines")]
pub(crate) mod blocking;
pub mod key_update;
pub(crate) mod pump;
pub mod records;
pub(crate) mod sys;

use std::io::{self, Read};
use std::os::fd::AsRawFd;

use rustls::{CipherSuite, ConnectionTrafficSecrets};
use tokio::net::TcpStream;
use tokio_rustls::TlsStream;

use super::TunnelSocket;
use key_update::KeySchedule;

/// The TLS 1.3 cipher suites the kernel may take over, in the relay's preference order.
pub const OFFLOADABLE: [CipherSuite; 3] = [
    CipherSuite::TLS13_AES_128_GCM_SHA256,
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
];

/// What the kernel supports, found once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KtlsSupport {
    /// Suites whose keys the kernel accepted in both directions.
    pub ciphers: Vec<CipherSuite>,
    /// Why kernel TLS cannot be used at all, if so.
    pub unavailable: Option<String>,
    /// The kernel takes a second key on a running connection (Linux ≥ 6.14), so streams
    /// follow the peer's TLS key updates ([`key_update`]).
    pub follows_key_updates: bool,
}

impl KtlsSupport {
    /// Asks the kernel: attaches the TLS ULP to a loopback connection per suite and
    /// installs zero keys for both directions. Takes about a millisecond; sends nothing.
    pub fn probe() -> KtlsSupport {
        match probe_ciphers() {
            Ok((ciphers, _)) if ciphers.is_empty() => KtlsSupport {
                ciphers,
                unavailable: Some("the kernel refused every TLS 1.3 cipher for offload".into()),
                follows_key_updates: false,
            },
            Ok((ciphers, follows_key_updates)) => KtlsSupport { ciphers, unavailable: None, follows_key_updates },
            Err(e) => KtlsSupport {
                ciphers: Vec::new(),
                unavailable: Some(explain_ulp_error(&e)),
                follows_key_updates: false,
            },
        }
    }

    /// Support that the tests can dictate.
    pub fn with(ciphers: Vec<CipherSuite>, unavailable: Option<String>) -> KtlsSupport {
        KtlsSupport { ciphers, unavailable, follows_key_updates: false }
    }

    /// True if streams negotiating `suite` can be offloaded.
    pub fn accepts(&self, suite: CipherSuite) -> bool {
        self.unavailable.is_none() && self.ciphers.contains(&suite)
    }
}

/// Turns an error from `setsockopt(TCP_ULP, "tls")` into what an operator can act on.
pub fn explain_ulp_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "the kernel has no TLS support (setsockopt TCP_ULP \"tls\": ENOENT); \
                               `modprobe tls` (CONFIG_TLS) enables the zero-copy path"
            .into(),
        Some(libc::EPERM) | Some(libc::EACCES) => {
            format!("kernel TLS is not permitted here ({e}): a seccomp or LSM policy refuses TCP_ULP")
        }
        _ => format!("kernel TLS is unavailable: {e}"),
    }
}

/// The suites the kernel takes in both directions, and whether it takes a second send
/// key on a running connection (what following key updates needs: Linux ≥ 6.14; older
/// kernels answer `EBUSY`).
fn probe_ciphers() -> io::Result<(Vec<CipherSuite>, bool)> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let mut ok = Vec::new();
    let mut rekey = false;
    for suite in OFFLOADABLE {
        let client = std::net::TcpStream::connect(addr)?;
        let (_server, _) = listener.accept()?;
        sys::attach_tls_ulp(client.as_raw_fd())?;
        let info = CryptoInfo::zeroed(suite).expect("every offloadable suite has a crypto_info");
        let fd = client.as_raw_fd();
        if sys::set_crypto(fd, libc::TLS_TX, &info).is_ok() && sys::set_crypto(fd, libc::TLS_RX, &info).is_ok() {
            rekey |= ok.is_empty() && sys::set_crypto(fd, libc::TLS_TX, &info).is_ok();
            ok.push(suite);
        }
    }
    Ok((ok, rekey))
}

/// The key material of one direction in the kernel's `tls12_crypto_info_*` layout.
pub enum CryptoInfo {
    Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128),
    Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256),
    Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305),
}

impl CryptoInfo {
    /// From rustls's extracted secrets and the record sequence number.
    pub fn from_rustls(seq: u64, secrets: &ConnectionTrafficSecrets) -> Option<CryptoInfo> {
        match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
                Self::new(CipherSuite::TLS13_AES_128_GCM_SHA256, key.as_ref(), iv.as_ref(), seq)
            }
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
                Self::new(CipherSuite::TLS13_AES_256_GCM_SHA384, key.as_ref(), iv.as_ref(), seq)
            }
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                Self::new(CipherSuite::TLS13_CHACHA20_POLY1305_SHA256, key.as_ref(), iv.as_ref(), seq)
            }
            _ => None,
        }
    }

    /// The kernel's layout for `suite`'s `key` and 12-byte `iv` at record number `seq`.
    /// For the AES-GCM suites the IV splits into the kernel's 4-byte salt and 8-byte IV.
    /// `None` for other suites or wrong key/IV sizes.
    pub fn new(suite: CipherSuite, key: &[u8], iv: &[u8], seq: u64) -> Option<CryptoInfo> {
        let rec_seq = seq.to_be_bytes();
        let info = |cipher_type| libc::tls_crypto_info { version: libc::TLS_1_3_VERSION, cipher_type };
        if iv.len() != 12 {
            return None;
        }
        Some(match suite {
            CipherSuite::TLS13_AES_128_GCM_SHA256 => CryptoInfo::Aes128Gcm(libc::tls12_crypto_info_aes_gcm_128 {
                info: info(libc::TLS_CIPHER_AES_GCM_128),
                iv: iv[4..].try_into().ok()?,
                key: key.try_into().ok()?,
                salt: iv[..4].try_into().ok()?,
                rec_seq,
            }),
            CipherSuite::TLS13_AES_256_GCM_SHA384 => CryptoInfo::Aes256Gcm(libc::tls12_crypto_info_aes_gcm_256 {
                info: info(libc::TLS_CIPHER_AES_GCM_256),
                iv: iv[4..].try_into().ok()?,
                key: key.try_into().ok()?,
                salt: iv[..4].try_into().ok()?,
                rec_seq,
            }),
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => {
                CryptoInfo::Chacha20Poly1305(libc::tls12_crypto_info_chacha20_poly1305 {
                    info: info(libc::TLS_CIPHER_CHACHA20_POLY1305),
                    iv: iv.try_into().ok()?,
                    key: key.try_into().ok()?,
                    salt: [],
                    rec_seq,
                })
            }
            _ => return None,
        })
    }

    /// All-zero keys for `suite` (the start-up probe).
    fn zeroed(suite: CipherSuite) -> Option<CryptoInfo> {
        let key_len = if suite == CipherSuite::TLS13_AES_128_GCM_SHA256 { 16 } else { 32 };
        Self::new(suite, &[0u8; 32][..key_len], &[0u8; 12], 0)
    }

    fn as_raw(&self) -> (*const libc::c_void, usize) {
        fn raw<T>(t: &T) -> (*const libc::c_void, usize) {
            ((t as *const T).cast(), std::mem::size_of::<T>())
        }
        match self {
            CryptoInfo::Aes128Gcm(i) => raw(i),
            CryptoInfo::Aes256Gcm(i) => raw(i),
            CryptoInfo::Chacha20Poly1305(i) => raw(i),
        }
    }
}

impl Drop for CryptoInfo {
    fn drop(&mut self) {
        // Key material should not linger in freed memory.
        let (ptr, len) = self.as_raw();
        // SAFETY: `ptr` points at `len` bytes owned by `self`, a plain-old-data struct.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) };
    }
}

/// A connection whose TLS now runs in the kernel.
#[derive(Debug)]
pub struct Offloaded {
    pub tcp: TcpStream,
    /// Plaintext rustls had already decrypted: delivered before anything from the kernel.
    pub pending: Vec<u8>,
    /// rustls had already seen the peer's close_notify.
    pub peer_closed: bool,
    /// The traffic secrets after the ones installed, or why this connection has none.
    pub key_schedule: Result<KeySchedule, String>,
    /// `Some(n)`: the send direction moves to its next key after about `n` records (the
    /// kernel and the peer both follow key updates); `None`: it keeps its key.
    pub send_records_per_key: Option<u64>,
}

/// The outcome of [`offload`].
#[derive(Debug)]
pub enum Offload {
    Kernel(Offloaded),
    /// The kernel (or this connection's state) does not allow offload; rustls keeps the
    /// connection, untouched.
    Userspace {
        tls: Box<TlsStream<TunnelSocket>>,
        reason: String,
    },
}

/// Hands `tls` to the kernel. Errors mean the keys already left rustls and the kernel
/// refused them: the connection is unusable.
pub fn offload(tls: TlsStream<TunnelSocket>, support: &KtlsSupport) -> io::Result<Offload> {
    let keep = |tls, reason: String| Ok(Offload::Userspace { tls: Box::new(tls), reason });
    let (sock, state) = tls.get_ref();
    let (suite, tls13) = match state.negotiated_cipher_suite() {
        Some(s) => (s.suite(), s.tls13()),
        None => return keep(tls, "no negotiated cipher suite".into()),
    };
    let is_client = matches!(tls, TlsStream::Client(_));
    if let Some(why) = &support.unavailable {
        return keep(tls, why.clone());
    }
    if !support.accepts(suite) {
        return keep(tls, format!("the kernel cannot offload {suite:?}"));
    }
    if state.wants_write() {
        return keep(tls, "TLS output still queued".into());
    }
    if !sock.at_record_boundary() {
        return keep(tls, "a TLS record is partly read".into());
    }
    if let Err(e) = sys::attach_tls_ulp(sock.as_raw_fd()) {
        return keep(tls, explain_ulp_error(&e));
    }
    let (sock, mut conn): (TunnelSocket, rustls::Connection) = match tls {
        TlsStream::Client(c) => {
            let (io, conn) = c.into_inner();
            (io, conn.into())
        }
        TlsStream::Server(s) => {
            let (io, conn) = s.into_inner();
            (io, conn.into())
        }
    };
    let (pending, peer_closed) = drain_plaintext(&mut conn)?;
    let secrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| io::Error::other(format!("cannot extract TLS secrets for kernel TLS: {e}")))?;
    let key_schedule = match (tls13, sock.traffic_secrets()) {
        (Some(tls13), Some(captured)) => KeySchedule::new(tls13, is_client, captured, &secrets.tx.1, &secrets.rx.1),
        (None, _) => Err("not TLS 1.3".into()),
        (_, None) => Err("its traffic secrets were not recorded".into()),
    };
    let unsupported = || io::Error::other(format!("no kernel crypto_info for {suite:?}"));
    let tx = CryptoInfo::from_rustls(secrets.tx.0, &secrets.tx.1).ok_or_else(unsupported)?;
    let rx = CryptoInfo::from_rustls(secrets.rx.0, &secrets.rx.1).ok_or_else(unsupported)?;
    drop(secrets);
    let fd = sock.as_raw_fd();
    let installed =
        sys::set_crypto(fd, libc::TLS_TX, &tx).map_err(|e| annotate(e, "installing the send key (TLS_TX)")).and_then(
            |()| sys::set_crypto(fd, libc::TLS_RX, &rx).map_err(|e| annotate(e, "installing the receive key (TLS_RX)")),
        );
    if let Err(e) = installed {
        // Neither rustls nor the kernel can go on: the peer must see a reset, not a FIN.
        super::reset_fd(fd);
        return Err(e);
    }
    Ok(Offload::Kernel(Offloaded {
        tcp: sock.into_tcp(),
        pending,
        peer_closed,
        key_schedule,
        send_records_per_key: None,
    }))
}

/// Takes the plaintext rustls decrypted but nobody read yet; reports a close_notify
/// rustls already processed.
fn drain_plaintext(conn: &mut rustls::Connection) -> io::Result<(Vec<u8>, bool)> {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => return Ok((pending, true)),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((pending, false)),
            Err(e) => return Err(e),
        }
    }
}

fn annotate(e: io::Error, doing: &str) -> io::Error {
    io::Error::new(e.kind(), format!("kernel TLS: {doing}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_gcm_iv_splits_into_salt_and_iv() {
        let iv: [u8; 12] = std::array::from_fn(|i| i as u8);
        let key: [u8; 16] = [7; 16];
        match CryptoInfo::new(CipherSuite::TLS13_AES_128_GCM_SHA256, &key, &iv, 0x0102_0304_0506_0708).unwrap() {
            CryptoInfo::Aes128Gcm(i) => {
                assert_eq!(i.salt, [0, 1, 2, 3]);
                assert_eq!(i.iv, [4, 5, 6, 7, 8, 9, 10, 11]);
                assert_eq!(i.key, key);
                assert_eq!(i.rec_seq, [1, 2, 3, 4, 5, 6, 7, 8]);
                assert_eq!(i.info.version, libc::TLS_1_3_VERSION);
                assert_eq!(i.info.cipher_type, libc::TLS_CIPHER_AES_GCM_128);
            }
            _ => panic!("wrong variant"),
        }
    }

    #[test]
    fn chacha_keeps_the_whole_iv() {
        let s = ConnectionTrafficSecrets::Chacha20Poly1305 { key: [1u8; 32].into(), iv: [9u8; 12].into() };
        match CryptoInfo::from_rustls(5, &s).unwrap() {
            CryptoInfo::Chacha20Poly1305(i) => {
                assert_eq!(i.iv, [9; 12]);
                assert_eq!(i.rec_seq, 5u64.to_be_bytes());
            }
            _ => panic!("wrong variant"),
        }
    }

    #[test]
    fn wrong_sizes_are_refused() {
        assert!(CryptoInfo::new(CipherSuite::TLS13_AES_128_GCM_SHA256, &[0; 32], &[0; 12], 0).is_none());
        assert!(CryptoInfo::new(CipherSuite::TLS13_AES_256_GCM_SHA384, &[0; 32], &[0; 8], 0).is_none());
        assert!(CryptoInfo::new(CipherSuite::TLS13_AES_128_CCM_SHA256, &[0; 16], &[0; 12], 0).is_none());
    }

    #[test]
    fn probe_gives_an_actionable_answer() {
        let s = KtlsSupport::probe();
        // Either the kernel takes at least AES-128-GCM, or it says why not.
        match &s.unavailable {
            None => assert!(s.accepts(CipherSuite::TLS13_AES_128_GCM_SHA256), "{s:?}"),
            Some(why) => assert!(!why.is_empty() && !s.accepts(CipherSuite::TLS13_AES_128_GCM_SHA256)),
        }
    }

    #[test]
    fn ulp_errors_are_explained() {
        let why = explain_ulp_error(&io::Error::from_raw_os_error(libc::ENOENT));
        assert!(why.contains("modprobe tls"), "{why}");
    }
}

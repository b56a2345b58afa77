//! Following TLS 1.3 key updates once the kernel owns a connection's records.
//!
//! A user-space peer (rustls) sends a KeyUpdate after 2^24 records on one key (the
//! AES-GCM confidentiality limit: 256 GiB in full records, far less in small ones) and
//! asks for one back. Linux 6.14 and later let a running kernel-TLS connection take a
//! new key (`setsockopt(SOL_TLS, TLS_RX/TLS_TX)` once more), but the kernel does not
//! derive it: the next secret is `HKDF-Expand-Label(secret, "traffic upd", "", Hash.length)`
//! (RFC 8446 §7.2), its key and IV come from it as at the start (§7.3), and the record
//! numbers start again at 0. rustls gives out only the current key and IV at offload, so
//! each data connection keeps its two application traffic secrets as its handshake
//! produces them ([`TrafficSecrets`], a per-connection `KeyLog` that holds them in
//! memory only) and [`KeySchedule`] derives the generations after them.
//!
//! - A received KeyUpdate: the receive side installs the next receive key before it
//!   reads on ([`Rekeying::follow`]); if the peer asked for an update, an answer is owed.
//! - The owed answer goes out before this end's next application data record (§4.6.3):
//!   a KeyUpdate record under the old key, then the next send key
//!   ([`Rekeying::take_send_key_update`], [`Rekeying::next_send_key`]).
//! - A kernel-TLS sender updates its own key after [`SEND_RECORDS_PER_KEY`] records
//!   when its kernel takes new keys and the peer announced that it follows key updates
//!   (`Capabilities::key_updates`); otherwise it keeps its key, as the kernel does.
//! - A kernel older than 6.14 refuses the second key: the stream is aborted with that
//!   reason (no byte is delivered under a wrong key: the kernel would fail to decrypt).

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rustls::crypto::tls13::{HkdfExpander, OkmBlock};
use rustls::{ConnectionTrafficSecrets, KeyLog, Tls13CipherSuite};

use super::CryptoInfo;

const CLIENT_SECRET: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_SECRET: &str = "SERVER_TRAFFIC_SECRET_0";

/// The KeyUpdate message this end sends: handshake type 24, length 1,
/// `update_not_requested` (RFC 8446 §4.6.3).
pub const KEY_UPDATE_NOT_REQUESTED: [u8; 5] = [24, 0, 0, 1, 0];

static RECEIVED: AtomicU64 = AtomicU64::new(0);
static SENT: AtomicU64 = AtomicU64::new(0);

/// Key updates followed by kernel-TLS streams since start: `(received, sent)`. Received
/// ones are the peer's, whose new receive key was installed; sent ones are this end's
/// answers.
pub fn key_updates() -> (u64, u64) {
    (RECEIVED.load(Ordering::Relaxed), SENT.load(Ordering::Relaxed))
}

/// One connection's first application traffic secrets, caught from rustls's `KeyLog`
/// calls during the handshake. Set as the `key_log` of a per-connection copy of the
/// configuration; never written anywhere, zeroed when dropped.
#[derive(Default)]
pub struct TrafficSecrets {
    captured: Mutex<Captured>,
}

#[derive(Default)]
struct Captured {
    client: Option<OkmBlock>,
    server: Option<OkmBlock>,
}

impl fmt::Debug for TrafficSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.captured.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("TrafficSecrets")
            .field("client", &c.client.is_some())
            .field("server", &c.server.is_some())
            .finish()
    }
}

impl TrafficSecrets {
    /// Drops (and zeroes) what was recorded: for a connection whose stream stays on
    /// user-space TLS, which never needs it.
    pub fn forget(&self) {
        *self.captured.lock().unwrap_or_else(|e| e.into_inner()) = Captured::default();
    }
}

impl KeyLog for TrafficSecrets {
    fn will_log(&self, label: &str) -> bool {
        label == CLIENT_SECRET || label == SERVER_SECRET
    }

    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        let mut c = self.captured.lock().unwrap_or_else(|e| e.into_inner());
        match label {
            CLIENT_SECRET => c.client = Some(OkmBlock::new(secret)),
            SERVER_SECRET => c.server = Some(OkmBlock::new(secret)),
            _ => {}
        }
    }
}

/// The application traffic secrets of an offloaded connection, and the generations
/// after them.
pub struct KeySchedule {
    suite: &'static Tls13CipherSuite,
    send: OkmBlock,
    receive: OkmBlock,
}

impl fmt::Debug for KeySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySchedule").field("suite", &self.suite.common.suite).finish_non_exhaustive()
    }
}

impl KeySchedule {
    /// From the secrets `captured` during the handshake, checked against the keys
    /// rustls handed out at offload (`send`, `receive`): they must be the same
    /// generation, or following a key update would install a wrong key.
    pub fn new(
        suite: &'static Tls13CipherSuite,
        is_client: bool,
        captured: &TrafficSecrets,
        send: &ConnectionTrafficSecrets,
        receive: &ConnectionTrafficSecrets,
    ) -> Result<KeySchedule, String> {
        let c = captured.captured.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(client), Some(server)) = (&c.client, &c.server) else {
            return Err("the handshake did not reveal its traffic secrets".into());
        };
        let (mine, theirs) = if is_client { (client, server) } else { (server, client) };
        let schedule =
            KeySchedule { suite, send: OkmBlock::new(mine.as_ref()), receive: OkmBlock::new(theirs.as_ref()) };
        if !schedule.matches(&schedule.send, send) || !schedule.matches(&schedule.receive, receive) {
            return Err("the captured traffic secrets do not give the keys in use".into());
        }
        Ok(schedule)
    }

    /// The next receive key, at record 0 (the schedule moves on).
    pub fn next_receive_key(&mut self) -> io::Result<CryptoInfo> {
        self.receive = self.next_secret(&self.receive);
        self.crypto_info(&self.receive)
    }

    /// The next send key, at record 0 (the schedule moves on).
    pub fn next_send_key(&mut self) -> io::Result<CryptoInfo> {
        self.send = self.next_secret(&self.send);
        self.crypto_info(&self.send)
    }

    fn expander(&self, secret: &OkmBlock) -> Box<dyn HkdfExpander> {
        self.suite.hkdf_provider.expander_for_okm(secret)
    }

    /// `application_traffic_secret_N+1` (RFC 8446 §7.2).
    fn next_secret(&self, secret: &OkmBlock) -> OkmBlock {
        let e = self.expander(secret);
        let len = e.hash_len();
        expand_label(b"traffic upd", len, |info| OkmBlock::new(e.expand_block(info).as_ref()))
    }

    /// The key and IV of a traffic secret (RFC 8446 §7.3).
    fn key_and_iv(&self, secret: &OkmBlock) -> (Vec<u8>, [u8; 12]) {
        let e = self.expander(secret);
        let mut key = vec![0u8; self.suite.aead_alg.key_len()];
        let mut iv = [0u8; 12];
        expand_label(b"key", key.len(), |info| e.expand_slice(info, &mut key))
            .expect("an AEAD key is far shorter than HKDF's output limit");
        expand_label(b"iv", iv.len(), |info| e.expand_slice(info, &mut iv))
            .expect("12 bytes are within HKDF's output limit");
        (key, iv)
    }

    fn crypto_info(&self, secret: &OkmBlock) -> io::Result<CryptoInfo> {
        let (mut key, iv) = self.key_and_iv(secret);
        let info = CryptoInfo::new(self.suite.common.suite, &key, &iv, 0);
        key.fill(0);
        info.ok_or_else(|| io::Error::other(format!("no kernel crypto_info for {:?}", self.suite.common.suite)))
    }

    fn matches(&self, secret: &OkmBlock, extracted: &ConnectionTrafficSecrets) -> bool {
        let (mut key, iv) = self.key_and_iv(secret);
        let same = match extracted {
            ConnectionTrafficSecrets::Aes128Gcm { key: k, iv: i }
            | ConnectionTrafficSecrets::Aes256Gcm { key: k, iv: i }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key: k, iv: i } => {
                k.as_ref() == key.as_slice() && i.as_ref() == iv.as_slice()
            }
            _ => false,
        };
        key.fill(0);
        same
    }
}

/// Calls `f` with the `HkdfLabel` info of `label` (empty context) for `len` bytes.
fn expand_label<T>(label: &[u8], len: usize, f: impl FnOnce(&[&[u8]]) -> T) -> T {
    const PREFIX: &[u8] = b"tls13 ";
    let out_len = (len as u16).to_be_bytes();
    let label_len = [(PREFIX.len() + label.len()) as u8];
    f(&[&out_len, &label_len, PREFIX, label, &[0]])
}

/// Records a kernel-TLS send direction puts under one key before it moves to the next,
/// when the kernel and the peer both follow key updates: half of rustls's AES-GCM limit
/// (2^24), since the count is a lower bound (one record per 16 KiB of each write). The
/// testing knob `SLUICE_TLS_KEY_UPDATE_RECORDS` lowers it, as it lowers rustls's.
pub const SEND_RECORDS_PER_KEY: u64 = 1 << 23;

/// [`SEND_RECORDS_PER_KEY`], or the testing knob's value.
pub fn send_records_per_key() -> u64 {
    sluice_proto::tls::key_update_records().unwrap_or(SEND_RECORDS_PER_KEY).min(SEND_RECORDS_PER_KEY)
}

/// A stream's key-update state, shared by its two directions.
#[derive(Debug)]
pub(crate) struct Rekeying {
    /// `Err`: why this connection cannot follow a key update.
    schedule: Mutex<Result<KeySchedule, String>>,
    /// The peer asked for an update this end has not sent yet.
    owed: AtomicBool,
    /// Records sent under the current send key (counted by the send direction only).
    sent: AtomicU64,
    /// Move to the next send key after this many records; `None`: never (the kernel or
    /// the peer cannot follow).
    per_key: Option<u64>,
}

impl Rekeying {
    pub(crate) fn new(schedule: Result<KeySchedule, String>, per_key: Option<u64>) -> Rekeying {
        let per_key = per_key.filter(|_| schedule.is_ok());
        Rekeying { schedule: Mutex::new(schedule), owed: AtomicBool::new(false), sent: AtomicU64::new(0), per_key }
    }

    /// Counts records the send direction wrote under the current key.
    pub(crate) fn sent_records(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Follows the peer's KeyUpdate on the receive side of `fd`: installs the next
    /// receive key. The error says why the stream cannot go on.
    pub(crate) fn follow(&self, fd: std::os::fd::RawFd, update_requested: bool) -> io::Result<()> {
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let schedule = schedule.as_mut().map_err(|why| {
            io::Error::other(format!(
                "the peer updated its TLS keys (KeyUpdate), which this stream cannot follow: {why}"
            ))
        })?;
        let info = schedule.next_receive_key()?;
        super::sys::set_crypto(fd, libc::TLS_RX, &info).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "the peer updated its TLS keys (KeyUpdate) and this kernel refused the new receive key ({e}); \
                     kernel TLS follows key updates from Linux 6.14 on: upgrade the kernel, or run this end with \
                     SLUICE_DATA_PATH=userspace"
                ),
            )
        })?;
        RECEIVED.fetch_add(1, Ordering::Relaxed);
        if update_requested {
            self.owed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// True when the send direction must update its key before its next application
    /// data: an answer is owed to the peer, or the current key's record budget is spent
    /// (both are cleared: a request that arrives later is answered by a later update).
    /// The caller sends [`KEY_UPDATE_NOT_REQUESTED`] under the current key, then
    /// installs [`Self::next_send_key`].
    pub(crate) fn take_send_key_update(&self) -> bool {
        let owed = self.owed.load(Ordering::Acquire) && self.owed.swap(false, Ordering::AcqRel);
        let spent = self.per_key.is_some_and(|n| self.sent.load(Ordering::Relaxed) >= n);
        if spent {
            self.sent.store(0, Ordering::Relaxed);
        }
        owed || spent
    }

    /// Installs the next send key on `fd` after this end's KeyUpdate went out.
    pub(crate) fn next_send_key(&self, fd: std::os::fd::RawFd) -> io::Result<()> {
        let mut schedule = self.schedule.lock().unwrap_or_else(|e| e.into_inner());
        let schedule = schedule.as_mut().map_err(|why| io::Error::other(why.clone()))?;
        let info = schedule.next_send_key()?;
        super::sys::set_crypto(fd, libc::TLS_TX, &info).map_err(|e| {
            io::Error::new(e.kind(), format!("kernel TLS refused the next send key after a KeyUpdate: {e}"))
        })?;
        SENT.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    use rustls::{ClientConnection, Connection, ServerConnection};

    /// Moves TLS bytes from `from` to `to`; true if there were any.
    fn flight(from: &mut Connection, to: &mut Connection) -> bool {
        let mut buf = Vec::new();
        while from.wants_write() {
            if from.write_tls(&mut buf).unwrap() == 0 {
                break;
            }
        }
        let mut r = &buf[..];
        while !r.is_empty() {
            assert!(to.read_tls(&mut r).unwrap() > 0, "read_tls took nothing");
            to.process_new_packets().unwrap();
        }
        !buf.is_empty()
    }

    /// Moves TLS bytes both ways until neither end has any to send.
    fn exchange(a: &mut Connection, b: &mut Connection) {
        for _ in 0..100 {
            if !(flight(a, b) | flight(b, a)) {
                return;
            }
        }
        panic!("the connections kept talking");
    }

    fn pair(suite: rustls::SupportedCipherSuite) -> (Connection, Connection, Arc<TrafficSecrets>, Arc<TrafficSecrets>) {
        let mut provider = (*sluice_proto::tls::provider()).clone();
        provider.cipher_suites = vec![suite];
        let (mut server_cfg, mut client_cfg) = crate::testing::tls_configs(Arc::new(provider));
        let client_secrets = Arc::new(TrafficSecrets::default());
        let server_secrets = Arc::new(TrafficSecrets::default());
        client_cfg.key_log = client_secrets.clone();
        server_cfg.key_log = server_secrets.clone();
        let server = ServerConnection::new(Arc::new(server_cfg)).unwrap();
        let client = ClientConnection::new(Arc::new(client_cfg), "tunnel.test".try_into().unwrap()).unwrap();
        (client.into(), server.into(), client_secrets, server_secrets)
    }

    /// The derivation agrees with rustls's own key update: after the client updates its
    /// keys, the server's receive key is what the client's schedule derives.
    #[test]
    fn derived_keys_match_rustls_after_a_key_update() {
        let (mut client, mut server, client_secrets, server_secrets) =
            pair(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
        exchange(&mut client, &mut server);
        let suite = client.negotiated_cipher_suite().unwrap().tls13().unwrap();

        // Generation 0: what both captured is what rustls uses.
        client.writer().write_all(b"before").unwrap();
        exchange(&mut client, &mut server);
        let mut buf = [0u8; 6];
        server.reader().read_exact(&mut buf).unwrap();

        // The client updates its send key (rustls sends KeyUpdate, update requested).
        client.refresh_traffic_keys().unwrap();
        client.writer().write_all(b"after").unwrap();
        exchange(&mut client, &mut server);
        let mut buf = [0u8; 5];
        server.reader().read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"after");

        // The server's keys now: receive generation 1; send generation 1 too (it answered).
        let server_keys = match server {
            Connection::Server(s) => s.dangerous_extract_secrets().unwrap(),
            Connection::Client(_) => unreachable!(),
        };
        let client_keys = match client {
            Connection::Client(c) => c.dangerous_extract_secrets().unwrap(),
            Connection::Server(_) => unreachable!(),
        };
        // A schedule built on generation 0 (as at an offload before the update).
        let captured = server_secrets.captured.lock().unwrap();
        let mut s = KeySchedule {
            suite,
            send: OkmBlock::new(captured.server.as_ref().unwrap().as_ref()),
            receive: OkmBlock::new(captured.client.as_ref().unwrap().as_ref()),
        };
        drop(captured);
        s.receive = s.next_secret(&s.receive);
        s.send = s.next_secret(&s.send);
        assert!(s.matches(&s.receive, &server_keys.rx.1), "derived receive key differs from rustls's");
        assert!(s.matches(&s.send, &server_keys.tx.1), "derived send key differs from rustls's");
        assert_eq!(server_keys.rx.0, 1, "one record under the new key");

        // The client side agrees, and `new` refuses secrets of another generation.
        assert!(KeySchedule::new(suite, true, &client_secrets, &client_keys.tx.1, &client_keys.rx.1).is_err());
    }

    #[test]
    fn a_fresh_connection_schedule_matches_its_keys() {
        for suite in [
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
            rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ] {
            let (mut client, mut server, client_secrets, server_secrets) = pair(suite);
            exchange(&mut client, &mut server);
            let tls13 = client.negotiated_cipher_suite().unwrap().tls13().unwrap();
            let keys = match client {
                Connection::Client(c) => c.dangerous_extract_secrets().unwrap(),
                Connection::Server(_) => unreachable!(),
            };
            let s = KeySchedule::new(tls13, true, &client_secrets, &keys.tx.1, &keys.rx.1);
            assert!(s.is_ok(), "{suite:?}: {:?}", s.err());
            // The other end's view is the mirror image.
            let keys = match server {
                Connection::Server(c) => c.dangerous_extract_secrets().unwrap(),
                Connection::Client(_) => unreachable!(),
            };
            assert!(KeySchedule::new(tls13, false, &server_secrets, &keys.tx.1, &keys.rx.1).is_ok());
            assert!(KeySchedule::new(tls13, true, &server_secrets, &keys.tx.1, &keys.rx.1).is_err(), "sides swapped");
        }
    }

    fn schedule() -> KeySchedule {
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().unwrap();
        KeySchedule { suite, send: OkmBlock::new(&[1; 32]), receive: OkmBlock::new(&[2; 32]) }
    }

    #[test]
    fn the_send_key_moves_on_when_its_budget_is_spent_or_an_answer_is_owed() {
        let r = Rekeying::new(Ok(schedule()), Some(10));
        assert!(!r.take_send_key_update());
        r.sent_records(9);
        assert!(!r.take_send_key_update());
        r.sent_records(1);
        assert!(r.take_send_key_update(), "10 of 10 records");
        assert!(!r.take_send_key_update(), "the count starts again");
        r.owed.store(true, Ordering::Release);
        assert!(r.take_send_key_update(), "an owed answer");
        assert!(!r.take_send_key_update(), "answered once");

        // No budget (peer or kernel cannot follow), or no schedule: only owed answers.
        let r = Rekeying::new(Ok(schedule()), None);
        r.sent_records(u64::MAX / 2);
        assert!(!r.take_send_key_update());
        let r = Rekeying::new(Err("none".into()), Some(1));
        r.sent_records(5);
        assert!(!r.take_send_key_update());
    }

    #[test]
    fn the_knob_only_lowers_the_send_budget() {
        assert_eq!(SEND_RECORDS_PER_KEY, 1 << 23);
        assert!(send_records_per_key() <= SEND_RECORDS_PER_KEY);
    }

    #[test]
    fn no_secrets_no_schedule() {
        let empty = TrafficSecrets::default();
        let suite = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256.tls13().unwrap();
        let k = ConnectionTrafficSecrets::Aes128Gcm { key: [0u8; 32].into(), iv: [0u8; 12].into() };
        let err = KeySchedule::new(suite, true, &empty, &k, &k).unwrap_err();
        assert!(err.contains("did not reveal"), "{err}");
        // Forgotten secrets are gone.
        let (mut client, mut server, client_secrets, _) =
            pair(rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256);
        exchange(&mut client, &mut server);
        assert!(format!("{client_secrets:?}").contains("client: true"));
        client_secrets.forget();
        assert!(format!("{client_secrets:?}").contains("client: false"), "{client_secrets:?}");
        assert!(!format!("{empty:?}").contains("0x"), "Debug must not print secrets");
    }
}

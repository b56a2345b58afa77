//! `ktls-probe`: exercises real kernel TLS inside the kTLS test VM.
//!
//! The host that builds Sluice has no `CONFIG_TLS`, so the kTLS data path can only be
//! tested in a VM whose kernel has the `tls` module (`cargo xtask vm-test-smoke`). This
//! program is the VM's smoke test and a record of how kTLS behaves on that kernel:
//!
//! - For each TLS 1.3 cipher suite the kernel supports (AES-128-GCM, AES-256-GCM,
//!   ChaCha20-Poly1305) it does a rustls handshake over 127.0.0.1, hands both ends to
//!   the kernel with the `ktls` crate, sends `--mib` MiB in each direction at once with
//!   plain `write`/`read`, compares SHA-256 digests, and ends each direction with a
//!   close_notify alert followed by a FIN.
//! - `ktls-splice-*`: the agent's data path: one end of the kTLS connection is joined to
//!   a plain TCP socket by two `splice(2)` pumps through pipes (kTLS RX → pipe → plain,
//!   and plain → pipe → kTLS TX), carrying `--mib` MiB each way; `ktls-splice` with the
//!   `splice` syscall, `ktls-uring-splice` with io_uring's `IORING_OP_SPLICE`.
//! - It reports (`INFO ktls-rx-control …`) what `read(2)` and `splice(2)` return when the
//!   next record on a kTLS RX socket is not application data (the close_notify alert),
//!   and reads that record with `recvmsg(2)` and the `SOL_TLS`/`TLS_GET_RECORD_TYPE`
//!   control message.
//!
//! Output is one line per check, `PASS <name> …` or `FAIL <name> …`, which the VM harness
//! parses; the exit code is 0 only if every check passed.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread;
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig, SupportedCipherSuite};
use sha2::{Digest, Sha256};

/// `SOL_TLS` socket option level (linux/socket.h).
const SOL_TLS: libc::c_int = 282;
/// cmsg type to send a record of a given content type (linux/tls.h).
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
/// cmsg type carrying the content type of a received record (linux/tls.h).
const TLS_GET_RECORD_TYPE: libc::c_int = 2;
/// TLS record content types.
const RECORD_ALERT: u8 = 21;
const RECORD_HANDSHAKE: u8 = 22;
const RECORD_APPLICATION_DATA: u8 = 23;
/// Bytes moved per write / splice call.
const CHUNK: usize = 256 * 1024;

fn main() {
    let mib = parse_mib().unwrap_or_else(|e| {
        eprintln!("ktls-probe: {e:#}");
        std::process::exit(2);
    });
    let bytes = mib * 1024 * 1024;
    let cert = match make_cert() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL ktls-setup cannot make a certificate: {e:#}");
            std::process::exit(1);
        }
    };

    let mut failed = 0;
    let mut report = |name: &str, r: Result<String>| match r {
        Ok(detail) => println!("PASS {name} {detail}"),
        Err(e) => {
            failed += 1;
            println!("FAIL {name} {e:#}");
        }
    };

    let suites = [
        ("ktls-aes128-gcm", aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256),
        ("ktls-aes256-gcm", aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384),
        ("ktls-chacha20-poly1305", aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256),
    ];
    for (name, suite) in suites {
        report(name, read_write_test(&cert, suite, bytes));
    }
    let aes128 = aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256;
    report("ktls-splice", splice_test(&cert, aes128, bytes, false));
    report("ktls-uring-splice", splice_test(&cert, aes128, bytes, true));

    std::process::exit(if failed == 0 { 0 } else { 1 });
}

fn parse_mib() -> Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut mib = 64;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().context("--mib needs a value")?.parse().context("--mib")?,
            other => bail!("unknown argument {other:?} (usage: ktls-probe [--mib N])"),
        }
    }
    Ok(mib)
}

/// A self-signed certificate for `localhost` and its key.
struct Cert {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

fn make_cert() -> Result<Cert> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    Ok(Cert { cert: ck.cert.der().clone(), key: ck.signing_key.serialize_der() })
}

/// Client and server configs restricted to TLS 1.3 and one cipher suite, with what kTLS
/// needs: secret extraction on, and no session tickets (a ticket arriving after the
/// handshake would be a record the kernel hands back as a control message).
fn configs(cert: &Cert, suite: SupportedCipherSuite) -> Result<(Arc<ServerConfig>, Arc<ClientConfig>)> {
    let provider = Arc::new(CryptoProvider { cipher_suites: vec![suite], ..aws_lc_rs::default_provider() });
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone()));
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.clone()], key)?;
    server.enable_secret_extraction = true;
    server.send_tls13_tickets = 0;

    let mut roots = RootCertStore::empty();
    roots.add(cert.cert.clone())?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    client.resumption = rustls::client::Resumption::disabled();
    Ok((Arc::new(server), Arc::new(client)))
}

/// Handshakes over 127.0.0.1 and hands both ends to kernel TLS. Returns blocking
/// `(client, server)` sockets whose record layer is now in the kernel.
fn ktls_pair(cert: &Cert, suite: SupportedCipherSuite) -> Result<(TcpStream, TcpStream)> {
    let (server_cfg, client_cfg) = configs(cert, suite)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
        let connector = tokio_rustls::TlsConnector::from(client_cfg);
        let server = async {
            let (tcp, _) = listener.accept().await?;
            let tls = acceptor.accept(ktls::CorkStream::new(tcp)).await.context("server handshake")?;
            ensure!(tls.get_ref().1.negotiated_cipher_suite() == Some(suite), "server negotiated another suite");
            let k = ktls::config_ktls_server(tls).await.context("server: hand over to kTLS")?;
            anyhow::Ok(k)
        };
        let client = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost")?;
            let tls = connector.connect(name, ktls::CorkStream::new(tcp)).await.context("client handshake")?;
            let k = ktls::config_ktls_client(tls).await.context("client: hand over to kTLS")?;
            anyhow::Ok(k)
        };
        let (s, c) = tokio::try_join!(server, client)?;
        let into_blocking = |k: ktls::KtlsStream<tokio::net::TcpStream>, side: &str| -> Result<TcpStream> {
            let (drained, tcp) = k.into_raw();
            // Nothing is sent before the handover, so rustls must not have buffered
            // plaintext; if it had, it would have to be delivered before the socket's data.
            ensure!(drained.is_none(), "{side}: rustls held plaintext at the kTLS handover");
            let std = tcp.into_std()?;
            std.set_nonblocking(false)?;
            Ok(std)
        };
        Ok((into_blocking(c, "client")?, into_blocking(s, "server")?))
    })
}

/// Deterministic pseudo-random payload (xorshift64), so both ends can hash it.
struct Payload(u64);

impl Payload {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Writes `bytes` of payload to `w` and returns its SHA-256.
fn send_payload(mut w: impl Write, bytes: usize, seed: u64) -> io::Result<[u8; 32]> {
    let mut p = Payload(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(CHUNK);
        p.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(h.finalize().into())
}

/// Reads a plain socket to EOF, returning the byte count and SHA-256.
fn recv_plain(mut r: impl Read) -> io::Result<(usize, [u8; 32])> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok((total, h.finalize().into()));
        }
        h.update(&buf[..n]);
        total += n;
    }
}

/// Sends a TLS alert record (warning, close_notify) on a kTLS TX socket: `sendmsg`
/// with a `SOL_TLS`/`TLS_SET_RECORD_TYPE` control message naming the record type.
fn send_close_notify(fd: RawFd) -> io::Result<()> {
    let mut payload = [1u8, 0u8]; // level warning, description close_notify
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // u64 storage keeps the cmsg buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 4];
    // SAFETY: msghdr is plain data; every pointer in it refers to live local buffers,
    // and CMSG_* only address inside `cbuf`, which is large enough for one 1-byte cmsg.
    unsafe {
        let space = libc::CMSG_SPACE(1) as usize;
        assert!(space <= std::mem::size_of_val(&cbuf));
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = SOL_TLS;
        (*cmsg).cmsg_type = TLS_SET_RECORD_TYPE;
        (*cmsg).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(cmsg) = RECORD_ALERT;
        if libc::sendmsg(fd, &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads one record from a kTLS RX socket with `recvmsg`, returning its length and its
/// content type from the `SOL_TLS`/`TLS_GET_RECORD_TYPE` control message. This is the
/// only way to read a non-data record: `read` and `splice` refuse it.
fn recv_record(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<u8>)> {
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut cbuf = [0u64; 4];
    // SAFETY: as in send_close_notify; the kernel writes at most msg_controllen bytes
    // of control data and at most iov_len bytes of payload.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut record_type = None;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_TLS && (*cmsg).cmsg_type == TLS_GET_RECORD_TYPE {
                record_type = Some(*libc::CMSG_DATA(cmsg));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, record_type))
    }
}

fn errno_name(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EIO) => "EIO",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::EBADMSG) => "EBADMSG",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::ENOTCONN) => "ENOTCONN",
        Some(libc::ECONNRESET) => "ECONNRESET",
        Some(libc::EMSGSIZE) => "EMSGSIZE",
        Some(libc::ENOENT) => "ENOENT",
        _ => return e.to_string(),
    };
    format!("{name}({})", e.raw_os_error().unwrap_or(0))
}

/// How a kTLS receive ended: bytes and digest of the data, the error `read`/`splice`
/// gave at the first non-data record, and what `recvmsg` then read.
struct RxEnd {
    bytes: usize,
    digest: [u8; 32],
    control_errno: String,
    alert: Vec<u8>,
}

/// Handles a non-data record after `read`/`splice` failed with `err`: reads it with
/// `recvmsg`, requires a close_notify alert, then requires EOF (the peer's FIN).
/// Returns the alert bytes.
fn expect_close_notify(sock: &TcpStream, err: &io::Error) -> Result<Vec<u8>> {
    let fd = sock.as_raw_fd();
    let mut rec = [0u8; 64];
    let (n, ty) = recv_record(fd, &mut rec).with_context(|| format!("recvmsg after {}", errno_name(err)))?;
    ensure!(ty == Some(RECORD_ALERT), "after {}: recvmsg gave {}, {n} bytes", errno_name(err), record_type_name(ty));
    ensure!(rec[..n] == [1, 0], "alert is not close_notify: {:?}", &rec[..n]);
    // The kernel does not act on the alert; the stream ends at the peer's FIN.
    let mut one = [0u8; 1];
    let after = (&*sock).read(&mut one).context("read after close_notify")?;
    ensure!(after == 0, "data after close_notify");
    Ok(rec[..n].to_vec())
}

/// Reads a kTLS socket with plain `read` until close_notify + FIN.
fn recv_ktls_read(sock: &TcpStream) -> Result<RxEnd> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut bytes = 0;
    loop {
        match (&*sock).read(&mut buf) {
            Ok(0) => bail!("EOF without close_notify after {bytes} bytes"),
            Ok(n) => {
                h.update(&buf[..n]);
                bytes += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let alert = expect_close_notify(sock, &e)?;
                return Ok(RxEnd { bytes, digest: h.finalize().into(), control_errno: errno_name(&e), alert });
            }
        }
    }
}

/// Ends the sending direction of a kTLS socket cleanly: close_notify, then FIN.
fn close_ktls_tx(sock: &TcpStream) -> io::Result<()> {
    send_close_notify(sock.as_raw_fd())?;
    sock.shutdown(Shutdown::Write)
}

/// AES/ChaCha round trip with plain `read`/`write` on both kTLS ends, both directions
/// at once.
fn read_write_test(cert: &Cert, suite: SupportedCipherSuite, bytes: usize) -> Result<String> {
    let (client, server) = ktls_pair(cert, suite)?;
    let t = Instant::now();
    let (c_tx, s_tx) = (client.try_clone()?, server.try_clone()?);
    let send = |sock: TcpStream, seed: u64| {
        thread::spawn(move || -> Result<[u8; 32]> {
            let d = send_payload(&sock, bytes, seed)?;
            close_ktls_tx(&sock)?;
            Ok(d)
        })
    };
    let c_send = send(c_tx, 0x1234_5678_9abc_def1);
    let s_send = send(s_tx, 0x0fed_cba9_8765_4321);
    let s_recv = thread::spawn(move || recv_ktls_read(&server));
    let c_recv = recv_ktls_read(&client).context("client receive")?;
    let s_recv = s_recv.join().expect("server receiver panicked").context("server receive")?;
    let c_sent = c_send.join().expect("client sender panicked").context("client send")?;
    let s_sent = s_send.join().expect("server sender panicked").context("server send")?;
    let secs = t.elapsed().as_secs_f64();
    ensure!(s_recv.bytes == bytes && c_recv.bytes == bytes, "byte counts {} / {}", s_recv.bytes, c_recv.bytes);
    ensure!(s_recv.digest == c_sent, "client→server SHA-256 mismatch");
    ensure!(c_recv.digest == s_sent, "server→client SHA-256 mismatch");
    println!(
        "INFO ktls-rx-control read() at close_notify: {} (client) / {} (server); recvmsg cmsg SOL_TLS/TLS_GET_RECORD_TYPE=21 payload {:?}, then read()=0 at FIN",
        c_recv.control_errno, s_recv.control_errno, c_recv.alert
    );
    Ok(format!(
        "{} MiB each way, sha256 ok, {:.1} s ({:.0} MiB/s per direction)",
        bytes >> 20,
        secs,
        (bytes >> 20) as f64 / secs
    ))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success; we own them after.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
        // A bigger pipe means fewer splice round trips; failure only costs speed.
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 1 << 20);
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// How the pumps move bytes: the `splice(2)` syscall, or `IORING_OP_SPLICE` through an
/// io_uring (what the agent's data path uses), one operation in flight at a time.
enum Splicer {
    Syscall,
    Uring(Box<io_uring::IoUring>),
}

impl Splicer {
    fn new(uring: bool) -> io::Result<Self> {
        Ok(if uring { Splicer::Uring(Box::new(io_uring::IoUring::new(8)?)) } else { Splicer::Syscall })
    }

    fn splice(&mut self, from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE;
        let n = match self {
            Splicer::Syscall => {
                // SAFETY: plain syscall on open fds; null offsets mean "current position".
                unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) }
            }
            Splicer::Uring(ring) => {
                use io_uring::{opcode, types};
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                let sqe = opcode::Splice::new(types::Fd(from), -1, types::Fd(to), -1, len).flags(flags).build();
                // SAFETY: the entry refers only to fds that outlive the operation, which
                // completes before this function returns.
                unsafe { ring.submission().push(&sqe) }
                    .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                ring.submit_and_wait(1)?;
                let cqe = ring.completion().next().ok_or_else(|| io::Error::other("io_uring: no completion"))?;
                let r = cqe.result();
                if r < 0 {
                    return Err(io::Error::from_raw_os_error(-r));
                }
                r as isize
            }
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }

    /// Moves `n` bytes already in the pipe to `to`.
    fn drain_pipe(&mut self, pipe_r: RawFd, to: RawFd, mut n: usize) -> io::Result<()> {
        while n > 0 {
            match self.splice(pipe_r, to, n) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "splice out of the pipe moved 0 bytes")),
                Ok(m) => n -= m,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// kTLS RX → pipe → plain socket until close_notify; then half-closes the plain socket.
/// Returns bytes moved, the errno splice gave at the alert, and the alert.
fn pump_ktls_to_plain(ktls_sock: &TcpStream, plain: &TcpStream, uring: bool) -> Result<(usize, String, Vec<u8>)> {
    let (pr, pw) = pipe()?;
    let mut sp = Splicer::new(uring)?;
    let mut moved = 0;
    loop {
        match sp.splice(ktls_sock.as_raw_fd(), pw.as_raw_fd(), CHUNK) {
            Ok(0) => bail!("EOF on the kTLS socket without close_notify after {moved} bytes"),
            Ok(n) => {
                sp.drain_pipe(pr.as_raw_fd(), plain.as_raw_fd(), n).context("splice pipe → plain")?;
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                let alert = expect_close_notify(ktls_sock, &e)?;
                plain.shutdown(Shutdown::Write)?;
                return Ok((moved, errno_name(&e), alert));
            }
        }
    }
}

/// plain socket → pipe → kTLS TX until EOF; then close_notify + FIN on the kTLS socket.
fn pump_plain_to_ktls(plain: &TcpStream, ktls_sock: &TcpStream, uring: bool) -> Result<usize> {
    let (pr, pw) = pipe()?;
    let mut sp = Splicer::new(uring)?;
    let mut moved = 0;
    loop {
        match sp.splice(plain.as_raw_fd(), pw.as_raw_fd(), CHUNK) {
            Ok(0) => {
                close_ktls_tx(ktls_sock).context("close_notify after splice")?;
                return Ok(moved);
            }
            Ok(n) => {
                sp.drain_pipe(pr.as_raw_fd(), ktls_sock.as_raw_fd(), n).context("splice pipe → kTLS")?;
                moved += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("splice plain → pipe"),
        }
    }
}

/// The agent's data path: `tunnel` (kTLS client, the relay's end) talks to `agent`
/// (kTLS server end), which is spliced both ways to a plain socket pair standing for
/// the private service.
fn splice_test(cert: &Cert, suite: SupportedCipherSuite, bytes: usize, uring: bool) -> Result<String> {
    let (tunnel, agent) = ktls_pair(cert, suite)?;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let app = TcpStream::connect(l.local_addr()?)?;
    let (agent_plain, _) = l.accept()?;
    let t = Instant::now();

    let (agent2, agent_plain2) = (agent.try_clone()?, agent_plain.try_clone()?);
    let rx_pump = thread::spawn(move || pump_ktls_to_plain(&agent, &agent_plain, uring));
    let tx_pump = thread::spawn(move || pump_plain_to_ktls(&agent_plain2, &agent2, uring));
    let app_tx = app.try_clone()?;
    let app_send = thread::spawn(move || -> io::Result<[u8; 32]> {
        let d = send_payload(&app_tx, bytes, 0x5555_aaaa_3333_cccc)?;
        app_tx.shutdown(Shutdown::Write)?;
        Ok(d)
    });
    let app_recv = thread::spawn(move || recv_plain(&app));
    let tunnel_tx = tunnel.try_clone()?;
    let tunnel_send = thread::spawn(move || -> Result<[u8; 32]> {
        let d = send_payload(&tunnel_tx, bytes, 0x0123_4567_89ab_cdef)?;
        close_ktls_tx(&tunnel_tx)?;
        Ok(d)
    });
    let tunnel_recv = recv_ktls_read(&tunnel).context("tunnel receive")?;

    let (rx_moved, splice_errno, alert) = rx_pump.join().expect("rx pump panicked").context("kTLS → plain pump")?;
    let tx_moved = tx_pump.join().expect("tx pump panicked").context("plain → kTLS pump")?;
    let app_sent = app_send.join().expect("app sender panicked").context("app send")?;
    let (app_got, app_digest) = app_recv.join().expect("app receiver panicked").context("app receive")?;
    let tunnel_sent = tunnel_send.join().expect("tunnel sender panicked").context("tunnel send")?;
    let secs = t.elapsed().as_secs_f64();

    ensure!(rx_moved == bytes && app_got == bytes, "kTLS → plain moved {rx_moved}, app got {app_got}");
    ensure!(tx_moved == bytes && tunnel_recv.bytes == bytes, "plain → kTLS moved {tx_moved}");
    ensure!(app_digest == tunnel_sent, "tunnel → app SHA-256 mismatch (splice out of kTLS RX)");
    ensure!(tunnel_recv.digest == app_sent, "app → tunnel SHA-256 mismatch (splice into kTLS TX)");
    let how = if uring { "io_uring IORING_OP_SPLICE" } else { "splice()" };
    println!(
        "INFO ktls-rx-control {how} at close_notify: {splice_errno}; recvmsg cmsg SOL_TLS/TLS_GET_RECORD_TYPE=21 payload {alert:?}, then read()=0 at FIN"
    );
    Ok(format!(
        "{} MiB each way kTLS RX→pipe→plain and plain→pipe→kTLS TX, sha256 ok, {:.1} s ({:.0} MiB/s per direction)",
        bytes >> 20,
        secs,
        (bytes >> 20) as f64 / secs
    ))
}

fn record_type_name(ty: Option<u8>) -> String {
    match ty {
        Some(RECORD_ALERT) => "alert(21)".into(),
        Some(RECORD_HANDSHAKE) => "handshake(22)".into(),
        Some(RECORD_APPLICATION_DATA) => "application_data(23)".into(),
        Some(t) => format!("type {t}"),
        None => "no TLS_GET_RECORD_TYPE cmsg".into(),
    }
}

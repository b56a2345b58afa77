//! Fixtures shared by the data path's tests (`tests.rs`, the tunnel socket's and the
//! property tests): connected loopback socket pairs, payload patterns, reading to the
//! end, TLS records, a real TLS 1.3 session over two [`TunnelSocket`]s, and one stream
//! running an engine between two socket pairs.

use std::io;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::ktls::pump::{Pending, TunnelTls};
use crate::{KtlsEngine, StreamEnd, Transfer, Tunnel, TunnelSocket};

/// Two ends of one loopback TCP connection: (connecting end, accepted end).
pub(crate) async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// `n` bytes that differ with position and `seed`, so a moved, dropped or repeated
/// chunk shows.
pub(crate) fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed as u32).to_be_bytes()[0]).collect()
}

/// Reads until EOF or error; returns what was read and whether it ended in an error.
pub(crate) async fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, Option<io::Error>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65536];
    loop {
        match s.read(&mut buf).await {
            Ok(0) => return (got, None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Some(e)),
        }
    }
}

/// One TLS application-data record (header + body) with a `body_len`-byte body of `fill`.
pub(crate) fn tls_record(body_len: usize, fill: u8) -> Vec<u8> {
    let mut r = vec![23, 3, 3];
    r.extend_from_slice(&(body_len as u16).to_be_bytes());
    r.extend(std::iter::repeat_n(fill, body_len));
    r
}

/// Both ends of a TLS 1.3 session over [`TunnelSocket`]s, handshake done, secret
/// extraction on (as relay and agent configure it), no tickets.
pub(crate) struct TlsPair {
    pub client: Tunnel,
    pub server: Tunnel,
}

/// A server and a client configuration for "tunnel.test" (self-signed), TLS 1.3 with
/// `provider`'s suites and secret extraction on.
pub(crate) fn tls_configs(
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let cert = rcgen::generate_simple_self_signed(vec!["tunnel.test".into()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let versions = &[&rustls::version::TLS13];
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.send_tls13_tickets = 0;
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    (server, client)
}

pub(crate) async fn tls_pair() -> TlsPair {
    let (server, client) = tls_configs(sluice_proto::tls::provider());
    let (c, s) = tcp_pair().await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let name = rustls::pki_types::ServerName::try_from("tunnel.test").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, TunnelSocket::new(c)), acceptor.accept(TunnelSocket::new(s)));
    TlsPair { client: TlsStream::Client(c.unwrap()), server: TlsStream::Server(s.unwrap()) }
}

/// One stream running `engine` on its own task, between a tunnel socket (whose peer is
/// `far`, the other end of the tunnel) and a plain socket (whose peer is `client`).
pub(crate) struct EngineStream {
    pub client: TcpStream,
    pub far: TcpStream,
    pub transfer: Arc<Transfer>,
    pub cancel: CancellationToken,
    pub run: JoinHandle<StreamEnd>,
}

impl EngineStream {
    /// Starts `engine` with `pending` plaintext; `tls` says whether a bare tunnel FIN is
    /// a clean end (`Plain`) or truncation (`Kernel`).
    pub async fn start(engine: KtlsEngine, pending: Pending, tls: TunnelTls) -> EngineStream {
        let (tunnel, far) = tcp_pair().await;
        let (plain, client) = tcp_pair().await;
        let transfer = Arc::new(Transfer::default());
        let cancel = CancellationToken::new();
        let (t, c) = (transfer.clone(), cancel.clone());
        let run = tokio::spawn(async move { crate::run_engine(engine, tunnel, plain, pending, tls, &t, &c).await });
        EngineStream { client, far, transfer, cancel, run }
    }
}

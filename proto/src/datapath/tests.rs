//! Tests of the data path that run on any kernel: every engine's byte moving, half-close,
//! abort and cancel on real sockets (the kernel-TLS engines with a plain tunnel socket,
//! since this kernel may lack TLS), and the per-connection fallback decision with a real
//! rustls session. Kernel TLS itself is proven in the VM (`cargo xtask vm-test`).

use std::sync::Arc;
use std::time::Duration;

use rustls::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::engines_without_tls::Engine;
use super::ktls::pump::{Mover, Pending, TunnelTls};
use super::*;

const ENGINES: [Engine; 4] = engines_without_tls::ALL;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

async fn run_engine(
    engine: Engine,
    tunnel: TcpStream,
    plain: TcpStream,
    pending: Pending,
    tls: TunnelTls,
    transfer: &Transfer,
    cancel: &CancellationToken,
) -> StreamEnd {
    assert!(!pending.peer_closed);
    engines_without_tls::run(engine, tunnel, plain, pending.bytes, tls == TunnelTls::Kernel, transfer, cancel).await
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed as u32).to_be_bytes()[0]).collect()
}

/// Reads until EOF or error; returns what was read and whether it ended in an error.
async fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_moves_bytes_and_propagates_half_close() {
    for engine in ENGINES {
        let (tunnel, mut agent_end) = tcp_pair().await;
        let (plain, mut client) = tcp_pair().await;
        let t = Arc::new(Transfer::default());
        let cancel = CancellationToken::new();
        let pending = Pending { bytes: b"early".to_vec(), peer_closed: false };
        let (t2, c2) = (t.clone(), cancel.clone());
        let pump =
            tokio::spawn(async move { run_engine(engine, tunnel, plain, pending, TunnelTls::Plain, &t2, &c2).await });
        let request = pattern(3 << 20, 1);
        let reply = pattern(700_001, 2);
        let (req2, rep2) = (request.clone(), reply.clone());
        // The client sends a request and half-closes, then still reads the reply.
        let client_side = tokio::spawn(async move {
            client.write_all(&req2).await.unwrap();
            client.shutdown().await.unwrap();
            read_until_end(&mut client).await
        });
        let agent_side = tokio::spawn(async move {
            let (got, err) = read_until_end(&mut agent_end).await; // EOF = the half-close arrived
            assert!(err.is_none(), "{engine:?}: {err:?}");
            agent_end.write_all(&rep2).await.unwrap();
            agent_end.shutdown().await.unwrap();
            got
        });
        let got_request = agent_side.await.unwrap();
        let (got_reply, err) = client_side.await.unwrap();
        let end = pump.await.unwrap();
        assert!(matches!(end, StreamEnd::Clean), "{engine:?}: {}", end.describe());
        assert!(err.is_none(), "{engine:?}: {err:?}");
        assert!(got_request == request, "{engine:?}: request corrupted ({} bytes)", got_request.len());
        let mut want_reply = b"early".to_vec();
        want_reply.extend_from_slice(&reply);
        assert!(got_reply == want_reply, "{engine:?}: reply corrupted ({} bytes)", got_reply.len());
        assert_eq!(t.get(), (request.len() as u64, want_reply.len() as u64), "{engine:?}");
        let copied = t.copied();
        match engine {
            Engine::Copy => assert_eq!(copied, (request.len() + want_reply.len()) as u64),
            // Only the plaintext rustls had decrypted before offload passes through user space.
            _ => assert_eq!(copied, 5, "{engine:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_tunnel_resets_the_client() {
    for engine in ENGINES {
        let (tunnel, agent_end) = tcp_pair().await;
        let (plain, mut client) = tcp_pair().await;
        let t = Arc::new(Transfer::default());
        let cancel = CancellationToken::new();
        let (t2, c2) = (t.clone(), cancel.clone());
        let pump = tokio::spawn(async move {
            run_engine(engine, tunnel, plain, Pending::default(), TunnelTls::Plain, &t2, &c2).await
        });
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(&agent_end);
        drop(agent_end);
        let end = tokio::time::timeout(Duration::from_secs(5), pump).await.expect("engine did not notice").unwrap();
        assert!(matches!(end, StreamEnd::Aborted { .. }), "{engine:?}: {}", end.describe());
        let (_, err) = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut client)).await.unwrap();
        assert!(err.is_some(), "{engine:?}: the client saw a clean EOF after an abort");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_fin_without_close_notify_is_an_abort() {
    // With kernel TLS a FIN must come after close_notify; a bare FIN means truncation.
    for engine in ENGINES {
        let (tunnel, mut agent_end) = tcp_pair().await;
        let (plain, mut client) = tcp_pair().await;
        let t = Arc::new(Transfer::default());
        let cancel = CancellationToken::new();
        let (t2, c2) = (t.clone(), cancel.clone());
        let pump = tokio::spawn(async move {
            run_engine(engine, tunnel, plain, Pending::default(), TunnelTls::Kernel, &t2, &c2).await
        });
        agent_end.write_all(b"partial").await.unwrap();
        agent_end.shutdown().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), pump).await.expect("engine did not notice").unwrap();
        match &end {
            StreamEnd::Aborted { side: Side::Tunnel, error } => {
                assert!(error.to_string().contains("close_notify"), "{engine:?}: {error}")
            }
            e => panic!("{engine:?}: {}", e.describe()),
        }
        let (got, err) = read_until_end(&mut client).await;
        assert!(err.is_some(), "{engine:?}: got {got:?} then a clean EOF");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_resets_both_sides() {
    for engine in ENGINES {
        let (tunnel, mut agent_end) = tcp_pair().await;
        let (plain, mut client) = tcp_pair().await;
        let t = Arc::new(Transfer::default());
        let cancel = CancellationToken::new();
        let (t2, c2) = (t.clone(), cancel.clone());
        let pump = tokio::spawn(async move {
            run_engine(engine, tunnel, plain, Pending::default(), TunnelTls::Plain, &t2, &c2).await
        });
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        agent_end.read_exact(&mut one).await.unwrap();
        cancel.cancel();
        let end = pump.await.unwrap();
        assert!(matches!(end, StreamEnd::Cancelled), "{engine:?}");
        let wait = Duration::from_secs(5);
        let (_, e1) = tokio::time::timeout(wait, read_until_end(&mut client)).await.unwrap();
        let (_, e2) = tokio::time::timeout(wait, read_until_end(&mut agent_end)).await.unwrap();
        assert!(e1.is_some() && e2.is_some(), "{engine:?}: a cancelled stream must reset both peers");
    }
}

#[tokio::test]
async fn pending_close_notify_half_closes_at_once() {
    let (tunnel, _agent_end) = tcp_pair().await;
    let (plain, mut client) = tcp_pair().await;
    let t = Transfer::default();
    let cancel = CancellationToken::new();
    let pending = Pending { bytes: b"last words".to_vec(), peer_closed: true };
    let pump = run_pump_with(tunnel, plain, pending, Mover::Splice, TunnelTls::Plain, &t, &cancel);
    let read = async {
        let (got, err) = read_until_end(&mut client).await;
        assert!(err.is_none());
        client.shutdown().await.unwrap();
        got
    };
    let (end, got) = tokio::join!(pump, read);
    assert!(matches!(end, StreamEnd::Clean), "{}", end.describe());
    assert_eq!(got, b"last words");
}

// --- the offload decision, with a real rustls session -------------------------------

struct TlsPair {
    client: Tunnel,
    server: Tunnel,
}

async fn tls_pair() -> TlsPair {
    let cert = rcgen::generate_simple_self_signed(vec!["tunnel.test".into()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let versions = &[&rustls::version::TLS13];
    let mut server = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.send_tls13_tickets = 0;
    server.enable_secret_extraction = true;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.enable_secret_extraction = true;
    let (c, s) = tcp_pair().await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let name = rustls::pki_types::ServerName::try_from("tunnel.test").unwrap();
    let (c, s) = tokio::join!(connector.connect(name, TunnelSocket::new(c)), acceptor.accept(TunnelSocket::new(s)));
    TlsPair { client: TlsStream::Client(c.unwrap()), server: TlsStream::Server(s.unwrap()) }
}

fn kernel_claims_everything() -> KtlsSupport {
    KtlsSupport::with(ktls::OFFLOADABLE.to_vec(), None)
}

#[tokio::test]
async fn forced_userspace_never_touches_the_kernel() {
    let pair = tls_pair().await;
    let path = DataPath::with_support(DataPathMode::Userspace, KtlsEngine::Splice, kernel_claims_everything());
    let p = path.prepare(pair.client).unwrap();
    assert_eq!(p.path(), PathKind::Userspace);
    assert!(path.describe().contains("forced"));
}

#[tokio::test]
async fn a_kernel_without_tls_keeps_the_stream_on_rustls_and_it_still_works() {
    let mut pair = tls_pair().await;
    // Control frames first, as relay and agent exchange them.
    crate::wire::write_frame(&mut pair.server, &crate::wire::StreamReply::Accepted).await.unwrap();
    let _: crate::wire::StreamReply = crate::wire::read_frame(&mut pair.client).await.unwrap();
    let support = KtlsSupport::probe();
    if support.unavailable.is_none() {
        eprintln!("this kernel has TLS: the fallback is exercised by a_refused_ulp_falls_back_per_connection");
        return;
    }
    let path = DataPath::with_support(DataPathMode::Auto, KtlsEngine::Splice, support);
    assert!(path.describe().starts_with("user-space rustls: "), "{}", path.describe());
    let a = path.prepare(pair.client).unwrap();
    let b = path.prepare(pair.server).unwrap();
    assert_eq!((a.path(), b.path()), (PathKind::Userspace, PathKind::Userspace));
    through_prepared(a, b).await;
}

#[tokio::test]
async fn a_refused_ulp_falls_back_per_connection() {
    // The start-up probe said yes, but this connection's setsockopt(TCP_ULP) fails (as it
    // does on any kernel without TLS, or a socket the ULP cannot attach to): the
    // stream must stay on rustls with its session intact.
    let pair = tls_pair().await;
    if KtlsSupport::probe().unavailable.is_none() {
        return; // a kernel with TLS would accept the ULP; the VM test covers that case
    }
    let path = DataPath::with_support(DataPathMode::Auto, KtlsEngine::Splice, kernel_claims_everything());
    let a = path.prepare(pair.client).unwrap();
    let b = path.prepare(pair.server).unwrap();
    assert_eq!((a.path(), b.path()), (PathKind::Userspace, PathKind::Userspace));
    through_prepared(a, b).await;
}

#[tokio::test]
async fn an_unoffloadable_cipher_stays_on_rustls() {
    let pair = tls_pair().await;
    let only_256 = KtlsSupport::with(vec![CipherSuite::TLS13_AES_256_GCM_SHA384], None);
    let path = DataPath::with_support(DataPathMode::Auto, KtlsEngine::Splice, only_256);
    // The pair negotiates AES-128-GCM (our preference), which this "kernel" refuses.
    assert_eq!(path.prepare(pair.client).unwrap().path(), PathKind::Userspace);
}

/// Runs a stream through two prepared tunnel ends and checks bytes both ways.
async fn through_prepared(a: PreparedStream, b: PreparedStream) {
    let (plain_a, mut client) = tcp_pair().await;
    let (plain_b, mut service) = tcp_pair().await;
    let (ta, tb) = (Transfer::default(), Transfer::default());
    let cancel = CancellationToken::new();
    let up = pattern(1 << 20, 3);
    let down = pattern(123_457, 4);
    let client_io = async {
        client.write_all(&up).await.unwrap();
        client.shutdown().await.unwrap();
        read_until_end(&mut client).await
    };
    let service_io = async {
        let got = read_until_end(&mut service).await;
        service.write_all(&down).await.unwrap();
        service.shutdown().await.unwrap();
        got
    };
    let (ra, rb, (got_down, e1), (got_up, e2)) =
        tokio::join!(a.run(plain_a, &ta, &cancel), b.run(plain_b, &tb, &cancel), client_io, service_io);
    assert!(matches!(ra.end, StreamEnd::Clean) && matches!(rb.end, StreamEnd::Clean));
    assert!(e1.is_none() && e2.is_none());
    assert!(got_up == up && got_down == down);
    assert_eq!(ta.copied(), (up.len() + down.len()) as u64, "the user-space path copies every byte");
}

//! The data path's units on loopback, without the relay and agent around them:
//!
//! - each kernel-TLS engine (splice on tokio, read/write copy, blocking splice threads,
//!   io_uring splice) moving 256 MiB between two plain TCP sockets — the engines'
//!   mechanics, since this machine's kernel has no TLS (kTLS itself is measured in the
//!   VM: `cargo xtask vm-bench`);
//! - the user-space rustls path: 256 MiB through a real TLS 1.3 session (AES-128-GCM)
//!   and the copy loop, the path every host without kernel TLS takes.
//!
//! Run: `cargo bench -p sluice-benches --bench datapath`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_datapath::engines_without_tls;
use sluice_datapath::{DataPath, DataPathMode, KtlsEngine, StreamEnd, Transfer, TunnelSocket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const LEN: usize = 256 << 20;

async fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (s, _) = l.accept().await.unwrap();
    (c, s)
}

/// Sends LEN bytes into `w` and half-closes; reads `r` to the end; returns bytes read.
async fn push_through(mut w: TcpStream, mut r: TcpStream) -> usize {
    let send = async move {
        let chunk = vec![0x5au8; 256 * 1024];
        let mut left = LEN;
        while left > 0 {
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        w.shutdown().await.unwrap();
        w
    };
    let recv = async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got += n;
        }
        r.shutdown().await.unwrap();
        got
    };
    let (_w, got) = tokio::join!(send, recv);
    got
}

fn engines(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut g = c.benchmark_group("engines (plain sockets, no TLS)");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for &engine in engines_without_tls::ALL {
        g.bench_function(format!("{engine:?} 256 MiB"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let (client, plain) = tcp_pair().await;
                    let (tunnel, far) = tcp_pair().await;
                    let t = Transfer::default();
                    let cancel = CancellationToken::new();
                    let run = engines_without_tls::run(engine, tunnel, plain, Vec::new(), false, &t, &cancel);
                    let (end, got) = tokio::join!(run, push_through(client, far));
                    assert!(matches!(end, StreamEnd::Clean), "{}", end.describe());
                    assert_eq!(got, LEN);
                })
            })
        });
    }
    g.finish();
}

fn rustls_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (server_cfg, client_cfg) = tls_configs();
    let path = DataPath::new(DataPathMode::Userspace, KtlsEngine::Splice);
    let mut g = c.benchmark_group("user-space rustls path");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("TLS 1.3 AES-128-GCM 256 MiB, both ends", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (a, b2) = tcp_pair().await;
                let name = rustls::pki_types::ServerName::try_from("bench.test").unwrap();
                let connector = tokio_rustls::TlsConnector::from(client_cfg.clone());
                let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg.clone());
                let (ca, sa) =
                    tokio::join!(connector.connect(name, TunnelSocket::new(a)), acceptor.accept(TunnelSocket::new(b2)));
                let (near, far) = (
                    path.prepare(ca.unwrap().into(), false).unwrap(),
                    path.prepare(sa.unwrap().into(), false).unwrap(),
                );
                let (client, plain_near) = tcp_pair().await;
                let (plain_far, service) = tcp_pair().await;
                let (t1, t2, cancel) = (Transfer::default(), Transfer::default(), CancellationToken::new());
                let (r1, r2, got) = tokio::join!(
                    near.run(plain_near, &t1, &cancel),
                    far.run(plain_far, &t2, &cancel),
                    push_through(client, service)
                );
                assert!(matches!((r1.end, r2.end), (StreamEnd::Clean, StreamEnd::Clean)));
                assert_eq!(got, LEN);
            })
        })
    });
    g.finish();
}

fn tls_configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let cert = rcgen::generate_simple_self_signed(vec!["bench.test".into()]).unwrap();
    let der = cert.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let versions = &[&rustls::version::TLS13];
    let provider = sluice_proto::tls::provider();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (Arc::new(server), Arc::new(client))
}

criterion_group!(benches, engines, rustls_path);
criterion_main!(benches);

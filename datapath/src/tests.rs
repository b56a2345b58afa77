//! Tests of the data path that run on any kernel: every engine's byte moving, half-close,
//! abort and cancel on real sockets (the kernel-TLS engines with a plain tunnel socket,
//! since this kernel may lack TLS), and the per-connection fallback decision with a real
//! rustls session. Kernel TLS itself is proven in the VM (`cargo xtask vm-test`).
//!
//! The engine tests run every engine this build carries ([`KtlsEngine::ALL`]): only
//! `splice` by default, all four with `--features bench-engines` (which the workspace
//! test run has, through the benchmarks crate). Set-up lives in `testing.rs`.

use std::time::Duration;

use rustls::CipherSuite;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::ktls::pump::{Mover, Pending, TunnelTls};
use super::testing::{EngineStream, pattern, read_until_end, tcp_pair, tls_pair};
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_engine_moves_bytes_and_propagates_half_close() {
    for &engine in KtlsEngine::ALL {
        let pending = Pending { bytes: b"early".to_vec(), ..Pending::default() };
        let EngineStream { mut client, mut far, transfer, run, .. } =
            EngineStream::start(engine, pending, TunnelTls::Plain).await;
        let request = pattern(3 << 20, 1);
        let reply = pattern(700_001, 2);
        let (req2, rep2) = (request.clone(), reply.clone());
        // The client sends a request and half-closes, then still reads the reply.
        let client_side = tokio::spawn(async move {
            client.write_all(&req2).await.unwrap();
            client.shutdown().await.unwrap();
            read_until_end(&mut client).await
        });
        let far_side = tokio::spawn(async move {
            let (got, err) = read_until_end(&mut far).await; // EOF = the half-close arrived
            assert!(err.is_none(), "{engine:?}: {err:?}");
            far.write_all(&rep2).await.unwrap();
            far.shutdown().await.unwrap();
            got
        });
        let got_request = far_side.await.unwrap();
        let (got_reply, err) = client_side.await.unwrap();
        let end = run.await.unwrap();
        assert!(matches!(end, StreamEnd::Clean), "{engine:?}: {}", end.describe());
        assert!(err.is_none(), "{engine:?}: {err:?}");
        assert!(got_request == request, "{engine:?}: request corrupted ({} bytes)", got_request.len());
        let mut want_reply = b"early".to_vec();
        want_reply.extend_from_slice(&reply);
        assert!(got_reply == want_reply, "{engine:?}: reply corrupted ({} bytes)", got_reply.len());
        assert_eq!(transfer.get(), (request.len() as u64, want_reply.len() as u64), "{engine:?}");
        // Only the plaintext rustls had decrypted before offload passes through user
        // space, except on the engine that copies everything.
        let want_copied = if engine.zero_copy() { 5 } else { (request.len() + want_reply.len()) as u64 };
        assert_eq!(transfer.copied(), want_copied, "{engine:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_tunnel_resets_the_client() {
    for &engine in KtlsEngine::ALL {
        let EngineStream { mut client, far, run, .. } =
            EngineStream::start(engine, Pending::default(), TunnelTls::Plain).await;
        client.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(&far);
        drop(far);
        let end = tokio::time::timeout(Duration::from_secs(5), run).await.expect("engine did not notice").unwrap();
        assert!(matches!(end, StreamEnd::Aborted { .. }), "{engine:?}: {}", end.describe());
        let (_, err) = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut client)).await.unwrap();
        assert!(err.is_some(), "{engine:?}: the client saw a clean EOF after an abort");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_fin_without_close_notify_is_an_abort() {
    // With kernel TLS a FIN must come after close_notify; a bare FIN means truncation.
    for &engine in KtlsEngine::ALL {
        let EngineStream { mut client, mut far, run, .. } =
            EngineStream::start(engine, Pending::default(), TunnelTls::Kernel).await;
        far.write_all(b"partial").await.unwrap();
        far.shutdown().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(5), run).await.expect("engine did not notice").unwrap();
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
    for &engine in KtlsEngine::ALL {
        let EngineStream { mut client, mut far, cancel, run, .. } =
            EngineStream::start(engine, Pending::default(), TunnelTls::Plain).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        far.read_exact(&mut one).await.unwrap();
        cancel.cancel();
        let end = run.await.unwrap();
        assert!(matches!(end, StreamEnd::Cancelled), "{engine:?}");
        let wait = Duration::from_secs(5);
        let (_, e1) = tokio::time::timeout(wait, read_until_end(&mut client)).await.unwrap();
        let (_, e2) = tokio::time::timeout(wait, read_until_end(&mut far)).await.unwrap();
        assert!(e1.is_some() && e2.is_some(), "{engine:?}: a cancelled stream must reset both peers");
    }
}

/// A plain socket armed with [`reset_on_close`] (as relay and agent arm theirs, so that a
/// dying process resets its peers) is disarmed by a clean end: the bytes still queued
/// when the stream ends reach a slow reader, then a FIN — not a reset that drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_end_drains_an_armed_socket_and_ends_with_fin() {
    for &engine in KtlsEngine::ALL {
        let (tunnel, mut far) = tcp_pair().await;
        let (plain, mut client) = tcp_pair().await;
        reset_on_close(&plain);
        let reply = pattern(16 << 20, 6);
        let t = Transfer::default();
        let cancel = CancellationToken::new();
        client.shutdown().await.unwrap(); // the request is empty
        let far_io = async {
            let (got, err) = read_until_end(&mut far).await;
            assert!(got.is_empty() && err.is_none(), "{engine:?}: {err:?}");
            far.write_all(&reply).await.unwrap();
            far.shutdown().await.unwrap();
        };
        // A slow reader: the stream ends while megabytes still wait in the socket queues.
        let slow_client = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                tokio::time::sleep(Duration::from_millis(2)).await;
                match client.read(&mut buf).await {
                    Ok(0) => return (got, None),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return (got, Some(e)),
                }
            }
        });
        let (end, ()) =
            tokio::join!(run_engine(engine, tunnel, plain, Pending::default(), TunnelTls::Plain, &t, &cancel), far_io);
        assert!(matches!(end, StreamEnd::Clean), "{engine:?}: {}", end.describe());
        let (got, err) = tokio::time::timeout(Duration::from_secs(30), slow_client).await.unwrap().unwrap();
        assert!(err.is_none(), "{engine:?}: reset after {} of {} bytes: {err:?}", got.len(), reply.len());
        assert!(got == reply, "{engine:?}: {} of {} bytes", got.len(), reply.len());
    }
}

/// An armed socket closed any other way (an error path, a dropped task, the process
/// dying) resets its peer: a truncated stream never ends in a FIN.
#[tokio::test]
async fn an_armed_socket_closed_without_a_clean_end_resets_its_peer() {
    let (plain, mut client) = tcp_pair().await;
    reset_on_close(&plain);
    let mut w = plain;
    w.write_all(b"partial").await.unwrap();
    drop(w);
    let (_, err) = tokio::time::timeout(Duration::from_secs(5), read_until_end(&mut client)).await.unwrap();
    assert_eq!(err.map(|e| e.kind()), Some(std::io::ErrorKind::ConnectionReset));
}

#[tokio::test]
async fn pending_close_notify_half_closes_at_once() {
    let (tunnel, _agent_end) = tcp_pair().await;
    let (plain, mut client) = tcp_pair().await;
    let t = Transfer::default();
    let cancel = CancellationToken::new();
    let pending = Pending { bytes: b"last words".to_vec(), peer_closed: true, ..Pending::default() };
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

fn kernel_claims_everything() -> KtlsSupport {
    KtlsSupport::with(ktls::OFFLOADABLE.to_vec(), None)
}

#[tokio::test]
async fn forced_userspace_never_touches_the_kernel() {
    let pair = tls_pair().await;
    let path = DataPath::with_support(DataPathMode::Userspace, KtlsEngine::Splice, kernel_claims_everything());
    let p = path.prepare(pair.client, false).unwrap();
    assert_eq!(p.path(), PathKind::Userspace);
    assert!(path.describe().contains("forced"));
}

#[test]
fn engine_names_parse_as_this_build_allows() {
    assert_eq!("splice".parse::<KtlsEngine>(), Ok(KtlsEngine::Splice));
    assert_eq!(KtlsEngine::default(), KtlsEngine::Splice);
    let e = "fast".parse::<KtlsEngine>().unwrap_err();
    assert!(e.starts_with("unknown kernel TLS engine \"fast\""), "{e}");
    for name in ["uring", "threads", "copy"] {
        let parsed = name.parse::<KtlsEngine>();
        if cfg!(feature = "bench-engines") {
            let engine = parsed.unwrap();
            assert_eq!(engine.path().as_str(), format!("ktls_{name}"));
        } else {
            // A production build names the feature that would have the engine.
            let e = parsed.unwrap_err();
            assert!(e.contains("bench-engines") && e.contains(name), "{e}");
        }
    }
}

#[tokio::test]
async fn a_kernel_without_tls_keeps_the_stream_on_rustls_and_it_still_works() {
    let mut pair = tls_pair().await;
    // Control frames first, as relay and agent exchange them.
    sluice_proto::wire::write_frame(&mut pair.server, &sluice_proto::wire::StreamReply::Accepted).await.unwrap();
    let _: sluice_proto::wire::StreamReply = sluice_proto::wire::read_frame(&mut pair.client).await.unwrap();
    let support = KtlsSupport::probe();
    if support.unavailable.is_none() {
        eprintln!("this kernel has TLS: the fallback is exercised by a_refused_ulp_falls_back_per_connection");
        return;
    }
    let path = DataPath::with_support(DataPathMode::Auto, KtlsEngine::Splice, support);
    assert!(path.describe().starts_with("user-space rustls: "), "{}", path.describe());
    let a = path.prepare(pair.client, false).unwrap();
    let b = path.prepare(pair.server, false).unwrap();
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
    let a = path.prepare(pair.client, false).unwrap();
    let b = path.prepare(pair.server, false).unwrap();
    assert_eq!((a.path(), b.path()), (PathKind::Userspace, PathKind::Userspace));
    through_prepared(a, b).await;
}

#[tokio::test]
async fn an_unoffloadable_cipher_stays_on_rustls() {
    let pair = tls_pair().await;
    let only_256 = KtlsSupport::with(vec![CipherSuite::TLS13_AES_256_GCM_SHA384], None);
    let path = DataPath::with_support(DataPathMode::Auto, KtlsEngine::Splice, only_256);
    // The pair negotiates AES-128-GCM (our preference), which this "kernel" refuses.
    assert_eq!(path.prepare(pair.client, false).unwrap().path(), PathKind::Userspace);
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

#[tokio::test]
async fn an_idle_connection_is_gone_once_its_peer_closes_or_speaks() {
    let (a, b) = tcp_pair().await;
    assert!(!idle_connection_gone(&a), "open and silent: usable");
    drop(b);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(idle_connection_gone(&a), "the peer closed it");

    let (a, mut b) = tcp_pair().await;
    b.write_all(&[21, 3, 3, 0, 2]).await.unwrap(); // the start of a TLS alert record
    tokio::time::timeout(Duration::from_secs(5), async {
        while !idle_connection_gone(&a) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("a byte on an idle connection marks it gone");
    let mut peek = [0u8; 5];
    assert_eq!(a.peek(&mut peek).await.unwrap(), 5, "checking consumed nothing");
}

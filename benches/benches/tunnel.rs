//! Throughput through the real relay and agent binaries on loopback: a client sends
//! 256 MiB to a private service through the tunnel (user-space rustls data path).
//!
//! Run: `cargo build --release --bins && cargo bench -p sluice-benches`.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sluice_e2e::load::{self, sink_source_server};
use sluice_e2e::{Agent, Relay, test_dir};
use tokio::net::TcpStream;

const LEN: u64 = 256 << 20;

fn tunnel(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = test_dir("bench");
    let (backend, mut reports) = rt.block_on(sink_source_server(0, 0));
    let relay = Relay::start(dir.path());
    let cid = relay.create_customer("bench");
    let agent = Agent::for_service(dir.path(), "bench", backend.port(), &relay.customer_jwt(&cid));
    relay.wait_status("bench", "AVAILABLE", Some(&agent));
    let ep = relay.endpoint("bench");

    let mut g = c.benchmark_group("relay+agent loopback");
    g.throughput(Throughput::Bytes(LEN));
    g.sample_size(10).measurement_time(Duration::from_secs(35));
    g.bench_function("client→service 256 MiB, 1 stream", |b| {
        b.iter(|| {
            rt.block_on(async {
                let s = TcpStream::connect(&ep).await.unwrap();
                let (_r, mut w) = s.into_split();
                load::send(&mut w, LEN, 7).await.unwrap();
                let rep = reports.recv().await.unwrap();
                assert_eq!(rep.received, LEN);
            })
        })
    });
    g.finish();
}

criterion_group!(benches, tunnel);
criterion_main!(benches);

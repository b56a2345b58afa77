//! Real private services through the tunnel: PostgreSQL with `psql` and COPY, and an
//! OpenSSH sftp server with `sftp` put/get of a 256 MiB file.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};
use sluice_e2e::services::{Postgres, Sshd};
use sluice_e2e::{Agent, Relay, split_endpoint, test_dir};

fn through_tunnel(dir: &std::path::Path, name: &str, service_port: u16) -> (Relay, Agent, String, u16) {
    let relay = Relay::start(dir);
    let cid = relay.create_customer("acme");
    let agent = Agent::for_service(dir, name, service_port, &relay.customer_jwt(&cid));
    relay.wait_status(name, "AVAILABLE", Some(&agent));
    let (host, port) = split_endpoint(&relay.endpoint(name));
    (relay, agent, host, port)
}

fn psql(host: &str, port: u16, sql: &str, stdin: Option<&[u8]>) -> String {
    let mut child = Command::new("psql")
        .args(["-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-h", host, "-p", &port.to_string(), "-U", "postgres"])
        .args(["-d", "postgres", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.map(<[u8]>::to_vec);
    let writer = std::thread::spawn(move || {
        if let Some(d) = data {
            input.write_all(&d).unwrap();
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn postgres_copy_100k_rows_through_the_tunnel() {
    let dir = test_dir("postgres");
    let pg = Postgres::start(dir.path());
    let (relay, _agent, host, port) = through_tunnel(dir.path(), "orders-db", pg.port);

    psql(
        &host,
        port,
        "CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, amount numeric(12,2), note text)",
        None,
    );
    let rows: String = (0..100_000u64)
        .map(|i| {
            format!(
                "{i}\tcustomer-{}\t{}.{:02}\tnote with tab-free text {}\n",
                i % 977,
                i * 7 % 100_000,
                i % 100,
                i * 31
            )
        })
        .collect();
    let t = Instant::now();
    psql(&host, port, "\\copy orders FROM STDIN", Some(rows.as_bytes()));
    let copied_in = t.elapsed();
    let count = psql(&host, port, "SELECT count(*) FROM orders", None);
    assert_eq!(count.trim(), "100000");
    let t = Instant::now();
    let back = psql(&host, port, "\\copy (SELECT * FROM orders ORDER BY id) TO STDOUT", None);
    let copied_out = t.elapsed();
    assert!(back == rows, "rows read back through the tunnel differ from the rows copied in");
    eprintln!("COPY 100,000 rows ({} bytes) in {copied_in:?}, out {copied_out:?}", rows.len());
    // The same data is visible directly on the server (the tunnel reached the real one).
    let direct = psql("127.0.0.1", pg.port, "SELECT sum(id) FROM orders", None);
    assert_eq!(direct.trim(), (0..100_000u64).sum::<u64>().to_string());
    drop(relay);
}

fn sha256_file(p: &std::path::Path) -> String {
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(p).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

#[test]
fn sftp_put_and_get_256_mib_through_the_tunnel() {
    let dir = test_dir("sftp");
    let sshd = Sshd::start(dir.path());
    let (relay, _agent, host, port) = through_tunnel(dir.path(), "files", sshd.port);

    let src = dir.path().join("upload.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).unwrap());
        let mut p = sluice_e2e::load::Payload::new(42);
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..256 {
            p.fill(&mut buf);
            f.write_all(&buf).unwrap();
        }
    }
    let remote = dir.path().join("remote.bin");
    let back = dir.path().join("download.bin");
    let batch = format!("put {} {}\nget {} {}\n", src.display(), remote.display(), remote.display(), back.display());
    let t = Instant::now();
    let out = sshd.sftp(&host, port, &batch, dir.path());
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "sftp failed: {}\n--- sshd ---\n{}\n--- relay ---\n{}",
        String::from_utf8_lossy(&out.stderr),
        sshd.proc.log_text(),
        relay.log()
    );
    let want = sha256_file(&src);
    assert_eq!(sha256_file(&remote), want, "uploaded file differs");
    assert_eq!(sha256_file(&back), want, "downloaded file differs");
    eprintln!("sftp put+get of 256 MiB through the tunnel in {secs:.2} s ({:.0} MiB/s)", 512.0 / secs);
}

//! The traffic of the benchmark: a tokio echo backend, the latency probe (fresh
//! connection, one byte echoed, close), the sustained new-stream rate (the same probe
//! from many threads at once), streams held open, and iperf3 runs.
//!
//! Every wait is bounded: sockets have connect and read timeouts, iperf3 is killed when
//! its run overruns, and the echo backend stops (with all its connections) on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tokio::task::{JoinHandle, JoinSet};

use super::procs::{self, Child};

const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// An echo server on 127.0.0.1:port: writes back whatever each connection sends.
pub struct EchoServer<'rt> {
    rt: &'rt Runtime,
    task: Option<JoinHandle<()>>,
}

impl<'rt> EchoServer<'rt> {
    pub fn start(rt: &'rt Runtime, port: u16) -> Result<EchoServer<'rt>> {
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .with_context(|| format!("echo backend: binding 127.0.0.1:{port}"))?;
        let task = rt.spawn(async move {
            // Dropping this set when the task is aborted aborts every connection too.
            let mut conns = JoinSet::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.set_nodelay(true);
                conns.spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n @ 1..) = s.read(&mut buf).await {
                        if s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(EchoServer { rt, task: Some(task) })
    }
}

impl Drop for EchoServer<'_> {
    /// Closes the listener and every connection before returning, so the port is free.
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = self.rt.block_on(task);
        }
    }
}

/// One echo round trip on a fresh connection; returns the open stream.
fn echo_once(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    if b[0] != b'x' {
        bail!("echoed byte {:#04x}, sent 'x'", b[0]);
    }
    Ok(s)
}

/// Waits until a byte echoes through `addr` (the tunnel is up end to end).
pub fn wait_echo(addr: SocketAddr, limit: Duration, tunnel: &mut [Child]) -> Result<()> {
    let mut last = String::new();
    procs::wait_for(limit, &format!("an echo through {addr}"), || {
        for c in tunnel.iter_mut() {
            c.check_running()?;
        }
        match echo_once(addr) {
            Ok(_) => Ok(Some(())),
            Err(e) => {
                last = e.to_string();
                std::thread::sleep(Duration::from_millis(150));
                Ok(None)
            }
        }
    })
    .with_context(|| format!("last error: {last}"))
}

/// Latency of connect + one echoed byte over `n` fresh connections, one at a time:
/// (p50, p99) in microseconds.
pub fn connect_echo_latency(addr: SocketAddr, n: usize) -> Result<(f64, f64)> {
    let mut us = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        let s = echo_once(addr).with_context(|| format!("connection {i} of {n}"))?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        drop(s);
    }
    us.sort_by(f64::total_cmp);
    Ok((percentile(&us, 0.50), percentile(&us, 0.99)))
}

/// What a sustained new-stream load saw (see [`connection_rate`]).
#[derive(Debug)]
pub struct ConnRate {
    /// Completed connect + echo + close cycles.
    pub ok: u64,
    /// Cycles that failed (any error or timeout).
    pub failed: u64,
    /// The first failure's text, if any.
    pub first_error: Option<String>,
    /// Completed cycles per second of the whole run.
    pub per_sec: f64,
    /// Connect + echo latency of the completed cycles, µs.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// A sustained new-stream load: `clients` threads, each looping connect, write 1 byte,
/// read it back, close, for `length` or until `max_cycles` cycles in all, whichever
/// comes first (each cycle also bounded by the socket timeouts).
pub fn connection_rate(addr: SocketAddr, clients: usize, length: Duration, max_cycles: u64) -> Result<ConnRate> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    let started = Instant::now();
    let deadline = started + length;
    let cycles = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let per_client: Vec<Vec<f64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| {
                    let mut us = Vec::new();
                    while Instant::now() < deadline && cycles.fetch_add(1, Ordering::Relaxed) < max_cycles {
                        let t = Instant::now();
                        match echo_once(addr) {
                            Ok(s) => {
                                us.push(t.elapsed().as_secs_f64() * 1e6);
                                drop(s);
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                first_error.lock().unwrap().get_or_insert_with(|| format!("{e:#}"));
                            }
                        }
                    }
                    us
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect()
    });
    let secs = started.elapsed().as_secs_f64();
    let mut us: Vec<f64> = per_client.into_iter().flatten().collect();
    if us.is_empty() {
        bail!("no connection completed: {}", first_error.into_inner().unwrap().unwrap_or_default());
    }
    us.sort_by(f64::total_cmp);
    Ok(ConnRate {
        ok: us.len() as u64,
        failed: failed.into_inner(),
        first_error: first_error.into_inner().unwrap(),
        per_sec: us.len() as f64 / secs,
        p50_us: percentile(&us, 0.50),
        p99_us: percentile(&us, 0.99),
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Opens `n` connections through `addr`, each having echoed one byte, and keeps them open.
pub fn open_streams(addr: SocketAddr, n: usize) -> Result<Vec<TcpStream>> {
    (0..n).map(|i| echo_once(addr).with_context(|| format!("open stream {i} of {n}"))).collect()
}

/// One iperf3 measurement through a tunnel.
pub struct Iperf {
    pub gbit_per_s: f64,
    pub bytes: u64,
}

/// Which way the bytes flow in an iperf3 run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Direction {
    /// Client → backend (iperf3's default: the client sends).
    Up,
    /// Backend → client (`-R`).
    Down,
}

/// One iperf3 run through a tunnel.
pub struct IperfRun<'a> {
    pub public_port: u16,
    pub backend_port: u16,
    pub streams: u32,
    pub direction: Direction,
    /// Length of the run (`-t`).
    pub secs: u32,
    /// Where the iperf3 server's output goes.
    pub log: &'a Path,
}

/// Runs an iperf3 server on 127.0.0.1:`backend_port` and a client against `public_port`.
pub fn iperf(run: &IperfRun) -> Result<Iperf> {
    let IperfRun { public_port, backend_port, streams, direction, secs, log } = *run;
    let mut server = Command::new("iperf3");
    server.args(["-s", "-B", "127.0.0.1", "-p", &backend_port.to_string()]);
    let server = Child::spawn("iperf3 server", server, log)?;
    procs::wait_for(Duration::from_secs(5), "the iperf3 server to listen", || {
        Ok(procs::is_listening(backend_port).then_some(()))
    })?;
    let mut client = Command::new("iperf3");
    client.args(["-c", "127.0.0.1", "-p", &public_port.to_string(), "-J", "--connect-timeout", "5000"]);
    client.args(["-t", &secs.to_string(), "-P", &streams.to_string()]);
    if direction == Direction::Down {
        client.arg("-R");
    }
    let limit = Duration::from_secs(u64::from(secs) + 30);
    let done = procs::run_within("iperf3 client", client, limit);
    drop(server);
    let done = done?;
    let report = parse_iperf_json(&done.stdout)?;
    done.ok("iperf3 client")?;
    Ok(report)
}

/// Reads what the receiving side counted from iperf3's `-J` report.
pub(super) fn parse_iperf_json(json: &str) -> Result<Iperf> {
    let v: serde_json::Value = serde_json::from_str(json).context("iperf3 printed no JSON")?;
    if let Some(err) = v["error"].as_str() {
        bail!("iperf3: {err}");
    }
    let rx = &v["end"]["sum_received"];
    match (rx["bits_per_second"].as_f64(), rx["bytes"].as_u64()) {
        (Some(bps), Some(bytes)) if bytes > 0 => Ok(Iperf { gbit_per_s: bps / 1e9, bytes }),
        _ => bail!("iperf3 reported no received bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.50), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    /// A blocking echo listener on a free port, serving each connection on a thread.
    fn std_echo() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut b = [0u8; 64];
                    while let Ok(n @ 1..) = s.read(&mut b) {
                        if s.write_all(&b[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[test]
    fn connection_rate_is_bounded_by_its_cycle_count() {
        let addr = std_echo();
        // A generous length: the cycle bound ends the load, not the clock.
        let r = connection_rate(addr, 4, Duration::from_secs(120), 40).unwrap();
        assert_eq!((r.ok, r.failed, r.first_error), (40, 0, None));
        assert!(r.p50_us <= r.p99_us && r.per_sec > 0.0);
    }

    #[test]
    fn connection_rate_counts_failures_with_the_first_error() {
        // Nothing listens there (a port just freed): every connect is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = connection_rate(SocketAddr::from(([127, 0, 0, 1], port)), 2, Duration::from_secs(120), 10);
        let text = format!("{:#}", err.unwrap_err());
        assert!(text.contains("no connection completed") && text.contains("refused"), "{text}");
    }

    #[test]
    fn iperf_report_errors_and_sums() {
        assert!(parse_iperf_json(r#"{"error":"unable to connect"}"#).is_err());
        let ok = r#"{"end":{"sum_received":{"bits_per_second":4.0e9,"bytes":2500000000}}}"#;
        let r = parse_iperf_json(ok).unwrap();
        assert_eq!((r.gbit_per_s, r.bytes), (4.0, 2_500_000_000));
    }
}

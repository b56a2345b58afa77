//! `cargo xtask profile-streams`: where a new stream's time and CPU go, on this machine.
//!
//! Starts Sluice's release relay and agent on loopback with an echo backend (as
//! bench-peers does), then:
//!
//! 1. **Timeline**: `perf trace` of both processes' socket system calls while one client
//!    opens streams one after another (connect, 1 byte, echo, close); prints every call
//!    of one stream from the middle of the run, in µs from the relay's `accept4` of the
//!    client, so the steps (StreamOpen written, backend connect, reply, first byte each
//!    way, the replacement connection's handshake) can be read off. `perf trace` adds
//!    some µs to every call: read the order and the gaps, not absolute totals.
//! 2. **CPU profile**: `perf record -g` of both processes while 16 clients open streams
//!    for 5 s; prints the rate and the share of samples per group (public-key
//!    signatures, key exchange, hashing, AEAD, allocator, kernel, the rest).
//! 3. **System calls**: `perf stat -e raw_syscalls:sys_enter` of both processes per
//!    1-byte round trip on one stream (20,000 of them) and per GiB moved (1 GiB each way
//!    on one stream, echoed).
//!
//! Needs `perf` (linux-perf) and root or `kernel.perf_event_paranoid` ≤ 1. Logs and raw
//! perf output stay in `<target>/profile-streams/`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use super::load::{self, EchoServer};
use super::procs;

pub const USAGE: &str = "  profile-streams [--no-build]\n                  \
     one stream's syscall timeline through Sluice (perf trace) and where a new stream's CPU goes (perf record)";

/// Symbol groups of the CPU profile, first match wins (user-space symbols only).
const GROUPS: &[(&str, &[&str])] = &[
    ("signatures (ECDSA P-256 sign/verify)", &["nistz256", "ecp_", "beeu", "p256", "ecdsa", "bn_", "BN_"]),
    ("key exchange (X25519)", &["x25519", "curve25519"]),
    ("key exchange (ML-KEM) and SHA-3", &["mlk", "keccak", "SHAKE", "sha3", "mlkem"]),
    ("SHA-2, HMAC, HKDF", &["sha256", "sha512", "SHA256", "SHA512", "HMAC", "hmac", "hkdf"]),
    ("AES-GCM", &["aes", "gcm", "ghash", "AES"]),
    ("allocator and memcpy", &["malloc", "free", "_int_", "realloc", "memmove", "memcpy", "memset", "unlink_chunk"]),
];

pub fn cli(root: &Path, args: &[String]) -> Result<()> {
    let mut build = true;
    for a in args {
        match a.as_str() {
            "--no-build" => build = false,
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if Command::new("perf").arg("--version").output().is_err() {
        bail!("perf is not installed (Debian: apt-get install linux-perf)");
    }
    if build {
        crate::run(
            "build release binaries",
            crate::cargo().args(["build", "--release", "--workspace", "--exclude", crate::EBPF_CRATE, "--bins"]),
        )?;
    }
    let target = super::target_dir(root);
    let bins = target.join("release");
    let dir = target.join("profile-streams");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let backend = procs::free_port()?;
    let _echo = EchoServer::start(&rt, backend)?;
    let mut tunnel = super::sluice::start(&bins, backend, &dir)?;
    let addr: SocketAddr = ([127, 0, 0, 1], tunnel.public_port).into();
    load::wait_echo(addr, Duration::from_secs(30), &mut tunnel.procs)?;
    let pids: Vec<String> = tunnel.procs.iter().map(|p| p.pid().to_string()).collect();
    let pids = pids.join(",");
    // Warm up: the pool at its resting size, tickets in the agent's cache.
    load::connect_echo_latency(addr, 200)?;

    eprintln!("==> timeline: perf trace while 1 client opens streams one after another");
    let trace_out = dir.join("trace.txt");
    let mut trace = Command::new("perf")
        .args(["trace", "-p", &pids, "-e", "accept4,connect,recvfrom,sendto,writev,readv,shutdown,close", "-o"])
        .arg(&trace_out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf trace")?;
    std::thread::sleep(Duration::from_millis(700));
    let (p50, p99) = load::connect_echo_latency(addr, 400)?;
    std::thread::sleep(Duration::from_millis(300));
    stop(&mut trace);
    println!("connect + echo under perf trace, 400 streams: p50 {p50:.0} µs, p99 {p99:.0} µs");
    let text = std::fs::read_to_string(&trace_out).context("reading perf trace output")?;
    print_one_stream(&text, tunnel.public_port)?;

    eprintln!("==> CPU: perf record -g while 16 clients open streams for 5 s");
    let data = dir.join("perf.data");
    let mut record = Command::new("perf")
        .args(["record", "-F", "2000", "-g", "-p", &pids, "-o"])
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf record")?;
    std::thread::sleep(Duration::from_millis(500));
    let rate = load::connection_rate(addr, 16, Duration::from_secs(5), 1_000_000)?;
    stop(&mut record);
    println!(
        "16 clients: {:.0} new streams/s ({} ok, {} failed), p50 {:.0} µs, p99 {:.0} µs (under perf record)",
        rate.per_sec, rate.ok, rate.failed, rate.p50_us, rate.p99_us
    );
    let report = Command::new("perf")
        .args(["report", "--no-children", "--sort", "sym", "--stdio", "-g", "none", "-i"])
        .arg(&data)
        .output()
        .context("perf report")?;
    print_groups(&String::from_utf8_lossy(&report.stdout));

    eprintln!("==> syscalls: perf stat of relay + agent per round trip and per GiB");
    let trips = 20_000;
    let (calls, secs) = count_syscalls(&pids, &dir, || round_trips(addr, trips))?;
    println!(
        "{trips} 1-byte round trips on one stream: {:.1} syscalls per round trip (relay + agent), {:.0} µs per round trip",
        calls / trips as f64,
        secs * 1e6 / trips as f64
    );
    let mib = 1024;
    let (calls, secs) = count_syscalls(&pids, &dir, || bulk_echo(addr, mib))?;
    let gib_moved = 2.0 * mib as f64 / 1024.0;
    println!(
        "{mib} MiB each way on one stream: {:.0} syscalls per GiB moved (relay + agent), {:.2} Gbit/s per direction",
        calls / gib_moved,
        mib as f64 * 8.0 * 1.048_576e6 / 1e9 / secs
    );
    println!("raw output: {}", dir.display());
    Ok(())
}

/// Runs `load` while `perf stat` counts the system calls `pids` enter; returns the count
/// and the load's duration in seconds.
fn count_syscalls(pids: &str, dir: &Path, load: impl FnOnce() -> Result<()>) -> Result<(f64, f64)> {
    let out = dir.join("perf-stat.csv");
    let mut stat = Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p", pids, "-o"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting perf stat")?;
    std::thread::sleep(Duration::from_millis(500));
    let t = std::time::Instant::now();
    load()?;
    let secs = t.elapsed().as_secs_f64();
    stop(&mut stat);
    let text = std::fs::read_to_string(&out).context("reading perf stat output")?;
    let calls = text
        .lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next()?.trim().parse::<f64>().ok())
        .with_context(|| format!("no syscall count in perf stat output: {text}"))?;
    Ok((calls, secs))
}

/// One stream, `n` times: write 1 byte, read the echo.
fn round_trips(addr: SocketAddr, n: usize) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut b = [0u8; 1];
    for i in 0..n {
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        if b[0] != i as u8 {
            bail!("round trip {i}: echoed the wrong byte");
        }
    }
    Ok(())
}

/// One stream: `mib` MiB sent while the echo comes back on another thread.
fn bulk_echo(addr: SocketAddr, mib: usize) -> Result<()> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = s.try_clone()?;
    let total = mib << 20;
    let reader = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0;
        while got < total {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok(got)
    });
    let chunk = vec![0x5au8; 1 << 16];
    for _ in 0..(total >> 16) {
        s.write_all(&chunk)?;
    }
    let got = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    if got != total {
        bail!("echoed {got} of {total} bytes");
    }
    Ok(())
}

/// Stops a perf child with SIGINT so it writes its output, and waits for it.
fn stop(child: &mut std::process::Child) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let _ = child.wait();
}

/// The inode of the socket listening on 127.0.0.1:`port` (from /proc/net/tcp), which
/// `perf trace` prints with every call on it (`fd: 11<socket:[INODE]>`).
fn listener_inode(port: u16) -> Result<String> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 9 && f[1].ends_with(&want) && f[3] == "0A")
        .map(|f| f[9].to_owned())
        .with_context(|| format!("no socket listens on port {port}"))
}

/// Prints the calls between the relay's accept of one client (from the middle of the
/// run) and its next accept of a client, with times relative to the first.
fn print_one_stream(trace: &str, public_port: u16) -> Result<()> {
    let listener = format!("<socket:[{}]>", listener_inode(public_port)?);
    let lines: Vec<&str> = trace.lines().collect();
    let client_accepts: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("accept4(") && l.contains(&listener) && !l.contains("EAGAIN"))
        .map(|(i, _)| i)
        .collect();
    if client_accepts.len() < 3 {
        bail!("perf trace saw only {} client accepts (is perf trace allowed here?)", client_accepts.len());
    }
    let mid = client_accepts.len() / 2;
    let (from, to) = (client_accepts[mid], client_accepts[mid + 1]);
    let t0 = time_ms(lines[from]).unwrap_or(0.0);
    // perf trace writes each thread's calls in bursts: order the window by time.
    let mut calls: Vec<(f64, &str)> = lines[from..to]
        .iter()
        .filter(|l| !l.contains("EAGAIN") && !l.contains("[continued]"))
        .filter_map(|l| Some((time_ms(l)?, *l)))
        .collect();
    calls.sort_by(|a, b| a.0.total_cmp(&b.0));
    println!("one stream (relay accept4 = 0 µs; calls that returned EAGAIN left out):");
    for (t, l) in calls {
        // "<time> ( <dur> ms): <thread>/<tid> <call>"
        let call = l.split_once("): ").map(|(_, c)| c).unwrap_or(l);
        println!("  {:>7.0} µs  {}", (t - t0) * 1000.0, shorten(call));
    }
    Ok(())
}

fn time_ms(line: &str) -> Option<f64> {
    line.split_whitespace().next()?.parse().ok()
}

fn shorten(call: &str) -> String {
    let c: String = call.split_whitespace().collect::<Vec<_>>().join(" ");
    if c.chars().count() > 110 { format!("{}…", c.chars().take(110).collect::<String>()) } else { c }
}

/// Sums `perf report --sort sym` percentages into [`GROUPS`], the kernel and the rest.
fn print_groups(report: &str) {
    let mut sums = vec![0.0f64; GROUPS.len()];
    let (mut kernel, mut other) = (0.0, 0.0);
    for line in report.lines() {
        let mut words = line.split_whitespace();
        let (Some(pct), Some(kind), Some(sym)) = (words.next(), words.next(), words.next()) else { continue };
        let Some(pct) = pct.strip_suffix('%').and_then(|p| p.parse::<f64>().ok()) else { continue };
        if kind == "[k]" {
            kernel += pct;
            continue;
        }
        match GROUPS.iter().position(|(_, pats)| pats.iter().any(|p| sym.contains(p))) {
            Some(i) => sums[i] += pct,
            None => other += pct,
        }
    }
    println!("CPU samples of relay + agent, by group:");
    for ((name, _), s) in GROUPS.iter().zip(&sums) {
        println!("  {s:>5.1} %  {name}");
    }
    println!("  {kernel:>5.1} %  kernel (TCP, wakeups, syscalls)");
    println!("  {other:>5.1} %  everything else in user space (rustls, tokio, Sluice)");
}

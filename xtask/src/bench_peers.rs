//! `cargo xtask bench-peers`: Sluice side by side with peer tunnels on this machine.
//!
//! Every tunnel gets the same topology on loopback (127.0.0.1 only): client → public
//! port → tunnel → private backend. The peers are iperf3 straight to the backend (no
//! tunnel: the limit), socat (one plain TCP hop), an stunnel TLS 1.3 pair with client
//! certificates, rathole with its TLS transport, bore (no encryption), and Sluice's
//! real `sluice serve` relay and `sluice-agent` from the release build.
//!
//! For each tunnel and repetition, one fresh tunnel is started with a tokio echo server
//! as its backend: the agent's RSS idle, connect + one echoed byte latency over fresh
//! connections, the sustained new-stream rate (16 clients connecting, echoing a byte
//! and closing in a loop), and the agent's RSS with many streams held open. Then the
//! echo server makes way for an iperf3 server on the same backend port, and iperf3
//! measures throughput with 1 and 8 streams in both directions, while the CPU time of
//! all the tunnel's processes is counted. Then a real PostgreSQL server takes the
//! backend port and `pgbench -S` measures small request/response transactions through
//! the tunnel. Repetitions go round-robin over the tunnels.
//!
//! Pieces: [`install`] gets the peers, [`peers`] and [`sluice`] start tunnels,
//! [`load`] makes the traffic, [`postgres`] runs PostgreSQL and pgbench, [`procs`] runs
//! processes and reads `/proc`, [`report`] builds the tables and the docs section,
//! [`machine`] describes the machine.
//! Logs of the last run stay in `<target>/bench-peers/run/`.

mod ebpf;
mod install;
mod load;
mod machine;
mod peers;
mod postgres;
mod procs;
pub mod profile;
mod report;
mod sluice;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use load::{Direction, EchoServer, IperfRun};
use peers::{Peer, Setup, Tunnel};
use postgres::Cluster;
use report::{Metric, PeerResults};

const GIB: f64 = (1u64 << 30) as f64;

/// No new tunnel repetition starts after this much measuring (the run must stay under
/// 15 minutes on 2 cores, even when the machine is busy); skipped ones are noted.
const MEASURE_BUDGET: Duration = Duration::from_secs(12 * 60);

pub const USAGE: &str = "  bench-peers [--quick] [--no-build] [--release] [--no-docs] [--no-ebpf] [--peers a,b,…]\n                  \
     Sluice vs iperf3 direct, socat, stunnel, rathole, bore on loopback; writes docs/benchmarks.md\n                  \
     (--quick: 1 short repetition, docs left alone; --no-ebpf: skip the eBPF counter's cost;\n                  \
     Sluice's binaries are the shipped ones, `cargo xtask dist`, unless --release: target/release)";

/// How much to measure.
struct Settings {
    reps: usize,
    /// iperf3 run length (`-t`).
    secs: u32,
    latency_conns: usize,
    open_streams: usize,
    /// Length of the sustained new-stream load.
    rate_secs: u64,
    /// `pgbench -S -T`.
    pgbench_secs: u32,
}

const FULL: Settings =
    Settings { reps: 3, secs: 5, latency_conns: 2000, open_streams: 200, rate_secs: 10, pgbench_secs: 10 };
const QUICK: Settings =
    Settings { reps: 1, secs: 1, latency_conns: 300, open_streams: 200, rate_secs: 2, pgbench_secs: 2 };

/// Concurrent clients of the sustained new-stream load.
const RATE_CLIENTS: usize = 16;
/// At most this many connect + echo + close cycles per load, whatever its length.
const RATE_MAX_CYCLES: u64 = 1_000_000;
/// Clients of `pgbench -S`.
const PGBENCH_CLIENTS: u32 = 4;

struct Options {
    quick: bool,
    build: bool,
    /// Measure `target/release/` (a quick A/B of a change) instead of the shipped
    /// binaries in `target/dist/` (static, fat LTO).
    release: bool,
    docs: bool,
    /// Measure the eBPF counter's own cost (needs root and bpftool; Sluice among the peers).
    ebpf: bool,
    peers: Vec<Peer>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o =
            Options { quick: false, build: true, release: false, docs: true, ebpf: true, peers: Peer::ALL.to_vec() };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--no-build" => o.build = false,
                "--release" => o.release = true,
                "--no-docs" => o.docs = false,
                "--no-ebpf" => o.ebpf = false,
                "--peers" => {
                    let list = it.next().context("--peers needs a comma-separated list")?;
                    o.peers = list.split(',').map(Peer::from_key).collect::<Result<_>>()?;
                }
                other => bail!("unknown option {other:?}\nusage:\n{USAGE}"),
            }
        }
        o.docs &= !o.quick;
        Ok(o)
    }
}

/// Entry point of `cargo xtask bench-peers`.
pub fn cli(root: &Path, args: &[String]) -> Result<()> {
    let opts = Options::parse(args)?;
    let settings = if opts.quick { QUICK } else { FULL };
    let started = Instant::now();
    let load_before = machine::load_average();
    let target = target_dir(root);
    if opts.build && opts.release {
        crate::run(
            "build release binaries",
            crate::cargo().args(["build", "--release", "--workspace", "--exclude", crate::EBPF_CRATE, "--bins"]),
        )?;
    } else if opts.build {
        crate::dist::dist(root, true).context("building the shipped binaries (cargo xtask dist)")?;
    }
    let run_dir = target.join("bench-peers").join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let (setup, mut results) = prepare(root, &target, &run_dir, &opts)?;
    eprintln!("==> PostgreSQL for pgbench: initdb, pgbench -i -s 1");
    let pg = Cluster::init(&run_dir).map_err(|e| format!("{e:#}"));
    if let Err(e) = &pg {
        eprintln!("    no pgbench figures: {e}");
    }
    let skipped = run_rounds(&setup, &settings, &run_dir, pg.as_ref(), &mut results)?;
    let sluice_ran = results.iter().any(|(p, r)| *p == Peer::Sluice && r.unavailable.is_none());
    let ebpf = if opts.ebpf && sluice_ran {
        eprintln!("==> eBPF counting cost (kernel.bpf_stats_enabled=1, 1 GiB each way)");
        Some(ebpf::section(&setup.sluice_bins, &run_dir.join("ebpf")))
    } else {
        None
    };
    let ctx = RunFacts { root, opts: &opts, settings: &settings, setup: &setup, load_before, started, skipped };
    let mut body = render(&results, &ctx);
    if let Some(section) = ebpf {
        body += &format!("\n{section}");
    }
    println!("\n{body}");
    publish(root, &opts, &body)?;
    eprintln!("bench-peers: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// All repetitions, round-robin over the available tunnels (never all repetitions of
/// one tunnel back to back); returns how many tunnel repetitions the budget skipped.
fn run_rounds(
    setup: &Setup,
    s: &Settings,
    run_dir: &Path,
    pg: Result<&Cluster, &String>,
    results: &mut [(Peer, PeerResults)],
) -> Result<usize> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let measuring = Instant::now();
    let mut skipped = 0;
    for rep in 0..s.reps {
        for (peer, r) in results.iter_mut().filter(|(_, r)| r.unavailable.is_none()) {
            if measuring.elapsed() > MEASURE_BUDGET {
                skipped += 1;
                continue;
            }
            eprintln!("==> {} (repetition {}/{})", peer.label(), rep + 1, s.reps);
            let dir = run_dir.join(format!("{}-{rep}", peer.key()));
            measure(&rt, *peer, setup, s, &dir, pg, r);
        }
    }
    Ok(skipped)
}

/// Writes the section into docs/benchmarks.md (full runs only).
fn publish(root: &Path, opts: &Options, body: &str) -> Result<()> {
    if !opts.docs {
        eprintln!("docs/benchmarks.md left unchanged ({})", if opts.quick { "--quick" } else { "--no-docs" });
        return Ok(());
    }
    let docs = root.join("docs/benchmarks.md");
    report::write_docs(&docs, body)?;
    eprintln!("wrote the bench-peers section of {}", docs.display());
    Ok(())
}

/// The cargo target directory: `CARGO_TARGET_DIR` when set, else `<workspace>/target`.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

/// Installs the peers, makes the certificates, and finds out which peers can run.
fn prepare(root: &Path, target: &Path, run_dir: &Path, opts: &Options) -> Result<(Setup, Vec<(Peer, PeerResults)>)> {
    let wanted = &opts.peers[..];
    let apt_error = install::debian_packages(root);
    if !install::on_path("iperf3") {
        bail!("iperf3 is missing and it generates the load: {}", apt_error.unwrap_or_default());
    }
    let apt_why = |program: &str| {
        format!("{program} not installed ({})", apt_error.as_deref().unwrap_or("scripts/install-bench-peers.sh"))
    };
    let tools = target.join("bench-peers").join("tools");
    let tool = |peer: Peer, krate: &str, bin: &str| {
        if wanted.contains(&peer) {
            install::cargo_tool(&tools, krate, bin).map_err(|e| format!("{e:#}"))
        } else {
            Err(String::new())
        }
    };
    let (rathole, bore) = (tool(Peer::Rathole, "rathole", "rathole"), tool(Peer::Bore, "bore-cli", "bore"));
    let certs = run_dir.join("certs");
    let certs_ok = if install::on_path("openssl") {
        peers::make_certs(&certs).map_err(|e| format!("certificates: {e:#}"))
    } else {
        Err(apt_why("openssl"))
    };
    let (sluice_bins, how) = if opts.release {
        (target.join("release"), "cargo build --release --bins")
    } else {
        (target.join("dist"), "cargo xtask dist")
    };
    let sluice_ok = match ["sluice", "sluice-agent"].iter().find(|b| !sluice_bins.join(b).is_file()) {
        Some(b) => Err(format!("{} is missing (build: {how})", sluice_bins.join(b).display())),
        None => Ok(()),
    };
    let mut results = Vec::new();
    for &peer in wanted {
        let available: Result<(), String> = match peer {
            Peer::Direct => Ok(()),
            Peer::Socat => install::on_path("socat").then_some(()).ok_or_else(|| apt_why("socat")),
            Peer::Stunnel => {
                install::on_path("stunnel4").then_some(()).ok_or_else(|| apt_why("stunnel4")).and(certs_ok.clone())
            }
            Peer::Rathole => rathole.as_ref().map(|_| ()).map_err(Clone::clone).and(certs_ok.clone()),
            Peer::Bore => bore.as_ref().map(|_| ()).map_err(Clone::clone),
            Peer::Sluice => sluice_ok.clone(),
        };
        results.push((peer, PeerResults { unavailable: available.err(), ..Default::default() }));
    }
    let setup = Setup { rathole: rathole.unwrap_or_default(), bore: bore.unwrap_or_default(), sluice_bins, certs };
    Ok((setup, results))
}

/// One repetition for one tunnel: start it, measure everything, stop it.
fn measure(
    rt: &tokio::runtime::Runtime,
    peer: Peer,
    setup: &Setup,
    s: &Settings,
    dir: &Path,
    pg: Result<&Cluster, &String>,
    r: &mut PeerResults,
) {
    let started = procs::free_port().and_then(|backend| {
        let echo = EchoServer::start(rt, backend)?;
        let tunnel = peers::start(peer, setup, backend, dir).context("starting the tunnel")?;
        Ok((backend, echo, tunnel))
    });
    let (backend, echo, mut tunnel) = match started {
        Ok(x) => x,
        Err(e) => return r.error(format!("{e:#}")),
    };
    let public = SocketAddr::from(([127, 0, 0, 1], tunnel.public_port));
    if let Err(e) = load::wait_echo(public, Duration::from_secs(30), &mut tunnel.procs) {
        return r.error(format!("the tunnel never echoed: {e:#}"));
    }
    measure_echo(&tunnel, public, s, r);
    measure_conn_rate(public, s, r);
    drop(echo);
    measure_throughput(&mut tunnel, backend, s, dir, r);
    match pg {
        Ok(cluster) => measure_pgbench(cluster, backend, public, s, r),
        Err(e) => r.record(Metric::PgTps, Err(anyhow::anyhow!("{e}"))),
    }
    if let (Some(port), None) = (tunnel.tls_port, &r.tls) {
        match peers::tls_probe(setup, port) {
            Ok(tls) => r.tls = Some(tls),
            Err(e) => r.error(format!("TLS probe: {e:#}")),
        }
    }
}

/// Records a value and prints it as it comes.
fn put(r: &mut PeerResults, m: Metric, v: Result<f64>) {
    match &v {
        Ok(x) => eprintln!("    {m:?}: {x:.2}"),
        Err(e) => eprintln!("    {m:?}: FAILED: {e:#}"),
    }
    r.record(m, v);
}

/// The agent's RSS idle and with open streams, and connect + echo latency.
fn measure_echo(tunnel: &Tunnel, public: SocketAddr, s: &Settings, r: &mut PeerResults) {
    let rss_mib = |pid: u32| procs::tree_rss_kib(pid).map(|k| k as f64 / 1024.0);
    std::thread::sleep(Duration::from_secs(1));
    if let Some(pid) = tunnel.agent_pid() {
        put(r, Metric::RssIdle, rss_mib(pid));
    }
    match load::connect_echo_latency(public, s.latency_conns) {
        Ok((p50, p99)) => {
            put(r, Metric::LatencyP50, Ok(p50));
            put(r, Metric::LatencyP99, Ok(p99));
        }
        Err(e) => put(r, Metric::LatencyP50, Err(e)),
    }
    match load::open_streams(public, s.open_streams) {
        Ok(streams) => {
            std::thread::sleep(Duration::from_secs(1));
            if let Some(pid) = tunnel.agent_pid() {
                put(r, Metric::RssOpen, rss_mib(pid));
            }
            drop(streams);
        }
        Err(e) => put(r, Metric::RssOpen, Err(e)),
    }
}

/// The sustained new-stream rate: [`RATE_CLIENTS`] clients each connecting, echoing
/// one byte and closing in a loop; successes per second, their p99, the failures.
fn measure_conn_rate(public: SocketAddr, s: &Settings, r: &mut PeerResults) {
    match load::connection_rate(public, RATE_CLIENTS, Duration::from_secs(s.rate_secs), RATE_MAX_CYCLES) {
        Ok(rate) => {
            eprintln!("    new-stream load: {} completed, {} failed", rate.ok, rate.failed);
            put(r, Metric::ConnRate, Ok(rate.per_sec));
            put(r, Metric::ConnRateP50, Ok(rate.p50_us));
            put(r, Metric::ConnRateP99, Ok(rate.p99_us));
            put(r, Metric::ConnFailed, Ok(rate.failed as f64));
            if let Some(e) = rate.first_error {
                r.error(format!("new-stream load: {} of {} failed, first: {e}", rate.failed, rate.ok + rate.failed));
            }
        }
        Err(e) => put(r, Metric::ConnRate, Err(e)),
    }
}

/// PostgreSQL on the backend port (iperf3 has freed it) and `pgbench -S` through the tunnel.
fn measure_pgbench(pg: &Cluster, backend: u16, public: SocketAddr, s: &Settings, r: &mut PeerResults) {
    let tps = pg.serve(backend).and_then(|server| {
        let tps = postgres::select_only(public.port(), PGBENCH_CLIENTS, s.pgbench_secs);
        drop(server);
        tps
    });
    put(r, Metric::PgTps, tps);
}

/// iperf3 with 1 and 8 streams both ways; CPU-seconds per GiB over the four runs.
fn measure_throughput(tunnel: &mut Tunnel, backend: u16, s: &Settings, dir: &Path, r: &mut PeerResults) {
    let pids = tunnel.pids();
    let (mut cpu, mut bytes) = (0.0, 0u64);
    let runs = [(Metric::Up1, 1, Direction::Up), (Metric::Down1, 1, Direction::Down)];
    let runs = runs.into_iter().chain([(Metric::Up8, 8, Direction::Up), (Metric::Down8, 8, Direction::Down)]);
    for (metric, streams, direction) in runs {
        let cpu0 = procs::tree_cpu_secs(&pids);
        let log = dir.join(format!("iperf3-server-{metric:?}.log"));
        let run = IperfRun {
            public_port: tunnel.public_port,
            backend_port: backend,
            streams,
            direction,
            secs: s.secs,
            log: &log,
        };
        let result = load::iperf(&run);
        let used = procs::tree_cpu_secs(&pids) - cpu0;
        let result = result.map(|x| {
            cpu += used;
            bytes += x.bytes;
            x.gbit_per_s
        });
        let result = result.map_err(|e| match tunnel.procs.iter_mut().find_map(|p| p.check_running().err()) {
            Some(dead) => e.context(format!("tunnel died: {dead:#}")),
            None => e,
        });
        put(r, metric, result);
    }
    if !pids.is_empty() && bytes > 0 {
        put(r, Metric::CpuPerGib, Ok(cpu / (bytes as f64 / GIB)));
    }
}

/// Facts about the run for the report's header.
struct RunFacts<'a> {
    root: &'a Path,
    opts: &'a Options,
    settings: &'a Settings,
    setup: &'a Setup,
    load_before: String,
    started: Instant,
    skipped: usize,
}

/// The bench-peers section: header, method, tables, notes.
fn render(results: &[(Peer, PeerResults)], f: &RunFacts) -> String {
    let s = f.settings;
    let mut flags = String::new();
    if f.opts.quick {
        flags += " --quick";
    }
    if !f.opts.build {
        flags += " --no-build";
    }
    if f.opts.release {
        flags += " --release";
    }
    let mut out =
        format!("## `cargo xtask bench-peers{flags}` ({}, commit {})\n\n", machine::now_utc(), machine::commit(f.root));
    out += &format!(
        "Machine: {}. Load average (1 min) {} before the run, {} after; the run took {:.1} min. \
         Versions: {}.\n\n",
        machine::describe(),
        f.load_before,
        machine::load_average(),
        f.started.elapsed().as_secs_f64() / 60.0,
        versions(f.setup, results)
    );
    out += &format!(
        "Sluice's binaries: {} ({}){}.\n\n",
        f.setup.sluice_bins.display(),
        if f.opts.release {
            "a release build, `--release`"
        } else {
            "the shipped ones from `cargo xtask dist`: static, fat LTO, stripped"
        },
        if f.opts.build { "" } else { ", used as found, not rebuilt by this run (`--no-build`)" }
    );
    out += &method(s);
    out += &report::results_table(results, &Metric::BULK, s.open_streams);
    if let Some(ratios) = report::ratio_table(results, &Metric::BULK, s.open_streams) {
        out += "\nSluice's median divided by each peer's (throughput: above 1× Sluice is faster; CPU, latency, \
                RSS: below 1× Sluice uses less):\n\n";
        out += &ratios;
    }
    out += "\nNew streams and small messages:\n\n";
    out += &report::results_table(results, &Metric::SMALL, s.open_streams);
    if let Some(ratios) = report::ratio_table(results, &Metric::SMALL, s.open_streams) {
        out += "\nSluice's median divided by each peer's (streams/s, tps: above 1× Sluice is faster; p50, p99: \
                below 1× Sluice is faster):\n\n";
        out += &ratios;
    }
    let mut notes = report::notes(results);
    if f.skipped > 0 {
        notes += &format!(
            "- {} tunnel repetitions skipped: the {} min measuring budget ran out\n",
            f.skipped,
            MEASURE_BUDGET.as_secs() / 60
        );
    }
    if !notes.is_empty() {
        out += &format!("\nFailures and skips:\n\n{notes}");
    }
    out
}

fn method(s: &Settings) -> String {
    format!(
        "Everything on loopback on this one machine: client, both tunnel ends and backend share the cores, so \
         tunnels that use more CPU also slow their own load generator. Per tunnel and repetition one fresh \
         tunnel: **throughput** by iperf3 through it (`-t {secs}`, `-P 1` and `-P 8`; → client→backend, ← \
         backend→client with `-R`; the receiver's count), the iperf3 server as the backend; **CPU-s/GiB**: \
         utime+stime (with reaped children) of all the tunnel's processes, both ends, over those four runs ÷ \
         GiB received; **connect+echo**: {conns} fresh connections one after another, each connect, write 1 \
         byte, read it back from a tokio echo backend, close; **agent RSS**: VmRSS of the private-side end \
         (stunnel server, rathole client, `bore local`, `sluice-agent`; socat: its whole process tree, one \
         forked process per connection, shared pages counted in each) 1 s after the tunnel first echoed, and \
         with {open} connections held open, each having echoed a byte. **probe**: `openssl s_client` against the \
         TLS server end of stunnel and rathole (what their OpenSSL client ends get by default). \
         **new streams/s**: {clients} client threads for {rate_secs} s (at most {max_cycles} cycles in all), each \
         looping connect, write 1 byte, read it back from the echo backend, close (5 s connect and read \
         timeouts); completed cycles ÷ the load's wall time, the p50 and p99 of those cycles' connect+echo time, and \
         the cycles that failed (any error or timeout; the first error is in the notes). **pgbench -S**: a real \
         PostgreSQL ({pg}, fsync off, trust authentication, initialised once per run with `pgbench -i -s 1`) \
         takes the backend port after iperf3, and `pgbench -S -n -c {pg_clients} -T {pg_secs}` (select-only: one \
         primary-key SELECT per transaction, a few hundred bytes each way; one pgbench thread; no TLS between \
         pgbench and PostgreSQL other than the tunnel's own) runs through the tunnel; tps excluding the \
         connection time. {reps} repetition(s), round-robin over the tunnels; cells are median \
         (min–max). Each peer runs with its defaults (cipher suites included).\n\n",
        secs = s.secs,
        conns = s.latency_conns,
        open = s.open_streams,
        reps = s.reps,
        clients = RATE_CLIENTS,
        rate_secs = s.rate_secs,
        max_cycles = RATE_MAX_CYCLES,
        pg = "Debian's postgresql",
        pg_clients = PGBENCH_CLIENTS,
        pg_secs = s.pgbench_secs,
    )
}

/// The version of each peer that ran.
fn versions(setup: &Setup, results: &[(Peer, PeerResults)]) -> String {
    let ran = |p: Peer| results.iter().any(|(q, r)| *q == p && r.unavailable.is_none());
    let mut v = vec![format!("iperf3 {}", machine::version(Path::new("iperf3"), &["--version"]))];
    if ran(Peer::Socat) {
        v.push(format!("socat {}", machine::version(Path::new("socat"), &["-V"])));
    }
    if ran(Peer::Stunnel) {
        v.push(format!("stunnel {}", machine::version(Path::new("stunnel4"), &["-version"])));
    }
    if ran(Peer::Rathole) {
        v.push(format!("rathole {}", machine::version(&setup.rathole, &["--version"])));
    }
    if ran(Peer::Bore) {
        v.push(format!("bore-cli {}", machine::version(&setup.bore, &["--version"])));
    }
    if ran(Peer::Sluice) {
        v.push(format!("sluice {}", machine::version(&setup.sluice_bins.join("sluice"), &["--version"])));
    }
    if results.iter().any(|(_, r)| r.values.contains_key(&Metric::PgTps)) {
        v.push(postgres::versions());
    }
    v.join(", ")
}

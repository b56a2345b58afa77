//! `sluice-vm-driver`: the end-to-end test of the real `sluice` and `sluice-agent`
//! binaries inside the kTLS VM (`cargo xtask vm-test`), and the data-path benchmark
//! (`cargo xtask vm-bench`).
//!
//! ```text
//! sluice-vm-driver e2e   [--mib N] [--compare-mib N]
//! sluice-vm-driver rekey [--mib N]
//! sluice-vm-driver bench [--mib N] [--engines splice,uring,threads,copy,userspace]
//! ```
//!
//! It starts a backend (the private service), the relay, a customer and registration
//! JWT (admin CLI), and the agent, then drives streams through the relay's resource port
//! (see [`checks`]). Results follow the VM harness protocol: `PASS <name> …` and
//! `FAIL <name> …` lines (the host counts them), `INFO …` lines for people; the exit
//! code is 1 if anything failed.
//!
//! `e2e` runs the relay with `--heartbeat-secs 1` (a silent peer is dead after 3 s) and
//! checks, in order: `bulk` (N MiB each way at once, SHA-256 both ends), `heartbeat` (the
//! control session lived through the bulk transfer), `half_close`, `abort_backend`,
//! `abort_client`, `path` (every stream on kernel TLS on both binaries, no payload copied
//! through user space), `latency` (a smaller transfer with netem delaying `lo` by 100 ms,
//! a 200 ms round trip), `compare` (relay + agent restarted with
//! `SLUICE_DATA_PATH=userspace`, the same transfer at `--compare-mib`, CPU per GiB side
//! by side), and `rekey_unsupported` (the relay on rustls sending a TLS KeyUpdate every
//! 256 records, `SLUICE_TLS_KEY_UPDATE_RECORDS`, to an agent on kTLS; an 8 MiB request
//! and FIN whose reply the backend sends only after the whole request: on a kernel before
//! 6.14 the stream must abort with an error at the client and the backend, never a clean
//! short EOF, and the agent must log why, a line containing `KeyUpdate`; skipped with an
//! `INFO` line on a newer kernel).
//!
//! `rekey`, for a kernel >= 6.14 (kTLS takes new keys on a live socket), runs
//! `rekey_agent_ktls` (relay on rustls sending a KeyUpdate every 256 records, agent on
//! kTLS) and `rekey_relay_ktls` (mirrored): `--mib` MiB each way (default 16) must
//! arrive exactly, the kTLS end's streams must be on kTLS, and its
//! `*_tls_key_updates_total` must count at least 2 KeyUpdates received (followed) and 1
//! sent (its answer). `bench` runs the bulk transfer once per engine and prints a table. Warnings,
//! errors and session changes from the relay's and agent's logs are printed (`INFO log`)
//! after a failed check and at the end.

mod backend;
mod checks;
mod metrics;
mod netem;
mod payload;
mod stack;

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use backend::Backend;
use checks::{Bulk, Ids, Want};
use stack::Stack;

/// The backend's port in the guest.
const BACKEND_PORT: u16 = 9000;

/// The relay's `--heartbeat-secs` in `e2e`: the shortest it allows, so a control
/// session starved for 3 s by data-path work during `bulk` is declared dead and the
/// `heartbeat` check fails (issue #11 row 10).
const E2E_HEARTBEAT_SECS: u64 = 1;
/// The relay's `--heartbeat-secs` in `bench`.
const BENCH_HEARTBEAT_SECS: u64 = 5;
/// The `latency` check: netem delay on `lo` (each round trip twice this) and MiB each way.
const LATENCY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);
pub const LATENCY_MIB: u64 = 4;

/// Engines `bench` knows: `SLUICE_KTLS_ENGINE` values, plus `userspace` (no kTLS).
const ENGINES: &[&str] = &["splice", "uring", "threads", "copy", "userspace"];

/// The rustls end's KeyUpdate interval in the `rekey*` checks (records it sends per key).
const KEY_UPDATE_RECORDS: &str = "256";
/// MiB of `rekey_unsupported`'s request (and of the reply that never comes): 512 full
/// records, so the first KeyUpdate comes mid-request.
const REKEY_UNSUPPORTED_MIB: u64 = 8;
/// Default MiB each way of each `rekey` check (about four KeyUpdates per direction).
const REKEY_MIB: u64 = 16;

const USAGE: &str = "usage: sluice-vm-driver e2e [--mib N] [--compare-mib N]
       sluice-vm-driver rekey [--mib N]
       sluice-vm-driver bench [--mib N] [--engines splice,uring,threads,copy,userspace]";

/// Counts results and prints them in the harness's format.
#[derive(Default)]
struct Results {
    failed: u32,
}

impl Results {
    /// Prints `PASS name detail` or `FAIL name error` (with the error's causes and any
    /// further lines indented under it); returns the value on success.
    fn record<T>(
        &mut self,
        name: &str,
        started: Instant,
        r: Result<T>,
        detail: impl FnOnce(&T) -> String,
    ) -> Option<T> {
        let secs = started.elapsed().as_secs_f64();
        match r {
            Ok(v) => {
                println!("PASS {name} {} ({secs:.1} s)", detail(&v));
                Some(v)
            }
            Err(e) => {
                self.failed += 1;
                let text = format!("{e:#}");
                let mut lines = text.lines();
                println!("FAIL {name} {} ({secs:.1} s)", lines.next().unwrap_or_default());
                for l in lines {
                    println!("    {l}");
                }
                None
            }
        }
    }
}

fn info(s: impl AsRef<str>) {
    for l in s.as_ref().lines() {
        println!("INFO {l}");
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            println!("FAIL driver {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the command; returns the number of failed checks.
fn run(args: &[String]) -> Result<u32> {
    let (cmd, rest) = args.split_first().with_context(|| format!("no command\n{USAGE}"))?;
    let mut mib = None;
    let mut compare_mib = None;
    let mut engines: Vec<String> = ENGINES.iter().map(|s| s.to_string()).collect();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().with_context(|| format!("{a} needs a value\n{USAGE}"));
        match a.as_str() {
            "--mib" => mib = Some(value()?.parse::<u64>().context("--mib")?),
            "--compare-mib" => compare_mib = Some(value()?.parse::<u64>().context("--compare-mib")?),
            "--engines" => engines = value()?.split(',').map(str::to_owned).collect(),
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if let Some(bad) = engines.iter().find(|e| !ENGINES.contains(&e.as_str())) {
        bail!("unknown engine {bad:?}; known: {}", ENGINES.join(", "));
    }
    info(format!(
        "guest: kernel {}, {} cpus, {} MiB RAM",
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        meminfo_mib("MemTotal:")
    ));
    match cmd.as_str() {
        "e2e" => {
            let mib = mib.unwrap_or(256);
            e2e(mib, compare_mib.unwrap_or(mib.min(32)))
        }
        "rekey" => rekey(mib.unwrap_or(REKEY_MIB)),
        "bench" => bench(mib.unwrap_or(64), &engines),
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// The guest kernel's release, e.g. `6.1.0-57-cloud-amd64`.
fn os_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string()
}

/// Whether a kernel release takes new kTLS keys on a live socket (a KeyUpdate): 6.14 and
/// later. `None` if the release does not start with `major.minor`.
fn kernel_rekeys(release: &str) -> Option<bool> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major: u64 = it.next()?.parse().ok()?;
    let minor: u64 = it.next()?.parse().ok()?;
    Some((major, minor) >= (6, 14))
}

fn meminfo_mib(key: &str) -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = text.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse::<u64>().ok());
    kib.unwrap_or(0) / 1024
}

/// Starts the stack with `env`, reporting a failure as `FAIL <name>`.
fn start(res: &mut Results, name: &str, env: &[(&str, &str)], heartbeat_secs: u64) -> Option<Stack> {
    let t = Instant::now();
    let stack = Stack::start(BACKEND_PORT, env, heartbeat_secs);
    res.record(name, t, stack, |s| {
        format!("relay + agent up (--heartbeat-secs {heartbeat_secs}), resource AVAILABLE at {}", s.endpoint)
    })
}

/// Prints the relay's and agent's warnings, errors and session changes logged since the
/// last call, under `INFO log`, when a check failed since then (`failed_before`): the
/// cause of a failure is usually there.
fn logs_after_failure(res: &Results, failed_before: &mut u32, stack: &mut Stack) {
    let notable = stack.take_notable();
    if res.failed > *failed_before && !notable.is_empty() {
        info("log: warnings, errors and session changes of relay and agent so far:");
        for l in notable {
            println!("INFO log {l}");
        }
    }
    *failed_before = res.failed;
}

/// Always at the end: how many warnings and errors each binary logged, and those not
/// shown yet.
fn log_summary(stack: &mut Stack) {
    info(format!("log summary: {}", stack.warning_counts()));
    for l in stack.take_notable() {
        println!("INFO log {l}");
    }
}

fn env_line(env: &[(&str, &str)]) -> String {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn e2e(mib: u64, compare_mib: u64) -> Result<u32> {
    let mut res = Results::default();
    let mut backend = Backend::start(BACKEND_PORT)?;
    let mut ids = Ids::new();
    let ktls_env = [("SLUICE_DATA_PATH", "auto")];
    info(format!("e2e: bulk {mib} MiB each way, compare {compare_mib} MiB each way; {}", env_line(&ktls_env)));
    let Some(mut stack) = start(&mut res, "setup", &ktls_env, E2E_HEARTBEAT_SECS) else { return Ok(res.failed) };
    info(stack.data_path_log_lines().join("\n"));
    let mut failed_before = 0;

    let t = Instant::now();
    let r = checks::bulk(&stack, &mut backend, &mut ids, mib);
    let ktls = res.record("bulk", t, r, Bulk::summary);
    let t = Instant::now();
    res.record("heartbeat", t, checks::heartbeat(&stack, "bulk"), String::clone);
    logs_after_failure(&res, &mut failed_before, &mut stack);
    let t = Instant::now();
    res.record("half_close", t, checks::half_close(&stack, &mut backend, &mut ids), String::clone);
    let t = Instant::now();
    res.record("abort_backend", t, checks::abort_backend(&stack, &mut backend, &mut ids), String::clone);
    let t = Instant::now();
    res.record("abort_client", t, checks::abort_client(&stack, &mut backend, &mut ids), String::clone);

    let t = Instant::now();
    let path = stack
        .relay_metrics()
        .and_then(|r| Ok((r, stack.agent_metrics()?)))
        .and_then(|(r, a)| checks::path(&r, &a, Want::AnyKtls));
    res.record("path", t, path, String::clone);
    logs_after_failure(&res, &mut failed_before, &mut stack);

    let t = Instant::now();
    let latency = netem::Delay::add("lo", LATENCY_DELAY).and_then(|delay| {
        info(format!(
            "latency: netem delay {} ms on {} (every round trip {} ms)",
            delay.delay.as_millis(),
            delay.interface,
            2 * delay.delay.as_millis()
        ));
        let r = checks::bulk(&stack, &mut backend, &mut ids, LATENCY_MIB)
            .and_then(|b| Ok((b, checks::heartbeat(&stack, "bulk under latency")?)));
        delay.remove()?;
        r
    });
    res.record("latency", t, latency, |(b, _)| format!("with a 200 ms round trip: {}", b.summary()));
    logs_after_failure(&res, &mut failed_before, &mut stack);

    let t = Instant::now();
    let user_env = [("SLUICE_DATA_PATH", "userspace")];
    let compare = stack.restart(&user_env).and_then(|()| {
        info(format!("compare: relay + agent restarted with {}", env_line(&user_env)));
        info(stack.data_path_log_lines().join("\n"));
        let u = checks::bulk(&stack, &mut backend, &mut ids, compare_mib)?;
        checks::check_paths(&u.paths_relay, &u.paths_agent, Want::Exactly("userspace"))
            .context("SLUICE_DATA_PATH=userspace did not force the user-space path")?;
        Ok(u)
    });
    if let Some(u) = res.record("compare", t, compare, |u| format!("userspace: {}", u.summary())) {
        let row = |name: &str, b: &Bulk| {
            format!(
                "compare: {name:<9} {:>8.2} MiB/s per direction  {:>7.1} CPU-s/GiB relay+agent  user-space copied \
                 per payload byte: relay {}, agent {}  (paths: relay {}, agent {})",
                b.mib_per_sec(),
                b.cpu_per_gib(),
                per_byte(b.copied_relay, b),
                per_byte(b.copied_agent, b),
                checks::paths(&b.paths_relay),
                checks::paths(&b.paths_agent)
            )
        };
        info(row("userspace", &u));
        match &ktls {
            Some(k) => {
                info(row("auto", k));
                info(format!(
                    "compare: auto (bulk) uses {:.0}% of the CPU per GiB that userspace uses",
                    100.0 * k.cpu_per_gib() / u.cpu_per_gib()
                ));
            }
            None => info("compare: no numbers for the auto path (bulk failed)"),
        }
    }
    logs_after_failure(&res, &mut failed_before, &mut stack);

    let release = os_release();
    if kernel_rekeys(&release) == Some(true) {
        info(format!(
            "rekey_unsupported: skipped: kernel {release} (>= 6.14) follows KeyUpdates on kTLS; `sluice-vm-driver \
             rekey` tests that"
        ));
    } else {
        let t = Instant::now();
        let relay_env = [("SLUICE_DATA_PATH", "userspace"), ("SLUICE_TLS_KEY_UPDATE_RECORDS", KEY_UPDATE_RECORDS)];
        let agent_env = [("SLUICE_DATA_PATH", "auto")];
        let r = stack.restart_with(&relay_env, &agent_env).and_then(|()| {
            info(format!(
                "rekey_unsupported: kernel {release}; relay {}, agent {}; {REKEY_UNSUPPORTED_MIB} MiB request + FIN \
                 (the reply after it) must abort",
                env_line(&relay_env),
                env_line(&agent_env)
            ));
            checks::rekey_unsupported(&stack, &mut backend, &mut ids, REKEY_UNSUPPORTED_MIB)
        });
        res.record("rekey_unsupported", t, r, String::clone);
        logs_after_failure(&res, &mut failed_before, &mut stack);
    }
    info(format!(
        "guest memory: {} MiB available of {} MiB after the checks",
        meminfo_mib("MemAvailable:"),
        meminfo_mib("MemTotal:")
    ));
    stack.stop();
    log_summary(&mut stack);
    Ok(res.failed)
}

/// `rekey`: on a kernel whose kTLS takes new keys (>= 6.14), a rustls end sending a
/// KeyUpdate every [`KEY_UPDATE_RECORDS`] records to a kTLS agent, then to a kTLS relay.
fn rekey(mib: u64) -> Result<u32> {
    let mut res = Results::default();
    let release = os_release();
    if kernel_rekeys(&release) != Some(true) {
        info(format!("rekey: kernel {release} is older than 6.14: its kTLS cannot follow a KeyUpdate; expect FAILs"));
    }
    let mut backend = Backend::start(BACKEND_PORT)?;
    let mut ids = Ids::new();
    let knob = ("SLUICE_TLS_KEY_UPDATE_RECORDS", KEY_UPDATE_RECORDS);
    let user = [("SLUICE_DATA_PATH", "userspace"), knob];
    let ktls = [("SLUICE_DATA_PATH", "auto")];
    info(format!(
        "rekey: {mib} MiB each way per check, KeyUpdate every {KEY_UPDATE_RECORDS} records from the rustls end"
    ));
    let mut stack: Option<Stack> = None;
    let mut failed_before = 0;
    for (name, ktls_end) in [("rekey_agent_ktls", checks::KtlsEnd::Agent), ("rekey_relay_ktls", checks::KtlsEnd::Relay)]
    {
        let (relay_env, agent_env) = match ktls_end {
            checks::KtlsEnd::Agent => (&user[..], &ktls[..]),
            checks::KtlsEnd::Relay => (&ktls[..], &user[..]),
        };
        let t = Instant::now();
        let started = match stack.as_mut() {
            Some(s) => s.restart_with(relay_env, agent_env),
            None => Stack::start_with(BACKEND_PORT, relay_env, agent_env, E2E_HEARTBEAT_SECS).map(|s| {
                stack = Some(s);
            }),
        };
        let r = started.and_then(|()| {
            let s = stack.as_ref().expect("started");
            info(format!("{name}: relay {}, agent {}", env_line(relay_env), env_line(agent_env)));
            info(s.data_path_log_lines().join("\n"));
            checks::rekey_followed(s, &mut backend, &mut ids, mib, ktls_end, 2.0, 1.0)
        });
        res.record(name, t, r, String::clone);
        if let Some(s) = stack.as_mut() {
            logs_after_failure(&res, &mut failed_before, s);
        }
    }
    // Both ends on kTLS: each send direction updates its own key after the lowered
    // budget (no rustls end is left to start one).
    let both = [("SLUICE_DATA_PATH", "auto"), knob];
    let t = Instant::now();
    let started = match stack.as_mut() {
        Some(s) => s.restart_with(&both, &both),
        None => Stack::start_with(BACKEND_PORT, &both, &both, E2E_HEARTBEAT_SECS).map(|s| {
            stack = Some(s);
        }),
    };
    let r = started.and_then(|()| {
        let s = stack.as_ref().expect("started");
        info(format!("rekey_both_ktls: relay and agent {}", env_line(&both)));
        checks::rekey_both_ktls(s, &mut backend, &mut ids, mib, 2.0)
    });
    res.record("rekey_both_ktls", t, r, String::clone);
    if let Some(s) = stack.as_mut() {
        logs_after_failure(&res, &mut failed_before, s);
    }
    if let Some(mut s) = stack {
        s.stop();
        log_summary(&mut s);
    }
    Ok(res.failed)
}

/// Copied bytes per payload byte moved (both directions), e.g. `2.00`.
fn per_byte(copied: Option<f64>, b: &Bulk) -> String {
    copied.map_or("absent".into(), |c| format!("{:.2}", c / (2.0 * (b.mib * payload::MIB) as f64)))
}

fn bench(mib: u64, engines: &[String]) -> Result<u32> {
    let mut res = Results::default();
    let mut backend = Backend::start(BACKEND_PORT)?;
    let mut ids = Ids::new();
    let mut stack: Option<Stack> = None;
    let mut rows = Vec::new();
    info(format!("bench: {mib} MiB each way per engine: {}", engines.join(", ")));
    for engine in engines {
        let (env, want): (Vec<(&str, &str)>, String) = if engine == "userspace" {
            (vec![("SLUICE_DATA_PATH", "userspace")], "userspace".into())
        } else {
            (vec![("SLUICE_DATA_PATH", "auto"), ("SLUICE_KTLS_ENGINE", engine.as_str())], format!("ktls_{engine}"))
        };
        let name = format!("bench-{engine}");
        let t = Instant::now();
        let r = match stack.as_mut() {
            Some(s) => s.restart(&env),
            None => Stack::start(BACKEND_PORT, &env, BENCH_HEARTBEAT_SECS).map(|s| {
                stack = Some(s);
            }),
        };
        if res.record(&format!("{name}-setup"), t, r, |()| env_line(&env)).is_none() {
            rows.push(format!("| {engine} | setup failed | | | | |"));
            continue;
        }
        let s = stack.as_ref().expect("started");
        info(s.data_path_log_lines().join("\n"));
        let t = Instant::now();
        let r = checks::bulk(s, &mut backend, &mut ids, mib).and_then(|b| {
            checks::check_paths(&b.paths_relay, &b.paths_agent, Want::Exactly(&want))
                .with_context(|| format!("SLUICE_KTLS_ENGINE={engine} was not honoured; {}", b.summary()))?;
            Ok(b)
        });
        match res.record(&name, t, r, Bulk::summary) {
            Some(b) => rows.push(format!(
                "| {engine} | {} / {} | {:.2} | {:.1} | {:.1} / {:.1} | {} / {} |",
                checks::paths(&b.paths_relay),
                checks::paths(&b.paths_agent),
                b.mib_per_sec(),
                b.cpu_per_gib(),
                b.cpu_relay,
                b.cpu_agent,
                checks::bytes(b.copied_relay),
                checks::bytes(b.copied_agent)
            )),
            None => rows.push(format!("| {engine} | failed | | | | |")),
        }
    }
    if let Some(mut s) = stack {
        s.stop();
        log_summary(&mut s);
    }
    println!("bench: {mib} MiB each way at once, one stream, relay + agent in the kTLS VM (emulated CPU)");
    println!(
        "| engine | path relay / agent | MiB/s per direction | CPU-s/GiB relay+agent | CPU-s relay / agent | \
         user-space copied relay / agent |"
    );
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    Ok(res.failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(kernel_rekeys("6.1.0-57-cloud-amd64"), Some(false));
        assert_eq!(kernel_rekeys("6.13.12"), Some(false));
        assert_eq!(kernel_rekeys("6.14.0"), Some(true));
        assert_eq!(kernel_rekeys("6.18.15+deb13-cloud-amd64"), Some(true));
        assert_eq!(kernel_rekeys("7.3.4+deb13-cloud-amd64"), Some(true));
        assert_eq!(kernel_rekeys(""), None);
    }
}

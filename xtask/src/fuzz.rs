//! `cargo xtask fuzz [--secs N] [TARGET…]`: builds the fuzz targets (`fuzz/`, cargo-fuzz
//! and libFuzzer) and runs each for N seconds from its seed corpus; fails on the first
//! crash and says where libFuzzer saved the input that caused it.
//!
//! Cheap enough for every CI run: the build goes to a target directory outside the clone
//! (`~/.cache/sluice/fuzz-target`, or `SLUICE_FUZZ_TARGET_DIR`), so a second run on the
//! same machine rebuilds only Sluice's own crates, not the ~200 dependencies. New inputs
//! the fuzzer finds go to `~/.cache/sluice/fuzz-corpus/<target>` (kept, so coverage
//! grows across runs); the committed seeds in `fuzz/corpus/<target>` are only read.
//! docs/reliability.md ("Fuzzing") says what each target checks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The nightly that builds with libFuzzer's instrumentation: the one scripts/setup-ebpf.sh
/// pins for the eBPF program (and agent/build.rs checks), so CI installs no second one.
const NIGHTLY: &str = "nightly-2026-10-29";

/// Every fuzz target, in the order they run (the files in fuzz/fuzz_targets/).
pub const TARGETS: [&str; 7] =
    ["frame", "control_messages", "enroll_request", "jwt_claims", "record_classifier", "agent_config", "identity"];

/// Seconds each target runs when `--secs` is not given: 7 targets, two at a time, take
/// about a minute on two cores.
pub const DEFAULT_SECS: u64 = 15;

pub const USAGE: &str =
    "  fuzz [--secs N] [TARGET…]  build the fuzz targets and run each N s (default 15) from its seed corpus";

/// Build options shared by `build` and `run` (they must match, or `run` rebuilds):
/// no sanitizer (the parsers are safe Rust; the targets check their own invariants, and
/// AddressSanitizer would only slow each execution), 16 codegen units (a shorter build
/// than cargo-fuzz's default of one).
const BUILD_FLAGS: [&str; 4] = ["--sanitizer", "none", "--codegen-units", "16"];

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp"));
    std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).unwrap_or_else(|| home.join(".cache")).join("sluice")
}

fn target_dir() -> PathBuf {
    std::env::var_os("SLUICE_FUZZ_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| cache_dir().join("fuzz-target"))
}

/// `cargo fuzz …` on the pinned nightly, from the workspace root.
fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", NIGHTLY, "cargo", "fuzz"]).current_dir(root);
    // The outer `cargo xtask` points these at the stable toolchain.
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO_TARGET_DIR"] {
        cmd.env_remove(var);
    }
    // The agent's eBPF program is not what is fuzzed: skip building it here.
    cmd.env("SLUICE_NO_EBPF", "1");
    cmd
}

pub fn cli(root: &Path, args: &[String]) -> Result<()> {
    let mut secs = DEFAULT_SECS;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => {
                let v = it.next().context("--secs needs a number of seconds")?;
                secs = v.parse().with_context(|| format!("--secs {v:?} is not a number of seconds"))?;
            }
            t if TARGETS.contains(&t) => targets.push(t.to_owned()),
            other => bail!("unknown fuzz argument {other:?}: use --secs N and target names from {TARGETS:?}"),
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    run(root, secs, &targets)
}

/// Installs cargo-fuzz if needed, builds every target, runs `targets` for `secs` each.
pub fn run(root: &Path, secs: u64, targets: &[String]) -> Result<()> {
    crate::run("install cargo-fuzz", Command::new("bash").arg("scripts/setup-fuzz.sh"))?;
    let target_dir = target_dir();
    let t = Instant::now();
    crate::run(
        "build fuzz targets",
        cargo_fuzz(root).arg("build").args(BUILD_FLAGS).arg("--target-dir").arg(&target_dir),
    )?;
    let build_secs = t.elapsed().as_secs_f64();
    // One target per core (libFuzzer runs one thread): two at a time on two cores.
    let parallel = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
    eprintln!("==> fuzz {} targets for {secs} s each, {parallel} at a time", targets.len());
    let target_dir = &target_dir;
    for batch in targets.chunks(parallel) {
        let running: Vec<_> = batch
            .iter()
            .map(|target| Ok((target, fuzz_one(root, target_dir, target, secs)?)))
            .collect::<Result<_>>()?;
        let mut failed = Vec::new();
        for (target, (mut child, log, artifacts, before)) in running {
            let status = child.wait()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let stat = |name: &str| {
                text.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned()).unwrap_or_default()
            };
            if status.success() {
                eprintln!(
                    "    {target}: ok, {} executions ({} per second), {} new inputs",
                    stat("stat::number_of_executed_units:"),
                    stat("stat::average_exec_per_sec:"),
                    stat("stat::new_units_added:")
                );
                continue;
            }
            let start = text.find("panicked at").or_else(|| text.find("==ERROR")).unwrap_or(0);
            eprintln!("    {target}: FAILED ({status}); from its log {}:\n{}", log.display(), clip(&text[start..]));
            let new: Vec<_> = files(&artifacts).into_iter().filter(|f| !before.contains(f)).collect();
            let saved = new.iter().map(|p| format!("\n  {}", p.display())).collect::<String>();
            failed.push(format!(
                "fuzz target {target} failed; the input that crashed it is saved in {}:{saved}\n\
                 reproduce with: cargo +{NIGHTLY} fuzz run -s none --target-dir {} {target} {}\n\
                 then add it as a regression test next to the parser",
                artifacts.display(),
                target_dir.display(),
                new.first().map(|p| p.display().to_string()).unwrap_or_else(|| "<file>".into()),
            ));
        }
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
    }
    eprintln!(
        "<== fuzz: {} targets × {secs} s passed (build {build_secs:.0} s, total {:.0} s)",
        targets.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Starts one target; its output goes to `<cache>/fuzz-logs/<target>.log`.
#[allow(clippy::type_complexity)]
fn fuzz_one(
    root: &Path,
    target_dir: &Path,
    target: &str,
    secs: u64,
) -> Result<(std::process::Child, PathBuf, PathBuf, Vec<PathBuf>)> {
    let found = cache_dir().join("fuzz-corpus").join(target);
    let logs = cache_dir().join("fuzz-logs");
    let artifacts = root.join("fuzz/artifacts").join(target);
    for dir in [&found, &logs, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = logs.join(format!("{target}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let before = files(&artifacts);
    let mut cmd = cargo_fuzz(root);
    cmd.args(["run", target])
        .args(BUILD_FLAGS)
        .arg("--target-dir")
        .arg(target_dir)
        // New inputs go to the first corpus directory; the committed seeds are only read.
        .arg(&found)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={secs}"))
        .arg("-timeout=10")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .stdout(out.try_clone()?)
        .stderr(out);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    Ok((child, log, artifacts, before))
}

/// The first lines of a failure's report (the panic, the failing input), not its backtrace.
fn clip(text: &str) -> String {
    text.lines()
        .filter(|l| {
            !l.trim_start().starts_with("at ") && !l.trim_start().chars().next().is_some_and(|c| c.is_ascii_digit())
        })
        .take(30)
        .map(|l| format!("      {l}\n"))
        .collect()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default()
}

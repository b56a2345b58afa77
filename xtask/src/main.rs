//! `cargo xtask …`: project automation that needs more than one cargo command.
//!
//! - `cargo xtask test`: everything CI runs, from a clean clone: installs the real
//!   services the tests start (PostgreSQL, OpenSSH) and the eBPF toolchain, checks
//!   formatting and lints, builds the release binaries and the dist binaries (`dist`
//!   below), and runs every test against them.
//!   Then it runs every fuzz target for a few seconds (`cargo xtask fuzz`, `fuzz/`).
//!   Last, it boots the kTLS VM and runs the relay and agent end to end over kernel TLS
//!   (`cargo xtask vm-test`, `vm/`), on the stable guest kernel (6.1) and on the rekey
//!   kernel (>= 6.14, TLS KeyUpdate followed by kTLS).
//! - `cargo xtask fuzz [--secs N] [TARGET…]`: the fuzz targets, each for N seconds
//!   (`xtask/src/fuzz.rs`).
//! - `cargo xtask vm-test`, `cargo xtask vm-test-smoke`: the kTLS VM harness (`xtask/src/vm.rs`);
//!   `vm-test` with no arguments tests the real relay and agent end to end in the VM, on
//!   both guest kernels (`--kernel stable|rekey|both`).
//! - `cargo xtask vm-bench`: the data-path engines compared in the VM (MiB/s, CPU per GiB).
//! - `cargo xtask measure`: throughput of a 1 GiB transfer and the agent's memory, idle
//!   and with open streams (the numbers quoted in docs/benchmarks.md).
//! - `cargo xtask soak [--minutes N]`: relay and agent under churn for 15 minutes with an
//!   agent restart a minute; RSS and descriptor slopes (`xtask/src/soak.rs`; not in `test`).
//! - `cargo xtask sim-agents [--agents N,…] [--streams M] [--pool N] …`: thousands of
//!   simulated agents against one relay; its RSS, descriptors, CPU and control messages
//!   per idle agent and per stream (`xtask/src/sim_agents.rs`; docs/scaling.md; not in `test`).
//! - `cargo xtask dist [--no-build]`: static stripped binaries, debug files, SHA256SUMS
//!   and one image context per binary in `target/dist/` (`xtask/src/dist.rs`).

mod bench_peers;
mod dist;
mod elf;
mod fuzz;
mod link_order;
mod sim_agents;
mod soak;
mod vm;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

/// The eBPF program's crate: built for the BPF target by `agent/build.rs`, never for the host.
const EBPF_CRATE: &str = "sluice-agent-ebpf";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Runs a command in the workspace root, echoing it and timing it; fails on non-zero exit.
fn run(step: &str, cmd: &mut Command) -> Result<()> {
    cmd.current_dir(workspace_root());
    eprintln!("==> {step}: {cmd:?}");
    let t = Instant::now();
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    eprintln!("<== {step}: {} in {:.1} s", if status.success() { "ok" } else { "FAILED" }, t.elapsed().as_secs_f64());
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    run("install test services", Command::new("bash").arg("scripts/install-test-deps.sh"))?;
    run("install eBPF toolchain", Command::new("bash").arg("scripts/setup-ebpf.sh"))?;
    if !quick {
        run("format check", cargo().args(["fmt", "--all", "--", "--check"]))?;
        run(
            "lints",
            cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                EBPF_CRATE,
                "--all-targets",
                "--release",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
    }
    run(
        "build release binaries",
        cargo().args(["build", "--release", "--workspace", "--exclude", EBPF_CRATE, "--bins"]),
    )?;
    // The shipped static binaries and image contexts, fresh: tests/tests/dist.rs runs them
    // in the images' root file systems (cold: about 8 CPU-minutes; cached: seconds).
    eprintln!("==> dist binaries and image contexts (cargo xtask dist)");
    let t = Instant::now();
    dist::dist(&workspace_root(), true)?;
    eprintln!("<== dist: ok in {:.1} s", t.elapsed().as_secs_f64());
    run(
        "tests",
        cargo().args(["test", "--release", "--workspace", "--exclude", EBPF_CRATE, "--", "--test-threads", "4"]),
    )?;
    // The end-to-end suite again with every relay's state in PostgreSQL (one server per
    // test binary, a database per relay); tests about the SQLite file skip themselves.
    run(
        "tests on PostgreSQL",
        cargo()
            .args(["test", "--release", "-p", "sluice-e2e", "--", "--test-threads", "4"])
            .env("SLUICE_TEST_STORE", "postgres"),
    )?;
    // Every parser of outside input under libFuzzer for a few seconds each, from the
    // committed seed corpus (about two minutes with the build cached).
    fuzz::run(&workspace_root(), fuzz::DEFAULT_SECS, &fuzz::TARGETS.map(String::from))?;
    // Real kernel TLS in a VM (this kernel has none): the static relay and agent move
    // 256 MiB each way over kTLS + splice, half-close, resets, path counters (stable
    // kernel 6.1), then follow TLS KeyUpdates on kTLS (rekey kernel, >= 6.14).
    eprintln!("==> kTLS end-to-end test in the VM (cargo xtask vm-test)");
    let t = Instant::now();
    vm::e2e_cli(&workspace_root(), &[])?;
    eprintln!("<== kTLS end-to-end test in the VM: ok in {:.1} s", t.elapsed().as_secs_f64());
    eprintln!("xtask test: all steps passed");
    Ok(())
}

fn measure() -> Result<()> {
    run(
        "build release binaries",
        cargo().args(["build", "--release", "--workspace", "--exclude", EBPF_CRATE, "--bins"]),
    )?;
    run(
        "measure",
        cargo().args([
            "test",
            "--release",
            "-p",
            "sluice-e2e",
            "--test",
            "measure",
            "--",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ]),
    )
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h" || a == "help") {
        println!("{}", usage());
        return Ok(());
    }
    match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("measure") => measure(),
        Some("profile-streams") => bench_peers::profile::cli(&workspace_root(), &args[1..]),
        Some("fuzz") => fuzz::cli(&workspace_root(), &args[1..]),
        Some("soak") => soak::cli(&args[1..]),
        Some("sim-agents") => sim_agents::cli(&args[1..]),
        Some("vm-test") => vm::vm_test_cli(&workspace_root(), &args[1..]),
        Some("vm-test-smoke") => vm::smoke_cli(&workspace_root(), &args[1..]),
        Some("vm-bench") => vm::bench_cli(&workspace_root(), &args[1..]),
        Some("bench-peers") => bench_peers::cli(&workspace_root(), &args[1..]),
        Some("dist") => dist::cli(&workspace_root(), &args[1..]),
        _ => {
            eprintln!("{}", usage());
            std::process::exit(2);
        }
    }
}

/// Every command with its options (`cargo xtask --help`, or any command with `--help`).
fn usage() -> String {
    format!(
        "usage: cargo xtask <command>\n\n\
         commands:\n  \
         test [--quick]  install test services, check fmt + clippy, build, run every test (what CI runs);\n                  \
         --quick skips fmt and clippy\n  \
         {}\n  \
         measure         1 GiB throughput and agent memory (idle, 8 and 200 streams)\n  \
         {}\n{}\n{}{}{}{}",
        fuzz::USAGE.trim_start(),
        bench_peers::USAGE.trim_start(),
        bench_peers::profile::USAGE,
        soak::USAGE,
        sim_agents::USAGE,
        vm::USAGE,
        dist::USAGE
    )
}

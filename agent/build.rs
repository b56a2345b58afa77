//! Builds the agent's eBPF program (`agent-ebpf`) with aya-build when its toolchain is
//! installed (`scripts/setup-ebpf.sh`: a pinned nightly with rust-src, bpf-linker).
//! Without it the agent still builds — without the program — and says so; at run time
//! it then counts stream bytes in user space.
//!
//! It also names the build (`SLUICE_GIT_COMMIT`, `SLUICE_BUILD_DATE`) for `--version` and
//! `sluice_agent_build_info`: see `name_the_build`, kept apart from the eBPF logic.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The nightly that builds the eBPF program (pinned so a new nightly cannot break CI).
const NIGHTLY: &str = "nightly-2026-10-29";

fn missing_toolchain() -> Option<String> {
    if std::env::var_os("SLUICE_NO_EBPF").is_some() {
        return Some("SLUICE_NO_EBPF is set".into());
    }
    let linker = Command::new("bpf-linker").arg("--version").output();
    if !linker.is_ok_and(|o| o.status.success()) {
        return Some("bpf-linker is not installed".into());
    }
    let rustc = Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"]).output();
    if !rustc.is_ok_and(|o| o.status.success()) {
        return Some(format!("the {NIGHTLY} toolchain is not installed"));
    }
    let src = Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]).output();
    if !src.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src"))) {
        return Some(format!("rust-src is not installed for {NIGHTLY}"));
    }
    None
}

/// Where `program` would be found on `PATH`, if anywhere.
fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|p| p.is_file())
}

/// Makes cargo run this script again when the eBPF toolchain appears or changes.
///
/// Without these lines cargo would reuse the first answer for good: an agent built before
/// `scripts/setup-ebpf.sh` ran (say by `cargo run --release -- quickstart` on a fresh
/// machine) would stay without its eBPF program after the toolchain is installed. While
/// the toolchain is missing we watch a path that does not exist, which cargo treats as
/// changed on every build, so the (cheap) check runs each time until it succeeds; once it
/// is present we watch the linker binary and the nightly's sysroot.
fn watch_toolchain(present: bool) {
    if !present {
        let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
        println!("cargo:rerun-if-changed={out}/ebpf-toolchain-missing-recheck-on-every-build");
        return;
    }
    if let Some(linker) = on_path("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
    let sysroot = Command::new("rustup").args(["run", NIGHTLY, "rustc", "--print", "sysroot"]).output();
    if let Ok(o) = sysroot
        && o.status.success()
    {
        // rustup's record of the installed rust-src component (one small file).
        let root = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        println!("cargo:rerun-if-changed={root}/lib/rustlib/manifest-rust-src");
    }
}

/// Lays out the agent's code in the order of the symbol-ordering file (lld's
/// `--symbol-ordering-file`) that `SLUICE_LINK_ORDER` names, when set: `cargo xtask
/// dist` sets it so that the code an agent runs sits together, and an idle agent keeps
/// less of its binary resident (`xtask/src/link_order.rs`). The file is watched, so a
/// new order relinks the agent; its path alone, not its content, is in the link
/// arguments, which keeps the symbol names it lists stable from one build to the next.
fn link_order() {
    println!("cargo:rerun-if-env-changed=SLUICE_LINK_ORDER");
    if let Some(order) = std::env::var_os("SLUICE_LINK_ORDER") {
        let order = PathBuf::from(order);
        println!("cargo:rerun-if-changed={}", order.display());
        println!("cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}", order.display());
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(sluice_ebpf)");
    println!("cargo:rerun-if-env-changed=SLUICE_NO_EBPF");
    println!("cargo:rerun-if-changed=build.rs");
    link_order();
    let missing = missing_toolchain();
    // SLUICE_NO_EBPF is a choice (watched above), not a missing toolchain to look for
    // again on every build: rechecking would rebuild the agent each time (fuzz/ sets it).
    watch_toolchain(missing.is_none() || std::env::var_os("SLUICE_NO_EBPF").is_some());
    if let Some(why) = missing {
        println!(
            "cargo:warning=building sluice-agent without its eBPF program ({why}); it will count stream bytes in \
             user space. Run scripts/setup-ebpf.sh to build the program."
        );
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let root = root.to_str().expect("UTF-8 path");
    println!("cargo:rerun-if-changed={root}/src");
    println!("cargo:rerun-if-changed={root}/../agent-ebpf-common/src");
    let package = aya_build::Package { name: "sluice-agent-ebpf", root_dir: root, ..Default::default() };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(NIGHTLY)) {
        panic!("the eBPF program failed to build: {e:#}");
    }
    println!("cargo:rustc-cfg=sluice_ebpf");
}

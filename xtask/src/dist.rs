//! `cargo xtask dist`: the binaries and image contexts operators install.
//!
//! - `sluice` and `sluice-agent` for x86_64, fully static (glibc with `+crt-static`: the
//!   kernel-TLS path needs glibc, the `ktls` crate does not build for musl), built in
//!   `target/dist-build/` so the normal `target/release/` the tests use stays cached,
//!   with the `dist` profile ([`PROFILE`]: fat LTO, one codegen unit, crates off the data
//!   path built for size), which makes the agent's code a third smaller than a release
//!   build's, relative relocations packed ([`RUSTFLAGS`]), and the agent's code laid out
//!   by a profile ([`crate::link_order`]); all three lower the agent's RSS.
//! - Debug info split off: `NAME` is stripped (`objcopy --strip-all` plus a
//!   `.gnu_debuglink` to `NAME.debug`), `NAME.debug` keeps the debug sections and symbols
//!   for `gdb`/`addr2line` on a crash report.
//! - `SHA256SUMS` over the binaries and debug files, and a size table on stdout.
//! - One image context per binary, `target/dist/image-agent/` and `image-relay/`: the
//!   Dockerfile from `deploy/` ([`IMAGES`]), the stripped binary and an empty `state/`
//!   directory (mode 0700) that the Dockerfile copies to the state directory with the
//!   image's uid, so that a fresh named volume is writable on first start. Nothing is
//!   compiled inside an image: `docker build target/dist/image-agent`.
//!
//! Static glibc resolves host names without NSS modules: glibc ≥ 2.34 (Debian 12 has
//! 2.36) builds the `files` and `dns` services into libc itself, so the agent in a
//! distroless image reads `/etc/hosts` and `/etc/resolv.conf` (Docker provides both) and
//! needs no shared library. `tests/tests/dist.rs` proves it by running the agent in a
//! chroot of the image's files that holds nothing else.
//!
//! aarch64 is built only when its Rust target and a cross linker are installed; otherwise
//! dist says why it skipped it.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{elf, link_order};

/// The Rust target of the x86_64 binaries (glibc; `+crt-static` makes them static).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The aarch64 target, built when [`aarch64_missing`] finds nothing missing.
const AARCH64: &str = "aarch64-unknown-linux-gnu";
/// The cross linker the aarch64 build needs (Debian: `gcc-aarch64-linux-gnu`).
const AARCH64_LINKER: &str = "aarch64-linux-gnu-gcc";

/// One container image: its Dockerfile, the binary it holds and its state directory.
pub struct Image {
    /// `target/dist/image-NAME/`.
    pub name: &'static str,
    pub binary: &'static str,
    /// In the workspace; copied to the context as `Dockerfile`.
    pub dockerfile: &'static str,
}

/// The images `dist` prepares a context for.
pub const IMAGES: &[Image] = &[
    Image { name: "agent", binary: "sluice-agent", dockerfile: "deploy/agent.Dockerfile" },
    Image { name: "relay", binary: "sluice", dockerfile: "deploy/relay.Dockerfile" },
];

/// The binaries `dist` ships.
/// The Cargo profile of the shipped binaries (Cargo.toml: release plus fat LTO and one
/// codegen unit).
pub const PROFILE: &str = "dist";

const BINARIES: &[&str] = &["sluice", "sluice-agent"];

pub const USAGE: &str = "  dist [--no-build]  static stripped x86_64 binaries, debug files, SHA256SUMS and image contexts in target/dist/\n";

/// `cargo xtask dist [--no-build]`.
pub fn cli(root: &Path, args: &[String]) -> Result<()> {
    let build = !args.iter().any(|a| a == "--no-build");
    if let Some(a) = args.iter().find(|a| *a != "--no-build") {
        bail!("dist: unknown argument {a:?}\nusage:\n{USAGE}");
    }
    dist(root, build)
}

/// Builds (unless `build` is false: then the last build is packaged) and packages
/// everything into `target/dist/`.
pub fn dist(root: &Path, build: bool) -> Result<()> {
    let build_dir = root.join("target").join("dist-build");
    let release = build_dir.join(TARGET).join(PROFILE);
    if build {
        let t = Instant::now();
        build_with_code_layout(root, &build_dir, &release.join("sluice-agent"))?;
        eprintln!("dist: x86_64 static build in {:.1} s", t.elapsed().as_secs_f64());
    }
    let out = root.join("target").join("dist");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut rows = Vec::new();
    for name in BINARIES {
        let built = release.join(name);
        check_linked_as_shipped(&built)?;
        let unstripped = size(&built)?;
        split_debug(&built, &out, name)?;
        rows.push((name.to_string(), unstripped, size(&out.join(name))?, size(&out.join(format!("{name}.debug")))?));
    }
    write_sha256sums(&out)?;
    for image in IMAGES {
        image_context(root, &out, image)?;
    }
    println!("{}", size_table(&rows));
    println!("checksums: {}", out.join("SHA256SUMS").display());
    for image in IMAGES {
        println!(
            "image context: {} (docker build -t {}:{} {})",
            out.join(format!("image-{}", image.name)).display(),
            image.binary,
            env!("CARGO_PKG_VERSION"),
            out.join(format!("image-{}", image.name)).display()
        );
    }
    match aarch64_missing() {
        Some(why) => println!("aarch64: skipped ({why})"),
        None => {
            let t = Instant::now();
            cargo_build(
                root,
                &build_dir,
                AARCH64,
                &[("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", AARCH64_LINKER)],
            )?;
            let dir = out.join("aarch64");
            std::fs::create_dir_all(&dir)?;
            for name in BINARIES {
                std::fs::copy(build_dir.join(AARCH64).join(PROFILE).join(name), dir.join(name))?;
            }
            println!("aarch64: built in {:.1} s into {} (unstripped)", t.elapsed().as_secs_f64(), dir.display());
        }
    }
    Ok(())
}

/// The x86_64 build, with the agent's code laid out by [`link_order::PROFILE`]: built
/// with the ordering file of the last build (empty on the first), then, when the built
/// agent's names give a different file, relinked with that one. Refuses an agent whose
/// listed functions did not end up together.
fn build_with_code_layout(root: &Path, build_dir: &Path, agent: &Path) -> Result<()> {
    let profile_path = root.join(link_order::PROFILE);
    let profile = link_order::read_profile(
        &std::fs::read_to_string(&profile_path).with_context(|| format!("reading {}", profile_path.display()))?,
    );
    let order = build_dir.join("agent-link-order.txt");
    std::fs::create_dir_all(build_dir)?;
    let current = std::fs::read_to_string(&order).unwrap_or_default();
    if !order.exists() {
        std::fs::write(&order, "")?;
    }
    let env = [("SLUICE_LINK_ORDER", order.to_str().context("non-UTF-8 target directory")?)];
    cargo_build(root, build_dir, TARGET, &env)?;
    let wanted = link_order::order_file(&profile, &link_order::function_symbols(agent)?);
    if wanted != current {
        eprintln!("dist: relinking the agent with its code laid out ({} functions first)", wanted.lines().count());
        std::fs::write(&order, &wanted).with_context(|| format!("writing {}", order.display()))?;
        cargo_build(root, build_dir, TARGET, &env)?;
    }
    let (size, packed) = link_order::packing(&wanted, &link_order::function_symbols(agent)?);
    eprintln!(
        "dist: the agent's {} profiled functions ({:.2} MB): {:.0} % of them laid out first",
        wanted.lines().count(),
        size as f64 / 1e6,
        packed * 100.0
    );
    if packed < 0.95 {
        bail!(
            "{}: only {:.0} % of the functions {} lists were laid out first: the code layout did not \
             take (is the linker lld? does agent/build.rs pass SLUICE_LINK_ORDER on?)",
            agent.display(),
            packed * 100.0,
            link_order::PROFILE
        );
    }
    Ok(())
}

/// What every dist build links with: glibc statically (`+crt-static`), and relative
/// relocations packed (`DT_RELR`, glibc ≥ 2.36). Unpacked, the static PIE agent's
/// relocation table is 224 KiB that start-up reads whole, so it stayed resident in every
/// process; packed it is 3 KiB, and the agent's idle RSS is about 0.5 MiB lower
/// (docs/benchmarks.md, "Memory: what the agent's RSS is made of").
const RUSTFLAGS: &str = "-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs";

/// `cargo build --profile dist` of both binaries for `target`, static, into `build_dir`.
fn cargo_build(root: &Path, build_dir: &Path, target: &str, env: &[(&str, &str)]) -> Result<()> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root)
        .args([
            "build",
            "--profile",
            PROFILE,
            "--locked",
            "--target",
            target,
            "-p",
            "sluice",
            "-p",
            "sluice-agent",
            "--bins",
        ])
        .env("CARGO_TARGET_DIR", build_dir)
        .env("RUSTFLAGS", RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    for (k, v) in env {
        cmd.env(k, v);
    }
    eprintln!("==> dist: {cmd:?}");
    let status = cmd.status().context("running cargo build for the dist binaries")?;
    if !status.success() {
        bail!("the static {target} build failed ({status}); the errors are above");
    }
    Ok(())
}

/// Why the aarch64 build is skipped, or `None` when it can run.
fn aarch64_missing() -> Option<String> {
    let targets = Command::new("rustup").args(["target", "list", "--installed"]).output();
    let installed = targets.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == AARCH64));
    if !installed {
        return Some(format!("the Rust target {AARCH64} is not installed: rustup target add {AARCH64}"));
    }
    if Command::new(AARCH64_LINKER).arg("--version").output().is_err() {
        return Some(format!(
            "no cross linker {AARCH64_LINKER}: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
        ));
    }
    None
}

/// `objcopy --only-keep-debug` into `out/NAME.debug`, then a copy stripped of everything
/// but what runs, linked to the debug file by name (`.gnu_debuglink`), as `out/NAME`.
fn split_debug(built: &Path, out: &Path, name: &str) -> Result<()> {
    let debug = format!("{name}.debug");
    let link = format!("--add-gnu-debuglink={debug}");
    objcopy(out, &["--only-keep-debug".as_ref(), built.as_os_str(), debug.as_ref()])?;
    objcopy(out, &["--strip-all".as_ref(), link.as_ref(), built.as_os_str(), name.as_ref()])
}

/// Runs `objcopy` in `dir` (so the debug link records the bare file name).
fn objcopy(dir: &Path, args: &[&std::ffi::OsStr]) -> Result<()> {
    let mut cmd = Command::new("objcopy");
    cmd.current_dir(dir).args(args);
    let status = cmd.status().context("running objcopy (install binutils: apt-get install binutils)")?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn size(path: &Path) -> Result<u64> {
    Ok(path.metadata().with_context(|| format!("{} is missing", path.display()))?.len())
}

/// Refuses a built binary that is not what [`RUSTFLAGS`] asks for: dynamically linked
/// (a `PT_INTERP`: it would need the host's loader and libc), or with its relative
/// relocations unpacked (no `DT_RELR`).
fn check_linked_as_shipped(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let overridden = "is RUSTFLAGS overridden by .cargo/config.toml?";
    if !elf::is_static_executable(&bytes) {
        bail!(
            "{} is not a static executable (it has a program interpreter): the build did not apply \
             `-C target-feature=+crt-static`; {overridden}",
            path.display()
        );
    }
    if !elf::has_packed_relocs(&bytes) {
        bail!(
            "{} has no packed relative relocations (DT_RELR): the build did not apply \
             `-z pack-relative-relocs`, so every process would read and keep resident a \
             relocation table of about 224 KiB; {overridden}",
            path.display()
        );
    }
    Ok(())
}

/// `SHA256SUMS` (the `sha256sum -c` format) of the binaries and their debug files.
fn write_sha256sums(out: &Path) -> Result<()> {
    let mut names: Vec<String> = BINARIES.iter().flat_map(|n| [n.to_string(), format!("{n}.debug")]).collect();
    names.sort();
    let output =
        Command::new("sha256sum").current_dir(out).args(&names).output().context("running sha256sum (coreutils)")?;
    if !output.status.success() {
        bail!("sha256sum failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    std::fs::write(out.join("SHA256SUMS"), &output.stdout).context("writing SHA256SUMS")
}

/// `out/image-NAME/`: `Dockerfile`, the binary and an empty `state/` (mode 0700).
fn image_context(root: &Path, out: &Path, image: &Image) -> Result<()> {
    let dir = out.join(format!("image-{}", image.name));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    let state = dir.join("state");
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    std::fs::copy(root.join(image.dockerfile), dir.join("Dockerfile"))
        .with_context(|| format!("copying {}", image.dockerfile))?;
    std::fs::copy(out.join(image.binary), dir.join(image.binary))
        .with_context(|| format!("copying {} into {}", image.binary, dir.display()))?;
    Ok(())
}

/// The size table `dist` prints: per binary, unstripped, stripped and debug file, in MB.
fn size_table(rows: &[(String, u64, u64, u64)]) -> String {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let mut s = format!("{:<14} {:>12} {:>12} {:>12}\n", "binary", "unstripped", "stripped", "debug file");
    for (name, unstripped, stripped, debug) in rows {
        s += &format!("{name:<14} {:>12} {:>12} {:>12}\n", mb(*unstripped), mb(*stripped), mb(*debug));
    }
    s.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_table_has_a_row_per_binary() {
        let t = size_table(&[("sluice".into(), 86_000_000, 20_500_000, 65_000_000)]);
        assert!(t.lines().nth(1).unwrap().contains("86.0 MB"), "{t}");
        assert!(t.lines().nth(1).unwrap().contains("20.5 MB"), "{t}");
    }
}

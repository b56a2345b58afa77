//! Build-script helper of `sluice-runtime` (included with `#[path]`, so it has no
//! dependencies): it names the build in `--version`, the logs and the `*_build_info`
//! metrics of both binaries.
//!
//! Sets `SLUICE_GIT_COMMIT` (`git rev-parse --short HEAD`, or `unknown` when git or the
//! repository is absent — a source tarball, a Docker context without `.git`) and
//! `SLUICE_BUILD_DATE` (UTC `YYYY-MM-DD`, from `SOURCE_DATE_EPOCH` for reproducible
//! builds, else now). It asks Cargo to rerun only when `HEAD` or the branch it points to
//! moves, so a commit updates the version without rebuilding on every `cargo build`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Prints the `cargo:` lines; call it before anything that may return early.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=SLUICE_GIT_COMMIT={commit}");
    for path in watched_git_files() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let epoch =
        std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
        });
    let (y, m, d) = civil_date(epoch / 86_400);
    println!("cargo:rustc-env=SLUICE_BUILD_DATE={y:04}-{m:02}-{d:02}");
}

/// Runs git in the package directory; `None` when git is missing or fails.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !s.is_empty()).then_some(s)
}

/// `HEAD` and the file holding the commit of the branch it points to (the loose ref if
/// there is one, else `packed-refs`). Works in linked worktrees, whose `HEAD` and refs
/// live in different directories. Only existing files: Cargo reruns every time for a
/// missing one.
fn watched_git_files() -> Vec<PathBuf> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_default();
    let path = |p: &str| git(&["rev-parse", "--git-path", p]).map(|s| dir.join(s));
    let mut files: Vec<PathBuf> = path("HEAD").into_iter().collect();
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        files.extend(path(&branch).filter(|p| p.exists()).or_else(|| path("packed-refs")));
    }
    files.retain(|p| Path::new(p).exists());
    files
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(m <= 2), m, d)
}

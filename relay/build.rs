//! Names the build: sets `SLUICE_GIT_COMMIT` and `SLUICE_BUILD_DATE` for `--version`,
//! the start-up log line and `sluice_build_info` (see `proto/build_version.rs`).

#[path = "../proto/build_version.rs"]
mod build_version;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../proto/build_version.rs");
    build_version::emit();
}

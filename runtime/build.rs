//! Names the build: sets `SLUICE_GIT_COMMIT` and `SLUICE_BUILD_DATE` for the version
//! constants both binaries print in `--version`, log at start and export as
//! `*_build_info` (see `build_version.rs`).

#[path = "build_version.rs"]
mod build_version;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build_version.rs");
    build_version::emit();
}

#!/usr/bin/env bash
# Installs what `cargo xtask fuzz` needs: cargo-fuzz (pinned) and the nightly toolchain
# libFuzzer's instrumentation needs — the nightly the project already pins for the eBPF
# program (scripts/setup-ebpf.sh), so nothing new is downloaded for it — and a C++
# compiler (libfuzzer-sys builds libFuzzer from source). Idempotent: skips what is present.
set -euo pipefail
NIGHTLY="${SLUICE_FUZZ_NIGHTLY:-${SLUICE_EBPF_NIGHTLY:-nightly-2026-10-29}}"
CARGO_FUZZ_VERSION=0.13.2

if rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
  echo "fuzz toolchain present ($NIGHTLY)"
else
  echo "installing $NIGHTLY"
  rustup toolchain install "$NIGHTLY" --profile minimal
fi

if cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz $CARGO_FUZZ_VERSION\$"; then
  echo "cargo-fuzz $CARGO_FUZZ_VERSION present"
else
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION (about 30 s)"
  cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

if command -v c++ >/dev/null 2>&1; then
  echo "C++ compiler present ($(command -v c++))"
else
  echo "installing g++ (libFuzzer is C++)"
  apt-get install -y --no-install-recommends g++ >/dev/null || { apt-get update >/dev/null && apt-get install -y --no-install-recommends g++ >/dev/null; }
fi

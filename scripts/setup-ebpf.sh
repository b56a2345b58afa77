#!/usr/bin/env bash
# Installs what building the agent's eBPF program needs: a pinned nightly toolchain with
# rust-src (the BPF target is built from source) and bpf-linker 0.10.4. Idempotent: skips
# what is present. Without them the agent still builds, without the program.
set -euo pipefail
NIGHTLY="${SLUICE_EBPF_NIGHTLY:-nightly-2026-10-29}"

if rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1 \
   && rustup component list --toolchain "$NIGHTLY" --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "eBPF toolchain present ($NIGHTLY with rust-src)"
else
  echo "installing $NIGHTLY with rust-src"
  rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src
fi

if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q '0\.10\.4'; then
  echo "bpf-linker 0.10.4 present"
else
  echo "installing bpf-linker 0.10.4 (about 2 minutes)"
  cargo install bpf-linker --version 0.10.4 --locked
fi

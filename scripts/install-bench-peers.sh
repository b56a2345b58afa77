#!/usr/bin/env bash
# Installs the Debian packages `cargo xtask bench-peers` compares Sluice against:
# iperf3 (load generator and the no-tunnel baseline), socat (plain TCP forwarder) and
# stunnel4 (TLS tunnel pair). openssl makes the throwaway certificates for stunnel.
# pgbench (from postgresql-client) drives the small-message figure against Debian's
# postgresql server; bpftool reads the eBPF counter's run time (kernel BPF statistics).
# Idempotent: does nothing when they are present. Needs root (apt-get) only when
# something is missing. Exits non-zero when a package is still missing at the end; the
# benchmark then reports that peer as not available instead of stopping.
# (rathole and bore come from crates.io: the xtask command cargo-installs those.)
set -euo pipefail

# command → Debian package
declare -A packages=([iperf3]=iperf3 [socat]=socat [stunnel4]=stunnel4 [openssl]=openssl
  [pgbench]=postgresql-client [bpftool]=bpftool)

missing_pkgs() {
  local cmd
  for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || echo "${packages[$cmd]}"
  done | sort
}

missing=($(missing_pkgs))
if [ ${#missing[@]} -eq 0 ]; then
  echo "bench peers present (iperf3, socat, stunnel4, openssl, pgbench, bpftool)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing bench peers: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing bench peers: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Keep package scripts from starting system services (iperf3 and stunnel4 ship some):
# the benchmark starts its own, on loopback.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && created_policy=1
fi
install() { apt-get install -y --no-install-recommends "$@" >/dev/null 2>&1; }
if ! install "${missing[@]}"; then
  apt-get update >/dev/null 2>&1 || true
  # One at a time, so one package that cannot be had does not keep out the others.
  for p in "${missing[@]}"; do
    install "$p" || echo "could not install $p (apt-get install $p failed)" >&2
  done
fi
[ "$created_policy" = 1 ] && rm -f "$policy"

still=($(missing_pkgs))
if [ ${#still[@]} -ne 0 ]; then
  echo "still missing: ${still[*]}" >&2
  exit 1
fi
echo "installed: ${missing[*]}"

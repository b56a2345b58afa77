#!/usr/bin/env bash
# Installs what the end-to-end tests start for real: a PostgreSQL server, an OpenSSH
# sftp server and the network-fault tools (Debian packages). Idempotent: does nothing when they are present.
# Needs root (apt-get) only when something is missing.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v sftp >/dev/null 2>&1 || missing+=(openssh-client)
# The network-fault tests: namespaces and veth (iproute2), packet loss and firewalls
# (nftables), segmentation offloads off so that loss hits real packets (ethtool).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v ethtool >/dev/null 2>&1 || missing+=(ethtool)
# The compose files are validated against the vendored compose-spec schema (Debian's
# python3, tests/tests/deploy.rs); systemd-analyze checks the units.
/usr/bin/python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
/usr/bin/python3 -c 'import jsonschema' >/dev/null 2>&1 || missing+=(python3-jsonschema)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# The proxy tests: a real HTTP CONNECT forward proxy.
command -v tinyproxy >/dev/null 2>&1 || [ -x /usr/bin/tinyproxy ] || missing+=(tinyproxy)

if [ ${#missing[@]} -eq 0 ]; then
  echo "test dependencies present (postgresql, openssh-server, iproute2, nftables, ethtool, python3-yaml, python3-jsonschema, systemd, tinyproxy)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing test dependencies: ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "installing test dependencies: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Keep package scripts from starting system services: the tests start their own.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && created_policy=1
fi
apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
  apt-get update >/dev/null
  apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
}
[ "$created_policy" = 1 ] && rm -f "$policy"
echo "installed: ${missing[*]}"

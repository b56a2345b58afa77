#!/usr/bin/env bash
# Measures which functions a running agent uses and writes them to agent/link-order.txt,
# the profile `cargo xtask dist` lays the agent's code out by (xtask/src/link_order.rs;
# docs/benchmarks.md, "Memory: what the agent's RSS is made of").
#
#   sudo scripts/profile-agent-code.sh [AGENT_BINARY]
#
# How: a profiling build of the agent (the dist profile, every function starting a page)
# runs from a loop-mounted ext4 with read-ahead off, freshly mounted, so its page cache
# holds only the pages the agent faulted in, one page each. It enrols with a local relay
# (target/dist/sluice, from `cargo xtask dist`), carries 20 streams to an echo service,
# idles 15 s; then every function with a page resident (/proc/PID/pagemap) is written
# out, by name without its build hash. AGENT_BINARY skips the profiling build.
#
# Needs root (loop device, pagemap), python3, nm, mkfs.ext4. Run it again after large
# changes to the agent's code or dependencies: names it no longer finds are skipped, and
# new code lands after the profiled functions, where it costs memory only when run.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=$root/target/profile-build
mkdir -p "$work"

agent=${1:-}
if [[ -z $agent ]]; then
    echo "==> profiling build of the agent (dist profile, page-aligned functions): $work"
    CARGO_TARGET_DIR=$work/target \
        RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs -C llvm-args=-align-all-functions=12" \
        CFLAGS="-falign-functions=4096" \
        cargo build --profile dist --locked --target x86_64-unknown-linux-gnu -p sluice-agent --bin sluice-agent
    agent=$work/target/x86_64-unknown-linux-gnu/dist/sluice-agent
fi
relay=$root/target/dist/sluice
[[ -x $relay ]] || { echo "no $relay: run cargo xtask dist first" >&2; exit 1; }

run=$(mktemp -d "$work/run.XXXX")
mnt=$run/mnt
pids=()
loop=
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    mountpoint -q "$mnt" && umount "$mnt"
    [[ -n $loop ]] && losetup -d "$loop"
    rm -rf "$run"
}
trap cleanup EXIT

# The agent's own filesystem: every page it runs is read on its fault, alone.
truncate -s 256M "$run/fs.img"
mkfs.ext4 -q -F "$run/fs.img"
loop=$(losetup -f --show "$run/fs.img")
echo 0 > "/sys/block/$(basename "$loop")/queue/read_ahead_kb"
mkdir "$mnt"
mount "$loop" "$mnt"
cp "$agent" "$mnt/sluice-agent"
umount "$mnt"
mount "$loop" "$mnt"

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo_port=$(port) agent_port=$(port) admin_port=$(port) resource_port=$(port)
python3 - "$echo_port" <<'EOF' &
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
def echo(c):
    while (d := c.recv(65536)):
        c.sendall(d)
    c.close()
while True:
    threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
EOF
pids+=($!)
"$relay" serve --data-dir "$run/relay" --agent-listen "127.0.0.1:$agent_port" \
    --admin-listen "127.0.0.1:$admin_port" --public-url "https://127.0.0.1:$agent_port" \
    --resource-bind 127.0.0.1 --resource-ports "$resource_port-$resource_port" --log warn \
    > "$run/relay.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do [[ -f $run/relay/admin-url ]] && break; sleep 0.1; done
customer=$("$relay" customers create profile --data-dir "$run/relay")
jwt=$("$relay" resources registration-jwt --customer-id "$customer" --data-dir "$run/relay")
env -i STATE_DIR="$run/agent" APP_HOST=127.0.0.1 APP_PORT="$echo_port" NAME=profile \
    REGISTRATION_JWT="$jwt" SLUICE_LOG=warn "$mnt/sluice-agent" > "$run/agent.log" 2>&1 &
agent_pid=$!
pids+=($agent_pid)
for _ in $(seq 150); do
    "$relay" resources list --data-dir "$run/relay" 2>/dev/null | grep -q AVAILABLE && break
    sleep 0.2
done
endpoint=$("$relay" resources endpoint profile --data-dir "$run/relay")
python3 - "${endpoint##*:}" <<'EOF'
import socket, sys
for i in range(20):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    data = b"x" * (1 << 20 if i % 5 == 4 else 5)
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        got += s.recv(1 << 16)
    s.close()
EOF
sleep 15

python3 - "$agent_pid" "$agent" "$root/agent/link-order.txt" "$(git rev-parse --short HEAD)" <<'EOF'
import os, re, struct, subprocess, sys
pid, binary, out, commit = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
exe = os.readlink(f"/proc/{pid}/exe")
starts = []
for line in open(f"/proc/{pid}/maps"):
    f = line.split()
    if len(f) > 5 and f[5] == exe:
        lo = int(f[0].split("-")[0], 16)
        starts.append(lo - int(f[2], 16))
base = min(starts)
pagemap = open(f"/proc/{pid}/pagemap", "rb")
def resident(va):
    pagemap.seek((va + base) // 4096 * 8)
    d = pagemap.read(8)
    return len(d) == 8 and struct.unpack("<Q", d)[0] >> 63 == 1
def stable(name):  # as xtask/src/link_order.rs stable_name
    m = re.match(r"^(.*)\.(\d+)$", name)
    if m:
        name = m.group(1).removesuffix(".llvm")
    return re.sub(r"17h[0-9a-f]{16}E$", "E", name)
nm = subprocess.run(["nm", "--numeric-sort", "--print-size", "--defined-only", binary],
                    capture_output=True, text=True, check=True).stdout
names, seen, size = [], set(), 0
for line in nm.splitlines():
    f = line.split()
    if len(f) != 4 or f[2] not in ("t", "T", "W"):
        continue
    addr, n = int(f[0], 16), int(f[1], 16)
    if any(resident(p) for p in range(addr // 4096 * 4096, addr + max(n, 1), 4096)):
        size += n
        s = stable(f[3])
        if s not in seen:
            seen.add(s)
            names.append(s)
with open(out, "w") as o:
    o.write("# The functions a running agent touched, in the order dist lays them out first\n"
            "# (xtask/src/link_order.rs). Written by scripts/profile-agent-code.sh at "
            f"{commit}: enrol, 20 streams\n# through the tunnel, 15 s idle. Names without "
            "their build hash.\n")
    o.write("\n".join(names) + "\n")
print(f"{len(names)} functions ({size / 1e6:.2f} MB) -> {out}")
EOF

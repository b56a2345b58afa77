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
# (target/dist/sluice, from `cargo xtask dist`) and fills its pool, and gives back its
# start-up code (agent/src/startup_code.rs): the functions with a page in the page cache
# then (mincore) are start-up's. The binary's pages are then evicted (process_madvise
# MADV_PAGEOUT, posix_fadvise DONTNEED) and the agent idles, carries 20 streams to an
# echo service, then a burst of 12 at once and a reset: the functions read again after
# each phase are what a running agent uses, most common first. Those go first in the
# file, then the rest of start-up's, each by name without its build hash.
# AGENT_BINARY skips the profiling build.
#
# Needs root (loop device, process_madvise), python3, nm, mkfs.ext4. Run it again after large
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
    [[ -n ${KEEP_RUN:-} ]] || rm -rf "$run"
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
    try:
        while (d := c.recv(65536)):
            c.sendall(d)
    except OSError:  # the reset stream's
        pass
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
# The default log level, as the agent runs for users: the code that formats its lines
# is part of what runs.
env -i STATE_DIR="$run/agent" APP_HOST=127.0.0.1 APP_PORT="$echo_port" NAME=profile \
    REGISTRATION_JWT="$jwt" "$mnt/sluice-agent" > "$run/agent.log" 2>&1 &
agent_pid=$!
pids+=($agent_pid)
# From the moment the agent gives back its start-up code, whatever runs is read again.
functions() { python3 "$root/scripts/resident-functions.py" "$@"; }
functions --at-release "$agent_pid" "$mnt/sluice-agent" "$run/agent.log" "$run/startup.pages" &
released=$!
for _ in $(seq 150); do
    "$relay" resources list --data-dir "$run/relay" 2>/dev/null | grep -q AVAILABLE && break
    sleep 0.2
done
wait $released
functions "$mnt/sluice-agent" "$agent" "$run/startup.txt" "$run/startup.pages"
endpoint=$("$relay" resources endpoint profile --data-dir "$run/relay")
# What a running agent does, in three phases, each read after it, so that the code of
# the commonest states comes first: (1) idle (heartbeats, the service check, the pool's
# upkeep); (2) streams one after another, small and 1 MiB; (3) a burst of 12 held at
# once (the pool runs dry: new and resumed data handshakes, session tickets, a larger
# pool), a stream the client resets (its end is logged), and idle again.
sleep 12
functions "$mnt/sluice-agent" "$agent" "$run/idle.txt"
python3 - "${endpoint##*:}" <<'EOF'
import socket, sys
port = int(sys.argv[1])
for i in range(20):
    s = socket.create_connection(("127.0.0.1", port))
    data = b"x" * (1 << 20 if i % 5 == 4 else 5)
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        got += s.recv(1 << 16)
    s.close()
EOF
functions "$mnt/sluice-agent" "$agent" "$run/streams.txt"
python3 - "${endpoint##*:}" <<'EOF'
import socket, struct, sys, time
port = int(sys.argv[1])
def echo(s, data):
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        got += s.recv(1 << 16)
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
for s in held:
    echo(s, b"burst")
time.sleep(0.3)
for s in held:
    s.close()
s = socket.create_connection(("127.0.0.1", port))
echo(s, b"reset")
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
s.close()
EOF
sleep 12
functions "$mnt/sluice-agent" "$agent" "$run/load.txt"
{
    echo "# The functions a running agent uses (idle first, then streams, then a burst), then the"
    echo "# rest of those start-up ran, in the order dist lays them out (xtask/src/link_order.rs)."
    echo "# Written by scripts/profile-agent-code.sh at $(git rev-parse --short HEAD): enrol, fill the"
    echo "# pool, give back start-up code; idle; 20 streams; a burst of 12, a reset, idle. Names"
    echo "# without their build hash."
    cat "$run/idle.txt"
    grep -vxF -f "$run/idle.txt" "$run/streams.txt" || true
    grep -vxF -f "$run/streams.txt" "$run/load.txt" || true
    echo "# start-up only"
    grep -vxF -f "$run/load.txt" "$run/startup.txt" || true
} > "$root/agent/link-order.txt"
echo "functions: $(wc -l < "$run/idle.txt") idle, $(wc -l < "$run/streams.txt") with streams," \
    "$(wc -l < "$run/load.txt") with the burst; $(grep -cvxF -f "$run/load.txt" "$run/startup.txt")" \
    "more at start-up -> agent/link-order.txt"

#!/bin/busybox sh
# /init of the kTLS test VM (xtask/src/vm): the kernel runs this as PID 1 from the
# initramfs that `cargo xtask vm-test` builds. It prepares a minimal system, loads the
# kernel TLS modules, runs the caller's driver script (/driver.sh), prints
# `VM-DONE rc=N` and powers the VM off. Lines starting with `PASS ` / `FAIL ` are the
# results the harness counts; everything else is for people reading the log.
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin
export HOME=/tmp

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

echo "vm-init: kernel $(uname -r), $(nproc) cpus, $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"

# No depmod/modules.dep in here: the harness resolved the load order on the host and
# wrote it to /lib/modules/load.list ("name path required|optional" per line).
while read -r name path need; do
    if ! out=$(insmod "$path" 2>&1); then
        if [ "$need" = required ]; then
            echo "FAIL ktls-module insmod $name: $out"
        else
            echo "vm-init: optional module $name not loaded: $out"
        fi
    fi
done < /lib/modules/load.list

ip link set lo up

ulp=$(cat /proc/sys/net/ipv4/tcp_available_ulp 2>/dev/null)
case " $ulp " in
    *" tls "*) echo "vm-init: kTLS ready (tcp_available_ulp: $ulp)" ;;
    *) echo "FAIL ktls-module tls missing from /proc/sys/net/ipv4/tcp_available_ulp ('$ulp')" ;;
esac

cd /tmp
echo "vm-init: running driver"
sh /driver.sh
rc=$?
echo "VM-DONE rc=$rc"
sync
poweroff -f

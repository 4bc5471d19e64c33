#!/bin/sh
# /init of the Linux dom0 that `cargo xtask run --mode xl` boots under Xen.
#
# Brings up the Xen toolstack (xenstored, xen-init-dom0, xenconsoled), starts
# the guest described by /guest/guest.cfg with `xl create`, copies the guest's
# console log to dom0's console (hvc0, which Xen writes to the serial port),
# and powers off once the guest domain is gone. Every line this script prints
# itself starts with "xl-dom0:" so the harness can tell them from the guest's.
# It never prints the guest's report or result markers itself.

/bin/busybox mkdir -p /proc /sys /dev /run /tmp /usr/bin /usr/sbin /sbin /bin
/bin/busybox --install -s
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu:/lib/x86_64-linux-gnu

say() { echo "xl-dom0: [$(cut -d' ' -f1 /proc/uptime)] $*"; }
die() {
    say "FAILED: $*"
    poweroff -f
    sleep 5
    exit 1
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console /var/lib/xen /var/lib/xenstored

# shellcheck disable=SC2013
for module in $(cat /etc/xl-dom0/modules); do
    insmod "$module" || die "insmod $module"
done
mount -t xenfs xenfs /proc/xen || die "mount xenfs"
grep -q control_d /proc/xen/capabilities || die "not running as the control domain"
say "xen modules loaded, $(cat /sys/hypervisor/version/major 2>/dev/null).$(cat /sys/hypervisor/version/minor 2>/dev/null) hypervisor"

xenstored --pid-file=/run/xenstored.pid || die "xenstored"
tries=0
until xenstore-read -s / >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -gt 100 ] && die "xenstored did not answer"
    sleep 0.1
done
xen-init-dom0 >/tmp/xen-init-dom0.log 2>&1 || { cat /tmp/xen-init-dom0.log; die "xen-init-dom0"; }
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console || die "xenconsoled"
say "toolstack up"

name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' /guest/guest.cfg)
log=/var/log/xen/console/guest-$name.log
timeout=$(cat /guest/timeout 2>/dev/null || echo 600)

xl create /guest/guest.cfg >/tmp/xl-create.log 2>&1 || { cat /tmp/xl-create.log; die "xl create"; }
say "guest $name created; its console follows"

# Copy the console log as it grows. Only whole bytes already in the file are
# copied (size read first), so nothing is printed twice or skipped.
done_bytes=0
copy_new() {
    [ -f "$log" ] || return 0
    size=$(stat -c %s "$log")
    if [ "$size" -gt "$done_bytes" ]; then
        tail -c +$((done_bytes + 1)) "$log" | head -c $((size - done_bytes))
        done_bytes=$size
    fi
}

# The guest is running while xenstore lists a domain other than dom0: libxl
# removes /local/domain/<domid> when it destroys the domain (on_poweroff =
# "destroy"). Polling xenstore is far lighter than running `xl` each time,
# and dom0 shares the one CPU with the guest. A guest that is already gone
# (it can run to its end while `xl create` returns) ends the loop at once.
# A failed listing (xenstored slow to answer while the guest's vCPUs keep
# the physical CPUs busy, or the client crashing: both seen with a 2-vCPU
# guest) says nothing about the guest: count it as running; the timeout
# below still bounds the wait.
# The test of the listing uses shell builtins only: a `grep` here once
# segfaulted in dom0 (a loaded host, 2-vCPU guest), and its exit status
# read as "only dom0 left" ended the watch of a running guest.
guest_running() {
    domains=$(xenstore-list /local/domain 2>/dev/null) || return 0
    [ -n "$domains" ] || return 0
    for d in $domains; do
        [ "$d" = 0 ] || return 0
    done
    return 1
}

start=$(cut -d. -f1 /proc/uptime)
while guest_running; do
    copy_new
    now=$(cut -d. -f1 /proc/uptime)
    if [ $((now - start)) -gt "$timeout" ]; then
        say "guest still running after ${timeout}s: destroying it"
        xl destroy "$name"
        break
    fi
    sleep 0.1
done
# The guest drains its ring before it shuts down and xenconsoled writes what
# it reads at once; this covers a guest that died without draining.
sleep 0.1
copy_new
echo
# xl's monitor process (forked by `xl create`) logs why the domain ended.
code=$(sed -n 's/.*has shut down, reason code \([0-9]*\).*/\1/p' "/var/log/xen/xl-$name.log" 2>/dev/null | head -n 1)
case "$code" in
    0) reason=poweroff ;;
    1) reason=reboot ;;
    2) reason=suspend ;;
    3) reason=crash ;;
    4) reason=watchdog ;;
    5) reason=soft_reset ;;
    *) reason=unknown ;;
esac
say "guest domain $name is gone after $(( $(cut -d. -f1 /proc/uptime) - start ))s, shutdown reason: $reason; powering off"
if [ "$reason" != poweroff ]; then
    # Why it ended, as far as dom0 saw it: xl's log and the kernel's last words.
    tail -n 5 "/var/log/xen/xl-$name.log" 2>/dev/null | while read -r line; do say "xl log: $line"; done
    dmesg 2>/dev/null | tail -n 8 | while read -r line; do say "dmesg: $line"; done
fi
poweroff -f

#!/bin/busybox sh
# /init of the sheep demo/test guest (packed into the initramfs by scripts/build-guest.sh).
#
# It runs as PID 1 from the initramfs and never pivots to a disk: the guest's disks stay free
# for the job (or the person at the console) to format, mount and check. Its console lines
# starting with "sheep-guest:" are the protocol qemu_driver/guest.py reads, so keep them
# stable. PID 1 must never exit (the kernel would panic), hence the poweroff at every end.

export PATH=/bin HOME=/root

mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console when built without root: take the console explicitly.
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
hostname sheep-guest

# virtio (and virtio_blk) are modules in Debian's cloud kernel; ext4 and crc32c are built in.
# Loading virtio_blk probes every disk synchronously, so /dev/vd* exist once it returns.
while read -r module; do
    modprobe "$module" || echo "sheep-guest: cannot load module $module"
done </etc/sheep-modules

job=""
agent=on
set -f  # /proc/cmdline is split on blanks: never glob its words
for word in $(cat /proc/cmdline); do
    case "$word" in
        sheep.job=*) job="${word#sheep.job=}" ;;
        sheep.agent=*) agent="${word#sheep.agent=}" ;;
    esac
done
set +f

# The ACPI power button (QEMU's system_powerdown, which `dog vm stop` sends) ends whatever
# runs; this script then shuts down as after any job: unmount, sync, power off. One evdev
# event is one press; kill -1 spares PID 1 and the watcher itself.
for event in /sys/class/input/event*; do
    [ "$(cat "$event/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (
        dd if="/dev/input/${event##*/}" of=/dev/null bs=24 count=1 2>/dev/null || exit
        echo "sheep-guest: power button"
        kill -TERM -1
        sleep 2
        kill -KILL -1
    ) &
done

# qemu-guest-agent on its virtio-serial port, which QEMU names org.qemu.guest_agent.0 (the
# name udev would link in /dev/virtio-ports/; there is no udev here). `sheep.agent=off`
# leaves it out, for a guest without an agent.
if [ "$agent" != off ]; then
    for port in /sys/class/virtio-ports/*; do
        [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        qemu-ga --method=virtio-serial --path="/dev/${port##*/}" --statedir=/run \
            --logfile=/run/qemu-ga.log &
        echo "sheep-guest: guest agent on ${port##*/}"
    done
fi

echo "sheep-guest: ready"

if [ -n "$job" ]; then
    # The job is gzip then base64 (see qemu_driver/guest.py): the kernel command line is
    # short, and gzip roughly doubles what fits.
    if echo "$job" | base64 -d | gunzip >/job.sh 2>/dev/null; then
        cd /
        sh /job.sh </dev/null
        status=$?
    else
        echo "sheep-guest: job does not decode (gzip+base64 expected)"
        status=125
    fi
    echo "sheep-guest: job exit $status"
else
    echo "sheep-guest: no job; interactive shell (exit it to power off)"
    setsid cttyhack sh -l
fi

# Nothing a job wrote may be left in the page cache when QEMU exits: unmount what it left
# mounted (read-only if busy), then flush whatever is left.
sync
grep '^/dev/' /proc/mounts | while read -r _ point _; do
    umount "$point" 2>/dev/null || mount -o remount,ro "$point" 2>/dev/null
done
sync
echo "sheep-guest: power off"
poweroff -f

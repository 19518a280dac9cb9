#!/usr/bin/env bash
# Builds the small guest that demos and tests boot under QEMU (qemu_driver/guest.py): Debian's
# cloud kernel and an initramfs of busybox-static, the kernel modules it needs, qemu-guest-agent
# with its libraries, and our /init. All come from Debian packages fetched with
# `apt-get download` at set-up time and unpacked with `dpkg-deb -x` (never installed on the
# host), so nothing is downloaded at run time.
#
# Output (gitignored): $SHEEP_GUEST_DIR (default .cache/guest/) with vmlinuz, initrd.img and
# a stamp. Idempotent: when the stamp matches this script and the /init template, a run only
# checks it. `--force` rebuilds (e.g. to pick up a newer kernel after `apt-get update`).
set -euo pipefail
self="$(realpath "$0")"
cd "$(dirname "$self")/.."

out="${SHEEP_GUEST_DIR:-.cache/guest}"
init_template=qemu_driver/guest_init.sh
# What the guest needs from the kernel's modules (their dependencies come along by
# modules.dep): virtio-pci transport, virtio-blk disks, virtio-console (the guest agent's
# channel), the ACPI power button with evdev to read it (a graceful `dog vm stop`), and the
# pvpanic device's driver (a kernel panic reaches QEMU, so `dog vm info` says "crashed").
# ext4 (which also mounts ext2, all busybox's mke2fs makes) and crc32c are built in.
modules=(virtio_pci virtio_blk virtio_console button evdev pvpanic-pci)
# The guest agent (qemu-ga, for `dog vm snapshot`'s filesystem freeze) is a dynamic binary:
# its package and every package of its library closure; only the libraries it loads are
# copied in. The closure is computed by apt, so it follows Debian's dependencies.
agent_packages() {
    apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances --no-pre-depends qemu-guest-agent |
        grep -v '^[ <]' | sort -u
}

fingerprint="$(cat "$self" "$init_template" | sha256sum | cut -d' ' -f1)"
if [ "${1:-}" != --force ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] &&
    [ "$(head -n1 "$out/stamp" 2>/dev/null)" = "$fingerprint" ]; then
    exit 0
fi

kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}
kpkg="$(kernel_package)"
if [ -z "$kpkg" ]; then
    # a fresh machine may have no package lists yet
    apt-get update -qq
    kpkg="$(kernel_package)"
fi
if [ -z "$kpkg" ]; then
    echo "build-guest: cannot resolve linux-image-cloud-amd64 (is deb.debian.org reachable?)" >&2
    exit 1
fi
echo "build-guest: building the guest from $kpkg and busybox-static into $out"

mkdir -p "$out"
work="$(realpath "$(mktemp -d "$out/build.XXXXXX")")"
trap 'rm -rf "$work"' EXIT
# Sandbox user root: as root, apt would warn that _apt cannot write into our cache dir.
mapfile -t agent_debs < <(agent_packages)
mkdir -p "$work/agent-debs"
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static)
(cd "$work/agent-debs" && apt-get download -qq -o APT::Sandbox::User=root "${agent_debs[@]}")
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
for deb in "$work"/agent-debs/*.deb; do dpkg-deb -x "$deb" "$work/agent"; done
kver="$(ls "$work/kernel/lib/modules")"
busybox="$work/busybox/bin/busybox"
moddir="$work/kernel/lib/modules/$kver"
# The package ships no modules.dep (depmod runs at install): make one to follow dependencies.
"$busybox" depmod -b "$work/kernel" "$kver"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,root,etc,run,var} "$root/lib/modules/$kver"
ln -s /run "$root/var/run"
install -m755 "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
for module in "${modules[@]}"; do
    line="$(grep -E "^([^:]*/)?$module\.ko:" "$moddir/modules.dep")" || {
        echo "build-guest: module $module not in $kpkg" >&2
        exit 1
    }
    for file in ${line/:/}; do
        install -D -m644 "$moddir/$file" "$root/lib/modules/$kver/$file"
    done
done
cp "$moddir/modules.builtin" "$moddir/modules.order" "$root/lib/modules/$kver/"

# qemu-ga and the libraries it loads, as the packaged dynamic loader resolves them.
staged="$work/agent"
install -D -m755 "$staged/usr/sbin/qemu-ga" "$root/bin/qemu-ga"
install -D -m755 "$staged/lib64/ld-linux-x86-64.so.2" "$root/lib64/ld-linux-x86-64.so.2"
libs="$("$staged/lib64/ld-linux-x86-64.so.2" \
    --library-path "$staged/lib/x86_64-linux-gnu:$staged/usr/lib/x86_64-linux-gnu" \
    --list "$staged/usr/sbin/qemu-ga")"
if grep -q 'not found' <<<"$libs"; then
    echo "build-guest: qemu-ga needs libraries outside its dependencies:" >&2
    echo "$libs" >&2
    exit 1
fi
for lib in $(awk '$2 == "=>" && $3 ~ /^\// && $1 !~ /^\/lib64\// { print $1 "=" $3 }' <<<"$libs"); do
    install -D -m644 "$(realpath "${lib#*=}")" "$root/lib/x86_64-linux-gnu/${lib%%=*}"
done
"$busybox" depmod -b "$root" "$kver"
printf '%s\n' "${modules[@]}" >"$root/etc/sheep-modules"
install -m755 "$init_template" "$root/init"
# A console node lets the kernel hand /init its stdio; without root, /init takes it itself.
mknod -m600 "$root/dev/console" c 5 1 2>/dev/null || true

# Same packages, same bytes: no build-time timestamps in the archive.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) |
    gzip -9 -n >"$work/initrd.img"

install -m644 "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz.new"
install -m644 "$work/initrd.img" "$out/initrd.img.new"
mv "$out/vmlinuz.new" "$out/vmlinuz"
mv "$out/initrd.img.new" "$out/initrd.img"
busybox_version="$(dpkg-deb -f "$work"/busybox-static_*.deb Version)"
agent_version="$(dpkg-deb -f "$work"/agent-debs/qemu-guest-agent_*.deb Version)"
printf '%s\nkernel %s\nbusybox-static %s\nqemu-guest-agent %s\n' "$fingerprint" "$kver" \
    "$busybox_version" "$agent_version" >"$out/stamp"
echo "build-guest: kernel $kver ($(du -h "$out/vmlinuz" | cut -f1)), initrd $(du -h "$out/initrd.img" | cut -f1)"

#!/usr/bin/env bash
# Builds the small guest that demos and tests boot under QEMU (qemu_driver/guest.py): Debian's
# cloud kernel and an initramfs of busybox-static, the virtio modules and our /init. Both come
# from Debian packages fetched with `apt-get download` at set-up time and unpacked with
# `dpkg-deb -x` (never installed on the host), so nothing is downloaded at run time.
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
# modules.dep): virtio-pci transport and virtio-blk disks. ext4 (which also mounts ext2, all
# busybox's mke2fs makes) and crc32c are built into the cloud kernel.
modules=(virtio_pci virtio_blk)

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
work="$(mktemp -d "$out/build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# Sandbox user root: as root, apt would warn that _apt cannot write into our cache dir.
(cd "$work" && apt-get download -qq -o APT::Sandbox::User=root "$kpkg" busybox-static)
dpkg-deb -x "$work"/linux-image-*.deb "$work/kernel"
dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
kver="$(ls "$work/kernel/lib/modules")"
busybox="$work/busybox/bin/busybox"
moddir="$work/kernel/lib/modules/$kver"
# The package ships no modules.dep (depmod runs at install): make one to follow dependencies.
"$busybox" depmod -b "$work/kernel" "$kver"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,root,etc} "$root/lib/modules/$kver"
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
printf '%s\nkernel %s\nbusybox-static %s\n' "$fingerprint" "$kver" "$busybox_version" \
    >"$out/stamp"
echo "build-guest: kernel $kver ($(du -h "$out/vmlinuz" | cut -f1)), initrd $(du -h "$out/initrd.img" | cut -f1)"

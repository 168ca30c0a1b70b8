#!/usr/bin/env bash
# Build the outer ("L1") image the nested Linux tests boot under QEMU TCG, from
# Debian packages only:
#   OUT/vmlinuz          the Debian cloud kernel (also the guest kernel inside)
#   OUT/modules/         its /lib/modules tree (the guest initramfs takes virtio modules from it)
#   OUT/stage1.cpio.gz   busybox + virtio-blk modules: mounts the root disk, switch_root
#   OUT/rootfs.ext4      debootstrap minbase + python3 + python3-cryptography + kmod,
#                        python3-httpx, -fastapi, -uvicorn (preboot client, owner broker),
#                        iproute2, iperf3 (the owner gateway side), kvm/kvm-amd and tun
#                        modules, busybox, QEMU (for the benchmarks),
#                        /sbin/l1init
# Usage: scripts/nested-image.sh KERNEL_PACKAGE OUT
# L1 runs /sbin/l1init: loads kvm_amd, unpacks the job tar from /dev/vdb into /job,
# runs /job/run.sh and prints "L1-RESULT rc=N" before powering off.
set -euo pipefail
PKG=$1; OUT=$2
MIRROR=${SEALVM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/sealvm-nested-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { echo "nested-image: $*" >&2; }

step "downloading $PKG"
(cd "$WORK" && apt-get download -q "$PKG" >/dev/null)
dpkg-deb -x "$WORK"/*.deb "$WORK/kpkg"
KV=${PKG#linux-image-}
cp "$WORK/kpkg/boot/vmlinuz-$KV" "$OUT/vmlinuz.tmp"
rm -rf "$OUT/modules"; mkdir -p "$OUT/modules"
cp -a "$WORK/kpkg/lib/modules/$KV" "$OUT/modules/"
MODS="$WORK/kpkg/lib/modules/$KV/kernel"

step "stage-1 initramfs"
S1="$WORK/stage1"; mkdir -p "$S1"/{bin,dev,proc,sys,newroot,mod}
cp /bin/busybox "$S1/bin/busybox"
for m in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev virtio/virtio_pci_modern_dev \
         virtio/virtio_pci block/virtio_blk; do
    cp "$MODS/drivers/$m.ko" "$S1/mod/"
done
cat > "$S1/init" <<'S1INIT'
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk; do
    /bin/busybox insmod /mod/$m.ko || echo "stage1: insmod $m failed"
done
for i in 1 2 3 4 5 6 7 8 9 10; do [ -b /dev/vda ] && break; /bin/busybox sleep 0.2; done
/bin/busybox mount -t ext4 -o ro /dev/vda /newroot || { echo "stage1: no root disk"; /bin/busybox poweroff -f; }
/bin/busybox mount --move /dev /newroot/dev
/bin/busybox umount /proc /sys
exec /bin/busybox switch_root /newroot /sbin/l1init
S1INIT
chmod +x "$S1/init"
(cd "$S1" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/stage1.cpio.gz.tmp"

step "debootstrap (minbase + python3, python3-cryptography, fastapi, uvicorn, kmod, iproute2, iperf3)"
R="$WORK/rootfs"
debootstrap --variant=minbase --include=python3-minimal,python3,kmod \
    bookworm "$R" "$MIRROR" > "$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; exit 1; }
# python3-cryptography's postinst byte-compiles with python3, which debootstrap's
# base configuration pass has not set up yet: install it in a second step.
DEBIAN_FRONTEND=noninteractive chroot "$R" apt-get install -y -q --no-install-recommends \
    python3-cryptography python3-httpx python3-fastapi python3-uvicorn iproute2 iperf3 > "$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; exit 1; }
rm -rf "$R"/usr/share/{doc,man,locale,info} "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
mkdir -p "$R/lib/modules/$KV/kernel/arch/x86/kvm" "$R/lib/modules/$KV/kernel/virt/lib" "$R/job"
cp "$MODS/arch/x86/kvm/"kvm*.ko "$R/lib/modules/$KV/kernel/arch/x86/kvm/"
cp "$MODS/virt/lib/irqbypass.ko" "$R/lib/modules/$KV/kernel/virt/lib/"
mkdir -p "$R/lib/modules/$KV/kernel/drivers/net"       # the owner gateway's TAP
cp "$MODS/drivers/net/tun.ko" "$R/lib/modules/$KV/kernel/drivers/net/"
cp "$WORK/kpkg/lib/modules/$KV/"modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KV/" 2>/dev/null || true
depmod -b "$R" "$KV"
cp /bin/busybox "$R/usr/local/bin/busybox"

step "QEMU for the boot benchmark (the host's Debian qemu-system-x86 and its libraries)"
QEMU=$(command -v qemu-system-x86_64)
cp "$QEMU" "$R/usr/local/bin/qemu-system-x86_64"
for lib in $(ldd "$QEMU" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}'); do
    [ -e "$R$lib" ] || { mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"; }
done
mkdir -p "$R/usr/share/qemu" "$R/usr/share/seabios"
cp -L /usr/share/seabios/bios-256k.bin /usr/share/seabios/bios.bin "$R/usr/share/seabios/" 2>/dev/null || true
for f in bios-256k.bin linuxboot_dma.bin linuxboot.bin kvmvapic.bin qboot.rom multiboot_dma.bin; do
    [ -e "/usr/share/qemu/$f" ] && cp -L "/usr/share/qemu/$f" "$R/usr/share/qemu/"
done

cat > "$R/sbin/l1init" <<'L1INIT'
#!/bin/sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t tmpfs tmp /tmp
mount -t tmpfs run /run; mount -t tmpfs job /job
mkdir -p /dev/shm && mount -t tmpfs shm /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
modprobe kvm_amd || echo "L1: modprobe kvm_amd failed"
busybox tar -xf /dev/vdb -C /job || echo "L1: cannot unpack the job"
cd /job && sh ./run.sh
echo "L1-RESULT rc=$?"
busybox poweroff -f
L1INIT
chmod +x "$R/sbin/l1init"

step "rootfs.ext4"
mkfs.ext4 -q -F -L l1root -d "$R" "$OUT/rootfs.ext4.tmp" 1G
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"; mv "$OUT/stage1.cpio.gz.tmp" "$OUT/stage1.cpio.gz"
mv "$OUT/rootfs.ext4.tmp" "$OUT/rootfs.ext4"
echo "$KV" > "$OUT/kernel-version"
step "done: $OUT"

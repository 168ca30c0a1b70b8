#!/bin/sh
# run-qemu.sh - runs one sealvm test guest under QEMU microvm and exits with
# the guest's own status.
#
# Usage: run-qemu.sh GUEST.elf [tcg|kvm] [key=value ...]
#   The remaining words become the guest command line (-append).
#   rng*.elf get a virtio-rng-device on a version 2 (non-legacy) virtio-mmio
#   transport; blk*.elf a virtio-blk-device on the raw file $DISK.  ACPI is off so that QEMU appends the virtio_mmio.device= words
#   to the command line.
# Environment: TIMEOUT (seconds, default 60), MEM (default 256M),
#   QEMU (default qemu-system-x86_64), QEMU_EXTRA (more QEMU arguments).
# Exit status: the guest's exit status; 124 on timeout; 125 if the guest
#   ended without writing the exit port (e.g. a triple fault).

set -u
if [ $# -lt 1 ]; then
    echo "usage: $0 GUEST.elf [tcg|kvm] [key=value ...]" >&2
    exit 2
fi
elf=$1
shift
accel=tcg
case ${1:-} in
    tcg|kvm) accel=$1; shift ;;
esac

case $accel in
    kvm) accel_args="-accel kvm -cpu host,-arch-capabilities" ;;
    *)   accel_args="-accel tcg" ;;
esac
devices=""
case $(basename "$elf") in
    rng*) devices="-global virtio-mmio.force-legacy=false -device virtio-rng-device" ;;
    blk*) devices="-global virtio-mmio.force-legacy=false -drive if=none,id=d0,format=raw,file=${DISK:?blkbench needs DISK=FILE} -device virtio-blk-device,drive=d0" ;;
esac

# shellcheck disable=SC2086  # word splitting of the argument lists is intended
timeout "${TIMEOUT:-60}" "${QEMU:-qemu-system-x86_64}" \
    -M microvm,acpi=off $accel_args -m "${MEM:-256M}" -nographic -no-reboot \
    -kernel "$elf" -device isa-debug-exit,iobase=0xf4,iosize=4 $devices \
    ${QEMU_EXTRA:-} -append "$*"
rc=$?
if [ $rc -eq 124 ]; then
    echo "run-qemu: timeout" >&2
    exit 124
fi
if [ $((rc & 1)) -eq 1 ]; then
    exit $((rc >> 1))               # isa-debug-exit: (status << 1) | 1
fi
echo "run-qemu: guest ended without an exit status (qemu rc=$rc)" >&2
exit 125

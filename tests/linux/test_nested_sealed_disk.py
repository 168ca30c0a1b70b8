"""A Linux guest under its owner's manifest, with ext4 on the sealed disk, nested.

Inside one outer VM (tests/linux/nested.py) the whole owner flow runs as on a
real host: the owner's keys, a manifest signed over the Debian cloud kernel and
this initramfs together, a policy trusting this host's launcher and core, the
owner's key broker, a sealed disk made with the VM's disk key.  Then `sealvm run`
(launcher, measured core, preboot attestation, broker release) boots the kernel
with the sealed disk as virtio-blk, several times:

  format     the guest finds no filesystem: mke2fs -t ext4, writes a file (1 MiB of
             random bytes and a canary text) and its SHA-256, unmounts, e2fsck -fn
  check      the next boot mounts it, checks the file, writes a new one, fsck clean
  canary     the host searches the sealed file for the canary text (the owner's
             export of the plaintext must find it, as a control)
  tamper     the host flips one bit of the ciphertext of the block holding the file
             (found with the owner's help, to aim at data the guest will read): the
             guest gets an I/O error, not altered data; control with the
             disk_integrity defence off: the guest reads the altered data silently
  rollback   the host puts back the file as it was after `format`: the launcher's
             witness refuses it before the guest runs; control with disk_witness off:
             the guest boots on the old filesystem (its boot counter goes back)
  live-rollback  a second VM's guest keeps ext4 mounted and rewrites a file; while it
             runs the host writes the disk file back as it was before the rewrite
             (in place, under the mounted filesystem); the guest drops its page cache
             and reads the file: an I/O error, never the old data; control with
             disk_integrity off: the guest silently reads data it did not write

Every guest boot ends with one `GUEST-DISK ...` line the tests read.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import nested as N

pytestmark = [pytest.mark.kvm]

CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"
CANARY = "SEALVM-EXT4-CANARY"

DISK_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mkdir -p /proc /sys /dev /tmp /mnt /etc
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
ln -s /proc/mounts /etc/mtab
for m in virtio_ring virtio virtio_mmio virtio-rng virtio_blk; do
    insmod /lib/$m.ko || echo "GUEST-ERROR insmod $m"
done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
report() {
    dmesg | grep -i "I/O error\|EXT4-fs error\|blk_update_request" | head -5
    echo "GUEST-DISK phase=$PHASE boots=${BOOTS:-0} data=$DATA fsck=${FSCK:-none} sectors=$(cat /sys/block/vda/size 2>/dev/null)"
    poweroff -f
}
MAGIC=$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$MAGIC" = "53ef" ]; then
    # an ext4 filesystem: check the file read-only first; write nothing if it is not intact
    PHASE=check
    mount -t ext4 -o ro /dev/vda /mnt || { DATA=nomount; report; }
    BOOTS=$(cat /mnt/boots)
    OUT=$(cd /mnt && sha256sum -c data.sum 2>&1)
    echo "GUEST-SHA $OUT"
    case "$OUT" in
        *": OK"*) DATA=ok ;;
        *"I/O error"*|*"Input/output"*|*"can't"*) DATA=ioerror ;;
        *) DATA=altered ;;
    esac
    umount /mnt
    [ "$DATA" = ok ] || report
    mount -t ext4 /dev/vda /mnt || { DATA=nomount-rw; report; }
elif [ -z "$MAGIC" ]; then
    PHASE=error; DATA=unreadable; report
else
    PHASE=format; DATA=new; BOOTS=0
    /usr/bin/mke2fs -q -t ext4 -F /dev/vda > /tmp/mkfs.log 2>&1 || {
        cat /tmp/mkfs.log; DATA=mke2fs-failed; report; }
    mount -t ext4 /dev/vda /mnt || { DATA=nomount; report; }
fi
BOOTS=$((BOOTS + 1)); echo $BOOTS > /mnt/boots
{ head -c 1048576 /dev/urandom; yes CANARY | head -c 65536; } > /mnt/data
(cd /mnt && sha256sum data > data.sum)
sync; umount /mnt
/usr/bin/e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1; FSCK=$?
[ "$FSCK" = 0 ] || cat /tmp/fsck.log
report
""".replace("CANARY", CANARY)

# The live-rollback guest: ext4 mounted, a file written (v1) and rewritten (v2), each
# committed with sync; between steps it waits for a line on its console (the host acts);
# then it reads the file back from the disk and says what it got.
LIVE_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mkdir -p /proc /sys /dev /tmp /mnt /etc
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; ln -s /proc/mounts /etc/mtab
for m in virtio_ring virtio virtio_mmio virtio-rng virtio_blk; do insmod /lib/$m.ko; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
/usr/bin/mke2fs -q -t ext4 -F /dev/vda > /tmp/mkfs.log 2>&1 || cat /tmp/mkfs.log
mount -t ext4 /dev/vda /mnt
head -c 262144 /dev/urandom > /mnt/f; sync
V1=$(sha256sum /mnt/f | cut -c1-64); echo "LIVE-STEP v1"; read go
head -c 262144 /dev/urandom > /mnt/f; sync
V2=$(sha256sum /mnt/f | cut -c1-64); echo "LIVE-STEP v2"; read go
echo 3 > /proc/sys/vm/drop_caches
GOT=$(sha256sum /mnt/f 2>&1 | cut -c1-64)
case "$GOT" in
    $V2) DATA=current ;; $V1) DATA=old ;;
    *"I/O error"*|*"Input/output"*|*"can't"*|*"Bad message"*) DATA=ioerror ;;
    *) DATA=other ;;
esac
dmesg | grep -i "I/O error\|EXT4-fs error" | head -3
echo "GUEST-LIVE data=$DATA"
poweroff -f
"""

# The host's attacker tool: flip one bit in the ciphertext of both slots of one block
# (docs/sealed-disk.md: slot k of block b at data + (k * N + b) * 4160, 64-byte clear header).
TAMPER_PY = r"""
import struct, sys
path, block = sys.argv[1], int(sys.argv[2])
with open(path, "r+b") as f:
    n = struct.unpack_from("<8sIIQ16s", f.read(4096))[3]
    meta = 4096 + -(-n * 64 // 4096) * 4096
    for k in (0, 1):
        off = 4096 + 2 * meta + (k * n + block) * 4160 + 64 + 100
        f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 1]))
print(f"flipped a bit in both slots of block {block} of {n}")
"""

# The disk block holding the start of the canary text in the guest's current /data file
# (1 MiB into it), from the plaintext (the owner's export): ext4's block map, read with
# debugfs, checked against the plaintext itself. -1 when it is not there.
FIND_PY = r"""
import subprocess, sys
img, canary, off = sys.argv[1], sys.argv[2].encode(), 1 << 20
run = lambda *a: subprocess.run(a, capture_output=True, text=True).stdout
bs = int(next(l.split()[-1] for l in run("dumpe2fs", "-h", img).splitlines()
              if l.startswith("Block size:")))
fb = int(run("debugfs", "-R", f"bmap /data {off // bs}", img).split()[-1])
with open(img, "rb") as f:
    f.seek(fb * bs)
    print(fb * bs // 4096 if f.read(bs).startswith(canary) else -1)
"""

SCRIPT = r"""
# the outer root is read-only: the launcher keeps its host key and disk witness on tmpfs
export SEALVM_LAUNCHER_DIR=/run/sealvm-launcher
busybox ip link set lo up                # the broker listens on loopback
O=/tmp/owner; D=/tmp/disk.img; PORT=8477; CMD="CMDLINE"
step() { echo "JOB-STEP $*"; }
step owner; sealvm owner init $O > /dev/null || exit 1
sealvm owner sign --dir $O --kernel vmlinuz --initrd disk.cpio.gz --name lx --memory 256M \
    --devices rng,blk --cmdline "$CMD" || exit 1
M=$(sealvm measure) || exit 1
for k in host_pub:host core_measurement:core; do
    V=$(echo "$M" | python3 -c "import json,sys; print(json.load(sys.stdin)['${k%%:*}'])")
    sealvm owner policy --dir $O add ${k#*:} "$V" > /dev/null || exit 1
done
sealvm disk create 64M -o $D --owner $O --vm lx || exit 1
sealvm owner broker --dir $O --port $PORT > /tmp/broker.out 2>&1 &
python3 -c "
import socket, time
for _ in range(600):
    try: socket.create_connection(('127.0.0.1', $PORT), 1).close(); break
    except OSError: time.sleep(0.1)
else: raise SystemExit('the broker did not start: ' + open('/tmp/broker.out').read())
" || exit 1
run() { disk=$1; shift; "$@" sealvm run --kernel vmlinuz --initrd disk.cpio.gz -m 256M \
    --cmdline "$CMD" --manifest $O/vms/lx --broker http://127.0.0.1:$PORT --disk $disk; }
scenario format run $D
cp $D /tmp/after-format.img
# the owner reads the guest's filesystem offline from the plaintext export
scenario owner-view sh -c "sealvm disk export $D -o /tmp/fmt.raw --owner $O --vm lx > /dev/null && \
    e2fsck -fn /tmp/fmt.raw > /tmp/fmt.fsck 2>&1; echo fsck=\$?; \
    echo data=\$(debugfs -R 'cat /data' /tmp/fmt.raw 2>/dev/null | sha256sum | cut -c1-64); \
    echo sum=\$(debugfs -R 'cat /data.sum' /tmp/fmt.raw 2>/dev/null | cut -c1-64); cat /tmp/fmt.fsck"
scenario check run $D
scenario canary sh -c "echo sealed=\$(grep -c CANARY $D); \
    sealvm disk export $D -o /tmp/plain.raw --owner $O --vm lx > /dev/null && \
    echo plain=\$(grep -c CANARY /tmp/plain.raw) block=\$(python3 find.py /tmp/plain.raw CANARY)"
B=$(python3 find.py /tmp/plain.raw CANARY)
cp $D /tmp/t1.img; python3 tamper.py /tmp/t1.img $B
scenario tamper run /tmp/t1.img
# the same tampered disk as that boot left it (its newer generation: the witness is on)
cp /tmp/t1.img /tmp/t2.img
scenario tamper-control run /tmp/t2.img env SEALVM_TEST_MODE=1 \
    SEALVM_INSECURE_TEST_DISABLE=disk_integrity
cp /tmp/after-format.img /tmp/rolled.img
scenario rollback run /tmp/rolled.img
scenario rollback-control run /tmp/rolled.img env SEALVM_TEST_MODE=1 \
    SEALVM_INSECURE_TEST_DISABLE=disk_witness
# live rollback: the disk written back under the guest's mounted filesystem
sealvm owner sign --dir $O --kernel vmlinuz --initrd live.cpio.gz --name lv --memory 256M \
    --devices rng,blk --cmdline "$CMD" > /dev/null || exit 1
live() {  # DISK [env ...]: run the live guest, roll its disk back between v2 and the read
    img=$1; shift; rm -f /tmp/in /tmp/live.out; mkfifo /tmp/in
    "$@" sealvm run --kernel vmlinuz --initrd live.cpio.gz -m 256M --cmdline "$CMD" \
        --manifest $O/vms/lv --broker http://127.0.0.1:$PORT --disk $img \
        < /tmp/in > /tmp/live.out 2>&1 &
    pid=$!; exec 3> /tmp/in
    upto() { for i in $(seq 900); do grep -q "$1" /tmp/live.out && return 0; sleep 0.2; done; return 1; }
    upto "LIVE-STEP v1" && cp $img /tmp/live-old.img && echo go >&3
    upto "LIVE-STEP v2" && dd if=/tmp/live-old.img of=$img bs=1M conv=notrunc 2> /dev/null \
        && echo "host: rolled the disk back under the running guest" && echo go >&3
    wait $pid; rc=$?; exec 3>&-; cat /tmp/live.out; return $rc
}
sealvm disk create 64M -o /tmp/lv1.img --owner $O --vm lv > /dev/null || exit 1
sealvm disk create 64M -o /tmp/lv2.img --owner $O --vm lv > /dev/null || exit 1
scenario live-rollback live /tmp/lv1.img
scenario live-rollback-control live /tmp/lv2.img env SEALVM_TEST_MODE=1 \
    SEALVM_INSECURE_TEST_DISABLE=disk_integrity
scenario broker-log cut -c1-200 $O/broker.log
""".replace("CMDLINE", CMDLINE).replace("CANARY", CANARY)


NESTED_TIMEOUT = 1200


def nested_job(image):
    job = N.Job(image)
    conf = Path("/etc/mke2fs.conf")
    job.add("disk.cpio.gz", N.guest_initrd(
        image, DISK_INIT, modules=("kernel/drivers/block/virtio_blk.ko",),
        programs=("mke2fs", "e2fsck"),
        extra={"etc/mke2fs.conf": conf.read_bytes()} if conf.exists() else None))
    job.add("live.cpio.gz", N.guest_initrd(
        image, LIVE_INIT, modules=("kernel/drivers/block/virtio_blk.ko",), programs=("mke2fs",),
        extra={"etc/mke2fs.conf": conf.read_bytes()} if conf.exists() else None))
    job.add("tamper.py", TAMPER_PY.encode())
    job.add("find.py", FIND_PY.encode())
    job.script = SCRIPT
    return job


@pytest.fixture(scope="module")
def outer():
    return N.module_outcome(sys.modules[__name__])


def disk_report(outer, name: str) -> tuple[int | None, dict[str, str], str]:
    rc, text = outer.section(name)
    m = re.search(r"^GUEST-DISK (.*)$", text, re.M)
    return rc, (dict(kv.split("=", 1) for kv in m.group(1).split()) if m else {}), text


def test_attested_linux_makes_ext4_on_the_sealed_disk(outer):
    rc, rep, text = disk_report(outer, "format")
    assert rc == 0, f"sealvm run exited {rc}:\n{text[-4000:]}"
    assert "keys released: disk, net, snapshot" in text, text[-4000:]
    assert rep == {"phase": "format", "boots": "1", "data": "new", "fsck": "0",
                   "sectors": str(64 * 2048)}, text[-4000:]


def test_the_owner_reads_the_same_clean_filesystem_from_the_export(outer):
    """The plaintext the owner exports after the first boot is the guest's filesystem:
    clean for e2fsck, and the file matches the checksum the guest wrote beside it."""
    rc, text = outer.section("owner-view")
    assert rc == 0, text
    got = dict(re.findall(r"^(fsck|data|sum)=(\S*)$", text, re.M))
    assert got.get("fsck") == "0", text
    assert re.fullmatch(r"[0-9a-f]{64}", got.get("sum", "")) and got["data"] == got["sum"], text


def test_the_filesystem_survives_a_reboot_intact_and_clean(outer):
    rc, rep, text = disk_report(outer, "check")
    assert rc == 0, text[-4000:]
    assert rep["phase"] == "check" and rep["data"] == "ok" and rep["boots"] == "2", text[-4000:]
    assert rep["fsck"] == "0", text[-4000:]


def test_the_guests_file_never_appears_in_the_hosts_disk_file(outer):
    rc, text = outer.section("canary")
    assert rc == 0, text
    found = dict(re.findall(r"(sealed|plain|block)=(-?\d+)", text))
    assert found["sealed"] == "0", text           # the host's file: ciphertext only
    assert int(found["plain"]) > 0 and int(found["block"]) > 0, text   # the owner's export


def test_a_flipped_ciphertext_bit_is_an_io_error_in_the_guest(outer):
    rc, rep, text = disk_report(outer, "tamper")
    assert rep.get("data") == "ioerror", text[-4000:]
    assert "TAMPERING DETECTED" in text, text[-4000:]


def test_control_without_disk_integrity_the_guest_reads_altered_data(outer):
    rc, rep, text = disk_report(outer, "tamper-control")
    assert rep.get("data") == "altered", text[-4000:]
    assert "TAMPERING DETECTED" not in text


def test_a_rolled_back_disk_is_refused_before_the_guest_runs(outer):
    rc, rep, text = disk_report(outer, "rollback")
    assert rc == 125 and not rep, text[-4000:]
    assert "rollback" in text, text[-4000:]


def test_control_without_the_witness_the_guest_boots_on_the_old_filesystem(outer):
    rc, rep, text = disk_report(outer, "rollback-control")
    assert rc == 0, text[-4000:]
    assert rep["phase"] == "check" and rep["boots"] == "2", text[-4000:]   # 3 without rollback


def live_report(outer, name: str) -> tuple[str, str]:
    rc, text = outer.section(name)
    m = re.search(r"^GUEST-LIVE data=(\w+)", text, re.M)
    assert "host: rolled the disk back under the running guest" in text, text[-4000:]
    return (m.group(1) if m else ""), text


def test_a_disk_rolled_back_under_a_mounted_filesystem_is_an_io_error(outer):
    """The core keeps the disk's block table in memory from the moment it opened it: a
    block the host put back from an older copy fails its check, whatever the file says."""
    data, text = live_report(outer, "live-rollback")
    assert data == "ioerror", text[-4000:]
    assert "TAMPERING DETECTED" in text, text[-4000:]


def test_control_without_disk_integrity_the_guest_reads_what_the_host_put_back(outer):
    """Unchecked, the blocks the host put back are decrypted as if current: the guest
    reads, without an error, data that is not what it wrote."""
    data, text = live_report(outer, "live-rollback-control")
    assert data in ("old", "other"), text[-4000:]
    assert "TAMPERING DETECTED" not in text

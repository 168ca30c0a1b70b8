"""A Linux guest with everything sealed, snapshotted and live-migrated, nested.

Inside one outer VM (tests/linux/nested.py) the owner's side and two hosts run as on
real machines: the owner's keys, a manifest over the Debian cloud kernel and this
initramfs (devices rng, blk, net), the owner's broker, the owner's network gateway
(a TAP with 10.77.0.1 and an iperf3 server behind it), and two host daemons (`sealvm
hostd`, each with its own state, its VMs' cores under their own uids). The guest:

  1. mounts ext4 on the sealed virtio-blk disk (mke2fs on the first boot), writes a
     file and its SHA-256, e2fsck -fn: clean, then mounts it read-only
  2. brings up virtio-net (10.77.0.2), pings the gateway and runs iperf3 against it,
     all through the sealed tunnel
  3. keeps `memcheck` running (tests/linux/memcheck.c: rewrites 8 MiB and checks each
     pass against the last, with the guest's monotonic clock) and, every 2 s, a
     `PROBE` line: the file read back from the disk (page cache dropped) and a ping

Then the hosts act:

  create   host A creates and starts it (attested: keys from the broker)
  snapshot A seals the running VM into a snapshot; A's copy stops
  restore  host B restores it (the same disk, the same gateway)
  migrate  B live-migrates it to A (pre-copy over TCP, sealed)
  verify   A stops it; a fresh boot of the same disk finds the file intact and
           the filesystem clean

The guest's own lines are the evidence: MEMCHECK passes go on with no word lost and
no clock jump; the disk reads and the pings keep working on each new host.
"""
from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import nested as N

pytestmark = [pytest.mark.kvm]

CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"
HERE = Path(__file__).resolve().parent
NET_MODULES = ("kernel/net/core/failover.ko", "kernel/drivers/net/net_failover.ko",
               "kernel/drivers/net/virtio_net.ko")

GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mkdir -p /proc /sys /dev /tmp /mnt /etc
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; ln -s /proc/mounts /etc/mtab
for m in virtio_ring virtio virtio_mmio virtio-rng virtio_blk failover net_failover virtio_net; do
    insmod /lib/$m.ko || echo "GUEST-ERROR insmod $m"
done
for i in $(seq 100); do [ -b /dev/vda ] && [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
MAGIC=$(dd if=/dev/vda bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')
if [ "$MAGIC" = "53ef" ]; then
    # a later boot: check the file and the filesystem, report, power off
    mount -t ext4 -o ro /dev/vda /mnt && (cd /mnt && sha256sum -c data.sum) > /tmp/sum 2>&1
    grep -q ": OK" /tmp/sum && DATA=ok || DATA=bad; umount /mnt
    /usr/bin/e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1; FSCK=$?
    [ "$FSCK" = 0 ] || cat /tmp/fsck.log
    echo "GUEST-VERIFY data=$DATA fsck=$FSCK"
    poweroff -f
fi
/usr/bin/mke2fs -q -t ext4 -F /dev/vda > /tmp/mkfs.log 2>&1 || cat /tmp/mkfs.log
mount -t ext4 /dev/vda /mnt && head -c 1048576 /dev/urandom > /mnt/data \
    && (cd /mnt && sha256sum data > data.sum) && sync && umount /mnt
/usr/bin/e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1; FSCK=$?
[ "$FSCK" = 0 ] || cat /tmp/fsck.log
mount -t ext4 -o ro /dev/vda /mnt
echo "GUEST-DISK fsck=$FSCK files=$(ls /mnt | tr '\n' ,)"
ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0
ping -c 3 -W 5 10.77.0.1 > /tmp/ping 2>&1; echo "GUEST-PING rc=$? $(grep -o '[0-9]* packets received' /tmp/ping)"
/usr/bin/iperf3 -c 10.77.0.1 -t 3 -f m > /tmp/iperf 2>&1; IRC=$?
[ $IRC = 0 ] || cat /tmp/iperf
echo "GUEST-IPERF rc=$IRC mbps=$(awk '/receiver/ {print $(NF-2)}' /tmp/iperf)"
(while sleep 2; do
    echo 3 > /proc/sys/vm/drop_caches
    (cd /mnt && sha256sum -c data.sum) > /tmp/p.sum 2>&1 && D=ok || D=bad
    ping -c 1 -W 2 10.77.0.1 > /dev/null 2>&1 && P=ok || P=lost
    echo "PROBE disk=$D ping=$P"
done) &
exec /usr/bin/memcheck 8
"""

SCRIPT = r"""
busybox ip link set lo up
modprobe tun
export SEALVM_LAUNCHER_DIR=/run/sealvm-launcher
O=/tmp/owner; PUB=/run/pub; PORT=8477; CMD="CMDLINE"; BROKER=http://127.0.0.1:$PORT
GW=127.0.0.1:51820; D=/run/disk/lx.img
sealvm owner init $O > /dev/null || exit 1
sealvm owner sign --dir $O --kernel vmlinuz --initrd sealed.cpio.gz --name lx --memory 192M \
    --devices rng,blk,net --cmdline "$CMD" > /dev/null || exit 1
M=$(sealvm measure) || exit 1
for k in host_pub:host core_measurement:core; do
    V=$(echo "$M" | python3 -c "import json,sys; print(json.load(sys.stdin)['${k%%:*}'])")
    sealvm owner policy --dir $O add ${k#*:} "$V" > /dev/null || exit 1
done
# what the owner publishes for the hosts: the signed manifest and the public keys
mkdir -p $PUB/vms/lx /run/snaps /run/disk
cp $O/vms/lx/manifest.json $O/vms/lx/manifest.json.sig $PUB/vms/lx/
cp $O/owner.pub.json $PUB/; chmod -R a+rX $PUB
sealvm disk create 64M -o $D --owner $O --vm lx > /dev/null || exit 1
chown -R 63970 /run/snaps /run/disk
sealvm owner broker --dir $O --port $PORT > /tmp/broker.out 2>&1 &
sealvm owner gateway --dir $O --vm lx --listen $GW --tap sealvm0 --tap-addr 10.77.0.1/24 \
    > /tmp/gateway.out 2>&1 &
iperf3 -s -D --logfile /tmp/iperf3.log
for h in a:64100-64199 b:64200-64299; do
    sealvm hostd --state-dir=/run/${h%%:*}/state --run-dir=/run/${h%%:*}/run --host-uid=63970 \
        --uid-range=${h#*:} > /run/hostd-${h%%:*}.log 2>&1 &
done
A="sealvm vm --socket /run/a/run/hostd.sock"; B="sealvm vm --socket /run/b/run/hostd.sock"
python3 waitfor.py ready /run/a/run/hostd.sock /run/b/run/hostd.sock $PORT || {
    cat /run/hostd-*.log /tmp/broker.out /tmp/gateway.out; exit 1; }
DEV="--manifest $PUB/vms/lx --broker $BROKER --disk $D --net $GW"
scenario create $A create --kernel /job/vmlinuz --initrd /job/sealed.cpio.gz --name lx -m 192M \
    --cmdline "$CMD" $DEV --start
python3 waitfor.py console /run/a/run/hostd.sock lx MEMCHECK 4
python3 waitfor.py console /run/a/run/hostd.sock lx PROBE 2
scenario snapshot sh -c "$A snapshot lx -o /run/snaps/lx.svs && $A stop lx"
scenario console-a python3 con.py /run/a/run/hostd.sock lx
scenario restore $B restore /run/snaps/lx.svs $DEV --name lx
python3 waitfor.py console /run/b/run/hostd.sock lx PROBE 2
scenario console-b python3 con.py /run/b/run/hostd.sock lx
scenario migrate sh -c "timeout 300 $B migrate lx --to /run/a/run/hostd.sock $DEV --name lx2 \
    || { python3 dump.py; exit 1; }"
python3 waitfor.py console /run/a/run/hostd.sock lx2 PROBE 2
scenario console-a2 python3 con.py /run/a/run/hostd.sock lx2
scenario states python3 con.py list /run/a/run/hostd.sock /run/b/run/hostd.sock
$A stop lx2 > /dev/null
scenario verify sealvm run --kernel vmlinuz --initrd sealed.cpio.gz -m 192M --cmdline "$CMD" \
    --manifest $O/vms/lx --broker $BROKER --disk $D --net $GW
scenario logs sh -c "cat /run/hostd-a.log /run/hostd-b.log /tmp/gateway.out | tail -n 40"
""".replace("CMDLINE", CMDLINE)

# waitfor.py ready SOCK... PORT: the daemons and the broker answer;
# waitfor.py console SOCK VM WORD N: the VM's console has N more lines starting with WORD
# than when it was first asked (4 minutes at most). Polls once a second (uds.py).
WAITFOR_PY = r"""
import socket, sys, time
from uds import get
deadline = time.monotonic() + 240
if sys.argv[1] == "ready":
    *socks, port = sys.argv[2:]
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(port)), 1).close()
            if all(get(s, "/v1/vms")[0] == 200 for s in socks):
                sys.exit(0)
        except OSError:
            pass
        time.sleep(1)
else:
    sock, vm, word, n = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    count = lambda: sum(l.startswith(word) for l in get(sock, f"/v1/vms/{vm}/console")[1].splitlines())
    start = count()
    while time.monotonic() < deadline:
        if count() >= start + n:
            sys.exit(0)
        time.sleep(1)
print("waitfor: gave up on", sys.argv[1:], "console tail:",
      get(sys.argv[2], f"/v1/vms/{sys.argv[3]}/console")[1][-1500:] if sys.argv[1] != "ready" else "")
sys.exit(1)
"""

# con.py SOCK VM: the VM's console; con.py list SOCK...: "name state" of every VM
CON_PY = r"""
import json, sys
from uds import get
if sys.argv[1] == "list":
    for sock in sys.argv[2:]:
        for vm in json.loads(get(sock, "/v1/vms")[1]):
            print(vm["id"], vm["state"])
else:
    print(get(sys.argv[1], f"/v1/vms/{sys.argv[2]}/console")[1])
"""

NESTED_TIMEOUT = 1200


def memcheck_binary() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "memcheck"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(HERE / "memcheck.c")],
                       check=True)
        return out.read_bytes()


def nested_job(image):
    job = N.Job(image)
    conf = Path("/etc/mke2fs.conf")
    job.add("sealed.cpio.gz", N.guest_initrd(
        image, GUEST_INIT, modules=("kernel/drivers/block/virtio_blk.ko", *NET_MODULES),
        programs=("mke2fs", "e2fsck", "iperf3"),
        extra={"usr/bin/memcheck": memcheck_binary(),
               **({"etc/mke2fs.conf": conf.read_bytes()} if conf.exists() else {})}))
    job.add("waitfor.py", WAITFOR_PY.encode())
    job.add("con.py", CON_PY.encode())
    job.script = SCRIPT
    return job


@pytest.fixture(scope="module")
def outer():
    return N.module_outcome(sys.modules[__name__])


def lines(text: str, word: str) -> list[dict[str, str]]:
    return [dict(re.findall(r"(\w+)=(\S*)", m)) for m in re.findall(rf"^{word} (.*)$", text, re.M)]


MEMCHECK = re.compile(r"^MEMCHECK pass=(\d+) bad=(\d+) up=([\d.]+) gap=([\d.]+) back=(\d+)\r*$",
                      re.M)


def memchecks(text: str) -> list[dict[str, float]]:
    """The guest's whole MEMCHECK lines (a console read may begin or end mid-line)."""
    return [dict(zip(("pass", "bad", "up", "gap", "back"), map(float, m)))
            for m in MEMCHECK.findall(text)]


def test_the_sealed_linux_guest_uses_its_disk_and_network(outer):
    rc, text = outer.section("create")
    assert rc == 0, text
    console = outer.section("console-a")[1]
    assert lines(console, "GUEST-DISK") == [{"fsck": "0", "files": "data,data.sum,lost+found,"}], \
        console[-4000:]
    assert lines(console, "GUEST-PING") == [{"rc": "0"}] and "3 packets received" in console, \
        console[-4000:]
    iperf = lines(console, "GUEST-IPERF")
    assert iperf and iperf[0]["rc"] == "0" and float(iperf[0]["mbps"]) > 0, console[-4000:]
    mem = memchecks(console)
    assert len(mem) >= 4 and all(m["bad"] == 0 for m in mem), mem
    assert {"disk": "ok", "ping": "ok"} in lines(console, "PROBE"), console[-3000:]


def before_the_pause(mem: list[dict[str, float]]) -> list[dict[str, float]]:
    """Host A's passes up to the snapshot (sealing pauses the guest; then it runs on at A
    until A stops it, with that pause in its `gap`)."""
    return [m for m in mem if m["gap"] < 2]


def test_snapshot_and_restore_on_another_host_continue_the_guest(outer):
    assert outer.section("snapshot")[0] == 0, outer.section("snapshot")[1]
    rc, text = outer.section("restore")
    assert rc == 0, text
    before = before_the_pause(memchecks(outer.section("console-a")[1]))
    after = memchecks(outer.section("console-b")[1])
    assert after, outer.section("console-b")[1][-3000:]
    assert after[0]["pass"] > before[-1]["pass"]                 # the same process, going on
    assert after[0]["up"] < before[-1]["up"] + 2                 # from where it was sealed
    assert all(m["bad"] == 0 and m["back"] == 0 for m in after), after
    assert after[-1]["gap"] < 2, after                            # the clock did not jump
    probes = lines(outer.section("console-b")[1], "PROBE")
    assert probes[-1] == {"disk": "ok", "ping": "ok"}, probes      # disk and tunnel on host B


def test_live_migration_back_continues_the_guest(outer):
    rc, text = outer.section("migrate")
    assert rc == 0, text
    b, a2 = memchecks(outer.section("console-b")[1]), memchecks(outer.section("console-a2")[1])
    assert a2 and a2[0]["pass"] > b[-1]["pass"], (b[-1:], a2[:1])
    assert all(m["bad"] == 0 and m["back"] == 0 for m in a2), a2
    # a migrated guest's clock counts the time it was stopped, as after any real pause,
    # and no more than the migration took
    took = float(re.search(r"^=== END migrate rc=\d+ s=(\d+)", outer.console, re.M).group(1))
    assert a2[-1]["gap"] <= took + 1, (a2[-1], took)
    probes = lines(outer.section("console-a2")[1], "PROBE")
    assert probes[-1] == {"disk": "ok", "ping": "ok"}, probes
    states = outer.section("states")[1]
    assert re.search(r"^lx2\s+running", states, re.M), states
    assert not re.search(r"^lx\s+running", states, re.M), states   # no copy left behind


def test_the_filesystem_is_intact_and_clean_after_it_all(outer):
    rc, text = outer.section("verify")
    assert rc == 0, text[-4000:]
    assert lines(text, "GUEST-VERIFY") == [{"data": "ok", "fsck": "0"}], text[-4000:]

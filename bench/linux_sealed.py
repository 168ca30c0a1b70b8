"""A Linux guest's disk, network and migration: sealed sealvm vs QEMU -enable-kvm, nested.

This machine's KVM cannot run Linux, so both monitors run inside one outer VM
(QEMU TCG with emulated SVM, kvm_amd; tests/linux/nested.py), in the same run, on
the Debian cloud kernel and the same initramfs:

  io         the guest times (with its own clock) `dd` writing and then reading 16 MiB
             of its virtio-blk disk with O_DIRECT, and `iperf3 -c` for 4 s against a
             server behind the other end of its virtio-net; it also reports its uptime
             at /init (boot)
               sealvm:   attested, the disk sealed (AES-GCM per block, witness), the
                         network through the owner's gateway (Noise tunnel, TAP)
               qemu-kvm: -M microvm (virtio-mmio, like sealvm), a raw disk file, a TAP
  migration  a guest running `memcheck 4 0.1` (a memory-writing loop printing a line
             with its pass count ten times a second) moves between two monitors on the
             same outer VM: sealvm's daemons (`vm migrate`, sealed pre-copy) vs QEMU's
             own migration (`migrate tcp:`, default settings).  Both restore the guest's
             clocks on the target, so the guest cannot time its own stop; the downtime
             is the longest wait for its next line, watched on its consoles every
             0.25 s, less the usual wait (QEMU's own downtime figure is kept too)

Nested absolute numbers mean little (every exit costs ~70 us there, all of it on one
TCG thread); the ratios are the result.

    python3 -m bench.linux_sealed [--quick]
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common as C

sys.path.insert(0, str(C.ROOT / "tests" / "linux"))
import nested as N  # noqa: E402

NAME = "linux_sealed"
CMDLINE = "console=ttyS0 quiet panic=-1 8250.nr_uarts=1 pci=off"
MODULES = ("kernel/drivers/block/virtio_blk.ko", "kernel/net/core/failover.ko",
           "kernel/drivers/net/net_failover.ko", "kernel/drivers/net/virtio_net.ko")

IO_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /tmp; mount -t tmpfs tmp /tmp
BOOT=$(cut -d' ' -f1 /proc/uptime)
for m in virtio_ring virtio virtio_mmio virtio-rng virtio_blk failover net_failover virtio_net; do
    insmod /lib/$m.ko 2>/dev/null
done
for i in $(seq 100); do [ -b /dev/vda ] && [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
t() { cut -d' ' -f1 /proc/uptime; }
T0=$(t); dd if=/dev/zero of=/dev/vda bs=1M count=16 oflag=direct 2>/dev/null; sync; T1=$(t)
dd if=/dev/vda of=/dev/null bs=1M count=16 iflag=direct 2>/dev/null; T2=$(t)
ip link set eth0 up && ip addr add 10.77.0.2/24 dev eth0
ping -c 1 -W 5 10.77.0.1 > /dev/null 2>&1
/usr/bin/iperf3 -c 10.77.0.1 -t 4 -f m > /tmp/iperf 2>&1; IRC=$?
MBPS=$(awk '/receiver/ {print $(NF-2)}' /tmp/iperf)
echo "BENCH-IO boot=$BOOT write=$(echo "$T0 $T1" | awk '{print $2-$1}') read=$(echo "$T1 $T2" | awk '{print $2-$1}') iperf_rc=$IRC mbps=${MBPS:-0}"
poweroff -f
"""

MEM_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio-rng; do insmod /lib/$m.ko 2>/dev/null; done
exec /usr/bin/memcheck 4 0.1
"""

# Runs inside the outer VM: sets up the owner's side and the two sealvm hosts, then
# times each monitor; prints one BENCH-RESULT line.
DRIVER = r"""
import json, os, re, socket, subprocess, sys, threading, time
from uds import get
rounds, cmdline = int(sys.argv[1]), sys.argv[2]
parts = sys.argv[3].split(",") if len(sys.argv) > 3 else ["io", "migration"]
O, PUB, BROKER, GW = "/tmp/owner", "/run/pub", "http://127.0.0.1:8477", "127.0.0.1:51820"
os.environ["SEALVM_LAUNCHER_DIR"] = "/run/sealvm-launcher"
def step(*what):
    print("BENCH-STEP", time.strftime("%H:%M:%S"), *what, flush=True)
def sh(cmd, timeout=300):
    # a step stuck for `timeout` s: every sealvm process's stacks and the logs, then out
    # (its own process group: the shell's children go too, and with them the pipes)
    p = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["python3", "dump.py"])
        os.killpg(p.pid, 9)
        raise SystemExit(f"stuck for {timeout} s: {cmd}")
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd, out, err)
    return out
def wait(pred, what, timeout=240, show=lambda: ""):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v: return v
        time.sleep(1)
    raise SystemExit(f"gave up waiting for {what}\n{show()}")
def logs():
    return "".join(open(f"/run/hostd-{h}.log").read()[-2000:] for h in "ab")
def port_open(port):
    try: socket.create_connection(("127.0.0.1", port), 1).close(); return True
    except OSError: return False
sh("busybox ip link set lo up; modprobe tun")
sh(f"sealvm owner init {O}")
for vm, initrd, dev in (("io", "io.cpio.gz", "rng,blk,net"), ("mem", "mem.cpio.gz", "rng")):
    sh(f"sealvm owner sign --dir {O} --kernel vmlinuz --initrd {initrd} --name {vm} "
       f"--memory 256M --devices {dev} --cmdline '{cmdline}'")
m = json.loads(sh("sealvm measure"))
sh(f"sealvm owner policy --dir {O} add host {m['host_pub']}; "
   f"sealvm owner policy --dir {O} add core {m['core_measurement']}")
sh(f"mkdir -p {PUB}/vms/mem && cp {O}/vms/mem/manifest.json {O}/vms/mem/manifest.json.sig "
   f"{PUB}/vms/mem/ && cp {O}/owner.pub.json {PUB}/ && chmod -R a+rX {PUB}")
broker = subprocess.Popen(f"sealvm owner broker --dir {O} --port 8477 > /tmp/broker.out 2>&1",
                          shell=True)
for h, uids in (("a", "64100-64199"), ("b", "64200-64299")):
    subprocess.Popen(f"sealvm hostd --state-dir=/run/{h}/state --run-dir=/run/{h}/run "
                     f"--host-uid=63970 --uid-range={uids} > /run/hostd-{h}.log 2>&1", shell=True)
wait(lambda: port_open(8477) and all(os.path.exists(f"/run/{h}/run/hostd.sock") for h in "ab"),
     "the broker and the daemons")
res = {"io": {"sealvm": [], "qemu-kvm": []}, "migration": {"sealvm": [], "qemu-kvm": []}}
def io_line(text):
    m = re.search(r"^BENCH-IO (.*)$", text, re.M)
    if not m: raise SystemExit("no BENCH-IO line:\n" + text[-3000:])
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", m.group(1))}
QEMU = ["qemu-system-x86_64", "-L", "/usr/share/seabios", "-L", "/usr/share/qemu",
        "-M", "microvm,acpi=on", "-enable-kvm", "-cpu", "host", "-m", "256", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-bios", "bios-microvm.bin", "-kernel", "vmlinuz", "-append", cmdline,
        "-device", "virtio-rng-device"]
# --- io: sealvm (attested, sealed disk, tunnel) then qemu-kvm (raw disk, TAP) ---
def io_part():
    gw = subprocess.Popen(["sealvm", "owner", "gateway", "--dir", O, "--vm", "io", "--listen", GW,
                           "--tap", "sealvm0", "--tap-addr", "10.77.0.1/24"],
                          stdout=open("/tmp/gw.out", "w"), stderr=subprocess.STDOUT)
    wait(lambda: "tunnel on udp" in open("/tmp/gw.out").read(), "the gateway")
    sh("iperf3 -s -D --logfile /tmp/iperf3.log")
    for i in range(rounds):
        step("sealvm io", i)
        sh(f"rm -f /tmp/io.img; sealvm disk create 64M -o /tmp/io.img --owner {O} --vm io")
        t0 = time.monotonic()
        out = sh(f"sealvm run --kernel vmlinuz --initrd io.cpio.gz -m 256M --cmdline '{cmdline}' "
                 f"--manifest {O}/vms/io --broker {BROKER} --disk /tmp/io.img --net {GW} 2>&1",
                 timeout=600)
        res["io"]["sealvm"].append({**io_line(out), "wall": time.monotonic() - t0})
    gw.terminate(); gw.wait()
    wait(lambda: not os.path.exists("/sys/class/net/sealvm0"), "the gateway's TAP to go")
    sh("ip tuntap add qtap0 mode tap && ip addr add 10.77.0.1/24 dev qtap0 && ip link set qtap0 up")
    for i in range(rounds):
        step("qemu io", i)
        sh("rm -f /tmp/q.img; truncate -s 64M /tmp/q.img")
        t0 = time.monotonic()
        p = subprocess.run(QEMU + ["-serial", "stdio", "-initrd", "io.cpio.gz",
            "-drive", "file=/tmp/q.img,if=none,id=d0,format=raw",
            "-device", "virtio-blk-device,drive=d0",
            "-netdev", "tap,id=n0,ifname=qtap0,script=no,downscript=no",
            "-device", "virtio-net-device,netdev=n0"],
            capture_output=True, text=True, timeout=600)
        res["io"]["qemu-kvm"].append({**io_line(p.stdout + p.stderr), "wall": time.monotonic() - t0})
# --- migration: a memory-writing guest moves between two monitors on this machine ---
def memchecks(text):   # whole lines only: a console read may begin or end mid-line
    keys = ("pass", "bad", "up", "gap", "back")
    return [dict(zip(keys, map(float, m))) for m in re.findall(
        r"^MEMCHECK pass=(\d+) bad=(\d+) up=([\d.]+) gap=([\d.]+) back=(\d+)\r*$", text, re.M)]
class Watch:
    # When each new MEMCHECK line of the guest appeared on its consoles (this machine's
    # clock, polled every POLL s, reading only what is new): the guest's own clock is not
    # a fair witness (each monitor restores it its own way), so the downtime is what an
    # observer of its progress sees.
    POLL = 0.25
    def __init__(self, sources):
        self.seen, self.done = [], threading.Event()
        self.thread = threading.Thread(target=self.run, args=(sources,), daemon=True)
        self.thread.start()
    def run(self, sources):
        top, offsets, tails = -1, [0] * len(sources), [""] * len(sources)
        while not self.done.is_set():
            for k, read in enumerate(sources):
                new = read(offsets[k])
                offsets[k] += len(new.encode())
                lines = (tails[k] + new).split("\n")
                tails[k] = lines.pop()
                p = max((m["pass"] for m in memchecks("\n".join(lines))), default=-1)
                if p > top:
                    self.seen.append(time.monotonic()); top = p
            time.sleep(self.POLL)
    def result(self, t0, t1):
        # the longest wait for a new line from t0 to t1, less the usual wait before t0
        self.done.set(); self.thread.join()
        usual = sorted(b - a for a, b in zip(self.seen, self.seen[1:]) if b < t0)
        waits = [b - a for a, b in zip(self.seen, self.seen[1:]) if b > t0 and a < t1]
        normal = usual[len(usual) // 2] if usual else 0.0
        return max(0.0, max(waits, default=0.0) - normal), normal
def summary(before, after, watch, t0, t1):
    down, normal = watch.result(t0, t1)
    return {"downtime": down, "line_interval": normal, "guest_gap_before": before[-1]["gap"],
            "guest_gap_after": after[-1]["gap"], "bad": after[-1]["bad"],
            "back": after[-1]["back"], "migrate_s": t1 - t0}
def migration_part():
    socks = ["/run/a/run/hostd.sock", "/run/b/run/hostd.sock"]
    def console(sock, vm, offset=0):
        st, text = get(sock, f"/v1/vms/{vm}/console?offset={offset}")
        return text if st == 200 else ""
    for i in range(rounds):
        src, dst = socks[i % 2], socks[1 - i % 2]
        step("sealvm migration", i)
        sh(f"sealvm vm --socket {src} create --kernel /job/vmlinuz --initrd /job/mem.cpio.gz "
           f"--name m{i} -m 256M --cmdline '{cmdline}' --manifest {PUB}/vms/mem --broker {BROKER} "
           "--start")
        wait(lambda: len(memchecks(console(src, f"m{i}"))) >= 20, "memcheck on the source",
         show=lambda: console(src, f"m{i}")[-3000:] + logs())
        step("watching")
        watch = Watch([lambda o: console(src, f"m{i}", o), lambda o: console(dst, f"m{i}", o)])
        time.sleep(3)
        before = memchecks(console(src, f"m{i}"))
        t0 = time.monotonic()
        said = sh(f"sealvm vm --socket {src} migrate m{i} --to {dst} --manifest "
                  f"{PUB}/vms/mem --broker {BROKER} --name m{i}")
        t1 = time.monotonic()
        step("migrated in", round(t1 - t0, 1), "s")
        report = {k: float(v) for k, v in re.findall(
            r"(rounds|stop phase) (\d+)", said)} | {"said": said.strip()[-400:]}
        wait(lambda: len(memchecks(console(dst, f"m{i}"))) >= 20, "memcheck on the target",
         show=lambda: console(dst, f"m{i}")[-3000:] + logs())
        after = memchecks(console(dst, f"m{i}"))
        sh(f"sealvm vm --socket {dst} stop m{i}")
        res["migration"]["sealvm"].append(summary(before, after, watch, t0, t1) | report)
        step("result", res["migration"]["sealvm"][-1]["downtime"])
    def qmp(path, *cmds):
        s = socket.socket(socket.AF_UNIX); s.connect(path); f = s.makefile("rw")
        f.readline()
        out = []
        for c in ({"execute": "qmp_capabilities"},) + cmds:
            f.write(json.dumps(c) + "\n"); f.flush()
            while True:
                r = json.loads(f.readline())
                if "event" not in r: break
            out.append(r)
        s.close(); return out[1:]
    def text(path, offset=0):
        try:
            with open(path, "rb") as f:
                f.seek(offset); return f.read().decode(errors="replace")
        except OSError: return ""
    for i in range(rounds):
        step("qemu migration", i)
        qlogs = (f"/tmp/q{i}src.log", f"/tmp/q{i}dst.log")
        qs = [subprocess.Popen(QEMU + ["-initrd", "mem.cpio.gz", "-serial", f"file:{log}",
                                       "-qmp", f"unix:/tmp/q{i}{k}.qmp,server=on,wait=off"]
                               + (["-incoming", "tcp:127.0.0.1:4444"] if k == "dst" else []),
                               stdin=subprocess.DEVNULL)
              for k, log in zip(("src", "dst"), qlogs)]
        wait(lambda: len(memchecks(text(qlogs[0]))) >= 20, "memcheck under qemu")
        wait(lambda: os.path.exists(f"/tmp/q{i}dst.qmp"), "the target qemu")
        watch = Watch([lambda o: text(qlogs[0], o), lambda o: text(qlogs[1], o)])
        time.sleep(3)
        before = memchecks(text(qlogs[0]))
        t0 = time.monotonic()
        qmp(f"/tmp/q{i}src.qmp", {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:4444"}})
        info = wait(lambda: (lambda r: r if r.get("status") in ("completed", "failed") else None)(
            qmp(f"/tmp/q{i}src.qmp", {"execute": "query-migrate"})[0]["return"]), "qemu migration")
        t1 = time.monotonic()
        wait(lambda: len(memchecks(text(qlogs[1]))) >= 20, "memcheck on the qemu target")
        row = summary(before, memchecks(text(qlogs[1])), watch, t0, t1)
        row["qemu_downtime_ms"] = info.get("downtime"); row["status"] = info["status"]
        res["migration"]["qemu-kvm"].append(row)
        for q in qs: q.kill(); q.wait()
# the daemons' migrations first: `sealvm run` shares the launcher's directory with them
if "migration" in parts:
    migration_part()
if "io" in parts:
    io_part()
print("BENCH-RESULT " + json.dumps(res), flush=True)
"""


def memcheck_binary() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "memcheck"
        subprocess.run(["gcc", "-static", "-O2", "-o", str(out),
                        str(C.ROOT / "tests" / "linux" / "memcheck.c")], check=True)
        return out.read_bytes()


def run(args) -> dict:
    rounds = 1 if args.quick else 3
    image = N.outer_image()
    job = N.Job(image, name=NAME)
    mem = memcheck_binary()
    job.add("io.cpio.gz", N.guest_initrd(image, IO_INIT, modules=MODULES, programs=("iperf3",)))
    job.add("mem.cpio.gz", N.guest_initrd(image, MEM_INIT, extra={"usr/bin/memcheck": mem}))
    job.add("driver.py", DRIVER.encode())
    job.add("bios-microvm.bin", Path("/usr/share/qemu/bios-microvm.bin").resolve().read_bytes())
    job.script = f"python3 driver.py {rounds} '{CMDLINE}'\n"
    out = job.run(timeout=1800)
    m = re.search(r"^BENCH-RESULT (.*)$", out.console, re.M)
    if m is None:
        raise RuntimeError(f"no result from the outer VM:\n{out.console[-4000:]}")
    runs = json.loads(m.group(1))
    io, mig = runs["io"], runs["migration"]

    def med(group, who, key, scale=1.0):
        return C.median(r[key] * scale for r in group[who])

    mib = 16
    w = {k: mib / med(io, k, "write") for k in io}
    r = {k: mib / med(io, k, "read") for k in io}
    mbps = {k: med(io, k, "mbps") for k in io}
    boot = {k: med(io, k, "boot") for k in io}
    down = {k: med(mig, k, "downtime") for k in mig}
    took = {k: med(mig, k, "migrate_s") for k in mig}
    rows = [
        C.summary_row(NAME, "guest uptime at /init (nested)", boot["sealvm"], boot["qemu-kvm"],
                      "qemu-kvm", "-", None, "s"),
        C.summary_row(NAME, "sealed disk write, O_DIRECT 1 MiB", w["sealvm"], w["qemu-kvm"],
                      "qemu-kvm raw", "-", None, "MiB/s"),
        C.summary_row(NAME, "sealed disk read, O_DIRECT 1 MiB", r["sealvm"], r["qemu-kvm"],
                      "qemu-kvm raw", "-", None, "MiB/s"),
        C.summary_row(NAME, "iperf3 through the sealed tunnel", mbps["sealvm"], mbps["qemu-kvm"],
                      "qemu-kvm tap", "-", None, "Mbit/s"),
        C.summary_row(NAME, "migration downtime, guest progress watched", down["sealvm"],
                      down["qemu-kvm"], "qemu-kvm migrate", "-", None, "s"),
        C.summary_row(NAME, "migration total", took["sealvm"], took["qemu-kvm"],
                      "qemu-kvm migrate", "-", None, "s"),
        C.summary_row(NAME, "migration: source's stop phase vs QEMU's own downtime figure",
                      C.median(r["stop phase"] for r in mig["sealvm"]),
                      C.median(r["qemu_downtime_ms"] for r in mig["qemu-kvm"]),
                      "qemu-kvm migrate", "-", None, "ms"),
    ]
    failed = [x for who in io for x in io[who] if x["iperf_rc"]]
    if failed:
        raise RuntimeError(f"iperf3 failed in a guest: {failed}")
    bad = [x for who in mig for x in mig[who] if x["bad"] or x["back"]]
    if bad:
        raise RuntimeError(f"a migrated guest lost memory or saw its clock go back: {bad}")
    result = {
        "description": __doc__.split("\n\n")[1],
        "kernel": (image / "kernel-version").read_text().strip(),
        "cmdline": CMDLINE, "rounds": rounds, "runs": runs, "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag),
               f"Linux guest, sealed vs QEMU, nested (kernel {result['kernel']})",
               {f"{k} disk write MiB/s": [mib / x["write"] for x in io[k]] for k in io}
               | {f"{k} disk read MiB/s": [mib / x["read"] for x in io[k]] for k in io}
               | {f"{k} iperf3 Mbit/s": [x["mbps"] for x in io[k]] for k in io}
               | {f"{k} migration downtime ms": [x["downtime"] * 1e3 for x in mig[k]]
                  for k in mig},
               "value", note="inside QEMU TCG (-cpu max) with kvm_amd; dots = single runs")
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Network: UDP round-trip latency and UDP stream throughput to the netecho guest.

Same guest (netecho.elf; under sealvm it parks on the idle doorbell while it
waits and the device wakes it, under QEMU, which has no such doorbell, it
polls: `spin=1` makes it poll under sealvm too, which costs a host CPU that
the core's own threads need on a 2-CPU host), same two network namespaces joined by a veth pair,
the same client in the owner's namespace, three paths side by side in one run:
  * sealvm: `sealvm run --net` in the host namespace (the core seals every
    frame; the host relays datagrams) and `sealvm owner gateway` with a TAP in
    the owner's namespace; once more with --net-direct (the core holds a UDP
    socket the host connected: no relay process);
  * QEMU microvm (-accel kvm) with virtio-net-device on a TAP in the owner's
    namespace (no encryption, no relay);
  * plain veth: a Python UDP echo/stream server in the host namespace (no VM).
Latency: median and p99 of `--rtt-samples` sequential 64-byte UDP echoes.
Throughput: the guest answers "stream N 1392" with N datagrams of 1392 bytes
as fast as it can; the client counts what arrives (Mbit/s of UDP payload, and
the share lost).  The tunnel's share of sealvm's per-datagram time is its
sealing cost (seal in the core + open in the gateway, measured in-process on
1392-byte frames) over the measured time per datagram.
Needs root (namespaces, TAP).  Test mode supplies the tunnel key (no broker).
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time

from . import common as C

NAME = "net"
GW_IP, HOST_IP, LAN_GW, GUEST = "10.99.0.1", "10.99.0.2", "10.77.0.1", "10.77.0.2"
PORT, SIZE = 51820, 1392
MAC = "02:53:45:41:4c:01"
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Lab:
    def __init__(self):
        t = os.getpid() % 100000
        self.gw, self.host, self.gif, self.hif = f"bngw{t}", f"bnho{t}", f"bng{t}", f"bnh{t}"

    def __enter__(self):
        self.__exit__()
        for ns in (self.gw, self.host):
            sh("ip", "netns", "add", ns)
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
               "net.ipv6.conf.default.disable_ipv6=1")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.hif, "netns", self.host, "type", "veth", "peer", "name",
           self.gif, "netns", self.gw)
        for ns, i, a in ((self.gw, self.gif, GW_IP), (self.host, self.hif, HOST_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{a}/24", "dev", i)
            sh("ip", "-n", ns, "link", "set", i, "up")
        return self

    def __exit__(self, *exc):
        for ns in (self.gw, self.host):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def ex(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def wait_link(self, ifname: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if subprocess.run(["ip", "-n", self.gw, "link", "show", ifname],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{ifname} never appeared")

    def lan(self, ifname: str) -> None:
        sh("ip", "-n", self.gw, "addr", "add", f"{LAN_GW}/24", "dev", ifname)
        sh("ip", "-n", self.gw, "link", "set", ifname, "up")
        sh("ip", "-n", self.gw, "neigh", "replace", GUEST, "lladdr", MAC, "dev", ifname,
           "nud", "permanent")


def gw_socket(ns: str) -> socket.socket:
    out = {}

    def body():
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        _libc.setns(fd, 0x4000_0000)
        os.close(fd)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        s.bind(("0.0.0.0", 0))
        out["s"] = s
    t = threading.Thread(target=body)
    t.start()
    t.join()
    return out["s"]


def wait_echo(s: socket.socket, dst: str, timeout: float = 30) -> None:
    s.settimeout(0.3)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        s.sendto(b"up?", (dst, 7))
        try:
            s.recv(2048)
            time.sleep(0.3)
            while True:                     # drain late answers
                s.settimeout(0.05)
                s.recv(2048)
        except OSError:
            if s.gettimeout() == 0.05:
                s.settimeout(0.3)
                return
    raise RuntimeError(f"no UDP echo from {dst}")


def rtts(s: socket.socket, dst: str, n: int) -> list[float]:
    out = []
    s.settimeout(1.0)
    for i in range(n):
        msg = b"%08d" % i + bytes(56)
        t = time.perf_counter()
        s.sendto(msg, (dst, 7))
        try:
            while s.recv(2048) != msg:
                pass
        except TimeoutError:
            continue
        out.append((time.perf_counter() - t) * 1e6)
    return out


def stream(s: socket.socket, dst: str, count: int) -> dict:
    s.settimeout(2.0)
    s.sendto(b"stream %d %d" % (count, SIZE), (dst, 9))
    got, first, last = 0, None, None
    try:
        while got < count:
            d = s.recv(65536)
            last = time.perf_counter()
            first = first or last
            got += 1
            s.settimeout(1.0)
    except TimeoutError:
        pass
    secs = (last - first) if first and last and got > 1 else None
    return {"received": got, "sent": count, "loss": 1 - got / count,
            "mbit_s": (got - 1) * SIZE * 8 / secs / 1e6 if secs else None,
            "us_per_datagram": secs / (got - 1) * 1e6 if secs else None}


PLAIN_SERVER = f"""
import socket, threading
e = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); e.bind(("{HOST_IP}", 7))
t = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); t.bind(("{HOST_IP}", 9))
def echo():
    while True:
        d, a = e.recvfrom(65536); e.sendto(d, a)
threading.Thread(target=echo, daemon=True).start()
while True:
    d, a = t.recvfrom(100); _, n, size = d.split()
    p = bytes(int(size))
    for _ in range(int(n)): t.sendto(p, a)
"""


def measure(lab: Lab, dst: str, args) -> dict:
    s = gw_socket(lab.gw)
    try:
        wait_echo(s, dst)
        r = {"rtt_us": rtts(s, dst, args.rtt_samples), "streams": []}
        for _ in range(args.rounds):
            r["streams"].append(stream(s, dst, args.count))
            time.sleep(0.3)
        return r
    finally:
        s.close()


def run_sealvm(lab: Lab, elf, args, owner_dir, direct: bool = False) -> dict:
    from sealvm.owner.gateway import net_key
    key = net_key(owner_dir, "bench")
    gw = subprocess.Popen(lab.ex(lab.gw) + [sys.executable, "-m", "sealvm.cli", "owner", "gateway",
                                            "--dir", str(owner_dir), "--vm", "bench", "--listen",
                                            f"{GW_IP}:{PORT}", "--tap", "bntap0"],
                          cwd=C.SEALVM_ROOT, stderr=subprocess.DEVNULL)
    env = dict(os.environ, SEALVM_TEST_MODE="1", SEALVM_TEST_NET_KEY=key.hex())
    vm = None
    try:
        lab.wait_link("bntap0")
        lab.lan("bntap0")
        opts = ["--no-rng", "--net", f"{GW_IP}:{PORT}"] + (["--net-direct"] if direct else [])
        vm = subprocess.Popen(lab.ex(lab.host) + C.sealvm_cmd(elf, *opts),
                              cwd=C.SEALVM_ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        return measure(lab, GUEST, args)
    finally:
        for p in (vm, gw):
            if p is not None:
                p.terminate()
                p.wait(20)


def run_qemu(lab: Lab, elf, args) -> dict:
    extra = ["-global", "virtio-mmio.force-legacy=false", "-netdev",
             "tap,id=n0,ifname=bnqtap0,script=no,downscript=no",
             "-device", f"virtio-net-device,netdev=n0,mac={MAC}"]
    q = subprocess.Popen(lab.ex(lab.gw) + C.qemu_cmd(elf, "kvm", "", extra=extra),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lab.wait_link("bnqtap0")
        lab.lan("bnqtap0")
        return measure(lab, GUEST, args)
    finally:
        q.terminate()
        q.wait(20)


def run_plain(lab: Lab, args) -> dict:
    srv = subprocess.Popen(lab.ex(lab.host) + [sys.executable, "-c", PLAIN_SERVER])
    try:
        return measure(lab, HOST_IP, args)
    finally:
        srv.terminate()
        srv.wait(10)


def tunnel_cost_us(n: int = 20000) -> float:
    """Seal (core) + open (gateway) of one 1392-byte frame's datagram, microseconds."""
    from sealvm.core.net_tunnel import Tunnel
    key = os.urandom(32)
    core, gw = Tunnel(key, initiator=True), Tunnel(key, initiator=False)
    _, resp = gw.receive(core.initiate())
    gw.receive(core.receive(resp)[1])
    frame = bytes(SIZE + 42)
    t = time.perf_counter()
    for _ in range(n):
        gw.receive(core.seal(frame))
    return (time.perf_counter() - t) / n * 1e6


def run(args) -> dict:
    import tempfile
    if os.geteuid() != 0:
        raise SystemExit("bench.net needs root (network namespaces and TAP devices)")
    args.rtt_samples = getattr(args, "rtt_samples", None) or (100 if args.quick else 1000)
    args.count = 5000 if args.quick else 20000
    args.rounds = 2 if args.quick else 5
    elf = C.guest(args.guests, "netecho")
    owner = tempfile.mkdtemp(prefix="sealvm-bench-owner-")
    subprocess.run([sys.executable, "-m", "sealvm.cli", "owner", "init", owner + "/o"],
                   check=True, capture_output=True, cwd=C.SEALVM_ROOT)
    subprocess.run([sys.executable, "-m", "sealvm.cli", "owner", "sign", "--dir", owner + "/o",
                    str(elf), "--name", "bench", "--devices", "rng,net"],
                   check=True, capture_output=True, cwd=C.SEALVM_ROOT)
    res = {}
    with Lab() as lab:
        res["plain veth"] = run_plain(lab, args)
    with Lab() as lab:
        res["sealvm"] = run_sealvm(lab, elf, args, owner + "/o")
    with Lab() as lab:
        res["sealvm direct"] = run_sealvm(lab, elf, args, owner + "/o", direct=True)
    if C.have_qemu() and C.have_kvm():
        with Lab() as lab:
            res["qemu"] = run_qemu(lab, elf, args)
    cost = tunnel_cost_us()
    med = {k: C.median(v["rtt_us"]) for k, v in res.items()}
    p99 = {k: sorted(v["rtt_us"])[int(len(v["rtt_us"]) * 0.99) - 1] if v["rtt_us"] else None
           for k, v in res.items()}
    tput = {k: C.median([s["mbit_s"] for s in v["streams"] if s["mbit_s"]]) for k, v in res.items()}
    per = C.median([s["us_per_datagram"] for s in res["sealvm"]["streams"] if s["us_per_datagram"]])
    share = cost / per if per else None
    q_t, q_l = tput.get("qemu"), med.get("qemu")
    rows = [
        C.summary_row(NAME, "UDP stream throughput, Mbit/s (speed)", tput["sealvm"], q_t, "qemu",
                      ">= 0.5x QEMU", (tput["sealvm"] / q_t >= 0.5) if q_t and tput["sealvm"] else None),
        C.summary_row(NAME, "UDP echo round trip, median us", med["sealvm"], q_l, "qemu",
                      "<= 2x QEMU", (med["sealvm"] / q_l <= 2) if q_l and med["sealvm"] else None),
        C.summary_row(NAME, "UDP stream, --net-direct, Mbit/s (speed)", tput["sealvm direct"],
                      q_t, "qemu", ">= 0.5x QEMU",
                      (tput["sealvm direct"] / q_t >= 0.5) if q_t and tput["sealvm direct"] else None),
        C.summary_row(NAME, "UDP echo round trip, --net-direct, median us", med["sealvm direct"],
                      q_l, "qemu", "<= 2x QEMU",
                      (med["sealvm direct"] / q_l <= 2) if q_l and med["sealvm direct"] else None),
        C.summary_row(NAME, "UDP echo round trip vs plain veth, us", med["sealvm"],
                      med["plain veth"], "plain veth", "-", None),
        C.summary_row(NAME, "tunnel share of per-datagram time", share, None, "-", "-", None),
    ]
    result = {"paths": res, "rtt_median_us": med, "rtt_p99_us": p99, "throughput_mbit_s": tput,
              "tunnel_seal_open_us": cost, "sealvm_us_per_datagram": per,
              "tunnel_share": share, "summary": rows,
              "params": {"rtt_samples": args.rtt_samples, "count": args.count,
                         "rounds": args.rounds, "size": SIZE}}
    C.write_result(NAME, result, args.out, args.tag)
    plt = C.pyplot()
    if plt is not None:
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(res)
        a.bar(names, [tput[n] or 0 for n in names], color="#7aa6c2")
        a.set_ylabel("UDP payload Mbit/s (median)")
        a.set_title(f"stream of {SIZE}-byte datagrams")
        b.bar(names, [med[n] or 0 for n in names], color="#c29a7a")
        b.set_ylabel("round trip, us (median)")
        b.set_title("64-byte UDP echo")
        fig.suptitle(f"netecho: sealvm (sealed tunnel) vs QEMU TAP vs plain veth; tunnel "
                     f"share {share:.0%}" if share else "netecho")
        fig.tight_layout()
        fig.savefig(C.plot_path(NAME, args.out, args.tag), dpi=110)
        plt.close(fig)
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])
    for k, v in result["paths"].items():
        loss = C.median([s["loss"] for s in v["streams"]])
        print(f"  {k:<11} rtt median {C.fmt(result['rtt_median_us'][k])} us, p99 "
              f"{C.fmt(result['rtt_p99_us'][k])} us; stream {C.fmt(result['throughput_mbit_s'][k])}"
              f" Mbit/s, loss {C.fmt(loss)}")


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

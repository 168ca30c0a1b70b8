"""Split: what the core/host split costs (portal round trip, API latency, density).

Three measures, each beside its peer in the same run:
  * portal round trip: QUERY over the portal to a core whose guest runs, from
    the host side's PortalClient, against a plain socketpair round trip of a
    32-byte message between two Python threads (the same threading and
    socket cost without the protocol);
  * create -> first guest output through the daemon's REST API (POST /v1/vms
    with start, then the console until HELLO), against `sealvm run` alone
    (process start -> first byte) on the same hello.elf;
  * density: host memory per 64 MiB idle VM under the daemon (every core's
    RssAnon+RssFile+RssShmem, plus the daemon's share), as VMs per GiB,
    against one `sealvm run` of the same VM (its host process + its core).
Needs root (the launcher gives each core its own uid).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import common as C

NAME = "split"


def _rss_mib(pid: int) -> float:
    st = C.parse_proc_status(open(f"/proc/{pid}/status").read())
    return sum(st.get(k) or 0 for k in ("RssAnon", "RssFile", "RssShmem")) / 1024


# ---------------------------------------------------------------- portal RTT
def socketpair_rtt(n: int) -> list[float]:
    a, b = socket.socketpair()

    def echo():
        while True:
            m = b.recv(64)
            if not m:
                return
            b.sendall(m)
    threading.Thread(target=echo, daemon=True).start()
    msg = bytes(32)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        a.sendall(msg)
        a.recv(64)
        out.append((time.perf_counter() - t) * 1e6)
    a.close()
    b.close()
    return out


def portal_rtt(args, n: int) -> list[float]:
    from sealvm.host.corelink import CoreLink
    from sealvm.launcher.spawn import spawn_core
    from sealvm.wire.portal import Op

    run_dir = tempfile.mkdtemp(prefix="sealvm-bench-")
    os.chmod(run_dir, 0o711)
    h = spawn_core("bench-rtt", memory_mib=64, run_dir=run_dir, host_uid=os.getuid())
    link = CoreLink("bench-rtt", h.portal, None)
    try:
        link.hello()
        link.load_image(C.guest(args.guests, "idle").read_bytes())
        link.configure(64, 1, "pvh", 0, "secs=600")
        link.start()
        out = []
        for _ in range(n):
            t = time.perf_counter()
            link.client.call(Op.QUERY)
            out.append((time.perf_counter() - t) * 1e6)
        return out
    finally:
        link.stop()
        link.close()
        h.process.wait(10)
        shutil.rmtree(run_dir, ignore_errors=True)


# ---------------------------------------------------------------- the daemon
class Hostd:
    def __init__(self, base: Path, uid_range: str = "64300-64399"):
        self.sock = str(base / "run" / "hostd.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sealvm.cli", "hostd", f"--state-dir={base / 'state'}",
             f"--run-dir={base / 'run'}", f"--uid-range={uid_range}"],
            cwd=C.SEALVM_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        import httpx
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=self.sock),
                                 base_url="http://sealvm", timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if self.http.get("/v1/health").status_code == 200:
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError("hostd did not start")

    def daemon_pid(self) -> int:
        for pid in C.proc_tree(self.proc.pid):
            if b"sealvm.host.daemon" in open(f"/proc/{pid}/cmdline", "rb").read():
                return pid
        return 0

    def close(self) -> None:
        for vm in self.http.get("/v1/vms").json():
            self.http.delete(f"/v1/vms/{vm['id']}")
        self.http.close()
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(15)


def api_first_output(hd: Hostd, hello: Path, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        t = time.perf_counter()
        r = hd.http.post("/v1/vms", json={"image": str(hello), "name": f"lat{i}",
                                          "memory_mib": 256, "start": True})
        r.raise_for_status()
        while b"HELLO" not in hd.http.get(f"/v1/vms/lat{i}/console").content:
            time.sleep(0.002)
        out.append((time.perf_counter() - t) * 1e3)
        hd.http.delete(f"/v1/vms/lat{i}")
    return out


def daemon_density(hd: Hostd, idle: Path, k: int) -> dict:
    pids = []
    for i in range(k):
        r = hd.http.post("/v1/vms", json={"image": str(idle), "name": f"d{i}", "memory_mib": 64,
                                          "cmdline": "secs=600", "start": True})
        r.raise_for_status()
        pids.append(r.json()["pid"])
    time.sleep(1.0)
    cores = [_rss_mib(p) for p in pids]
    daemon = _rss_mib(hd.daemon_pid())
    launcher = _rss_mib(hd.proc.pid)
    per_vm = sum(cores) / k + (daemon + launcher) / k
    for i in range(k):
        hd.http.delete(f"/v1/vms/d{i}")
    return {"vms": k, "core_rss_mib": cores, "daemon_rss_mib": daemon,
            "launcher_rss_mib": launcher, "per_vm_mib": per_vm, "vms_per_gib": 1024 / per_vm}


def oneshot_density(idle: Path) -> dict:
    p = subprocess.Popen(C.sealvm_cmd(idle, "--memory", "64M", cmdline="secs=3"),
                         cwd=C.SEALVM_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)
    tree = C.proc_tree(p.pid)
    rss = {pid: _rss_mib(pid) for pid in tree}
    p.wait(30)
    per_vm = sum(rss.values())
    return {"process_rss_mib": rss, "per_vm_mib": per_vm, "vms_per_gib": 1024 / per_vm}


def oneshot_first_byte(hello: Path, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        r = C.timed_run(C.sealvm_cmd(hello), timeout=60)
        C.check(r, 0)
        out.append(r.first_byte_s * 1e3)
    return out


# ---------------------------------------------------------------- report
def run(args) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the split benchmark needs root (the launcher)")
    n, runs, k = (300, 3, 3) if args.quick else (3000, 10, 8)
    hello, idle = C.guest(args.guests, "hello"), C.guest(args.guests, "idle")
    rtt_portal = portal_rtt(args, n)
    rtt_pair = socketpair_rtt(n)
    base = Path(tempfile.mkdtemp(prefix="sealvm-bench-hostd-"))
    os.chmod(base, 0o755)
    hd = Hostd(base)
    try:
        api = api_first_output(hd, hello, runs)
        dens = daemon_density(hd, idle, k)
    finally:
        hd.close()
        shutil.rmtree(base, ignore_errors=True)
    oneshot = oneshot_first_byte(hello, runs)
    single = oneshot_density(idle)
    med = statistics.median
    rows = [
        C.summary_row(NAME, "portal round trip (QUERY), us", med(rtt_portal), med(rtt_pair),
                      "plain socketpair RTT", "-", None, "us"),
        C.summary_row(NAME, "API create -> first guest output, ms", med(api), med(oneshot),
                      "sealvm run alone (start -> first byte)", "-", None, "ms"),
        C.summary_row(NAME, "density: VMs per GiB (64 MiB idle VMs)", dens["vms_per_gib"],
                      single["vms_per_gib"], "sealvm run alone", "-", None, ""),
    ]
    result = {
        "description": __doc__.split("\n\n")[0],
        "samples": {"portal_rtt_us": rtt_portal, "socketpair_rtt_us": rtt_pair,
                    "api_first_output_ms": api, "oneshot_first_byte_ms": oneshot},
        "density": {"daemon": dens, "oneshot": single},
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag), "cost of the core/host split",
               {"portal RTT (us)": rtt_portal, "socketpair RTT (us)": rtt_pair,
                "API create->output (ms)": api, "sealvm run first byte (ms)": oneshot},
               "us / ms (see label)", log=True)
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])
    d = result["density"]
    print(f"  per-VM host memory: daemon {d['daemon']['per_vm_mib']:.1f} MiB, "
          f"sealvm run {d['oneshot']['per_vm_mib']:.1f} MiB")


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

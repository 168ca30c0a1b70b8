"""Snapshot save and restore: sealed sealvm snapshots vs QEMU's exec: migration to a file.

The same memtouch guest (every page of a region covering nearly all of RAM written,
so neither side can skip zero pages) at 256 MiB and 1 GiB, in the same run:
  * sealvm: `POST /v1/vms/ID/snapshot` to the host daemon (pause, seal every
    populated page and the vCPU/device state under the owner's key, fsync, the
    broker's generation round trip) and `POST /v1/restore` (a new core: spawn,
    attestation naming the snapshot, open and check every chunk, the broker's
    commit), both timed by the caller; the core's own sealing time is read from
    the PROGRESS events' span as well;
  * QEMU microvm (KVM): `stop`, `migrate exec:cat > FILE` with max-bandwidth 10 GB/s,
    polled until completed; restore = process start with `-incoming exec:cat FILE`
    until the migration has completed on the target.
Save is reported as GB/s of guest RAM, restore as seconds; ratios are sealvm/QEMU.
Both files are in the page cache when restored. sealvm fsyncs its snapshot; QEMU
does not (its figure is what `cat` wrote to the page cache). Host memory is warmed
first and the two sides alternate, because on this machine the first use of a
page of host memory is about ten times slower than reusing one.
Needs root (the launcher) and QEMU.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C
from .split import Hostd

NAME = "snapshot"
SIZES_MIB = (256, 1024)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=C.SEALVM_ROOT,
                          capture_output=True, text=True, timeout=120)


def memtouch_cmdline(size_mib: int) -> str:
    return f"mib={size_mib - 24} secs=0 rate=1000"


class Owner:
    """An owner directory with memtouch signed for each size, a policy trusting this host,
    a broker, and the public half copied where the daemon's uid can read it."""

    def __init__(self, base: Path, elf: Path, vms: dict[str, tuple[str, int]]):
        """`vms`: name -> (command line, memory MiB) of the memtouch guests to sign."""
        self.dir, self.public = base / "owner", base / "public"
        r = cli("owner", "init", str(self.dir))
        if r.returncode:
            raise RuntimeError(r.stderr)
        for name, (cmdline, size) in vms.items():
            r = cli("owner", "sign", "--dir", str(self.dir), str(elf), "--name", name,
                    "--cmdline", cmdline, "--memory", str(size))
            if r.returncode:
                raise RuntimeError(r.stderr)
            shutil.copytree(self.dir / "vms" / name, self.public / "vms" / name)
        m = json.loads(cli("measure").stdout)
        for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
            cli("owner", "policy", "--dir", str(self.dir), "add", kind, value)
        shutil.copy(self.dir / "owner.pub.json", self.public / "owner.pub.json")
        for p in [self.public, *self.public.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.broker = subprocess.Popen(
            [sys.executable, "-m", "sealvm.cli", "owner", "broker", "--dir", str(self.dir),
             "--port", str(port)], cwd=C.SEALVM_ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the broker did not start")

    def close(self) -> None:
        self.broker.terminate()
        self.broker.wait(10)


def wait_console(hd: Hostd, vm: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in hd.http.get(f"/v1/vms/{vm}/console").text:
            return
        time.sleep(0.1)
    raise RuntimeError(f"{vm}: no {text!r} on the console")


def sealvm_round(hd: Hostd, owner: "Owner", elf: Path, size: int, i: int, d: Path) -> dict:
    vm = f"s{size}-{i}"
    r = hd.http.post("/v1/vms", json=dict(
        image=str(elf), name=vm, memory_mib=size, cmdline=memtouch_cmdline(size), start=True,
        manifest=str(owner.public / "vms" / f"m{size}"), broker=owner.url), timeout=300)
    r.raise_for_status()
    wait_console(hd, vm, "memtouch t=1 ")
    path = d / f"{vm}.svs"
    t = time.perf_counter()
    r = hd.http.post(f"/v1/vms/{vm}/snapshot", json={"path": str(path), "resume": False},
                     timeout=600)
    save_s = time.perf_counter() - t
    r.raise_for_status()
    phases = {"seal_s": r.json()["seal_s"], "commit_s": r.json()["commit_s"]}
    hd.http.delete(f"/v1/vms/{vm}")
    t = time.perf_counter()
    r = hd.http.post("/v1/restore", json=dict(
        snapshot=str(path), name=f"{vm}r", manifest=str(owner.public / "vms" / f"m{size}"),
        broker=owner.url, start=False), timeout=600)
    restore_s = time.perf_counter() - t
    r.raise_for_status()
    phases.update(hd.http.get(f"/v1/vms/{vm}r/progress").json()["restore"])
    hd.http.post(f"/v1/vms/{vm}r/start").raise_for_status()
    wait_console(hd, f"{vm}r", "memtouch t=")
    ok = "MISMATCH" not in hd.http.get(f"/v1/vms/{vm}r/console").text
    hd.http.delete(f"/v1/vms/{vm}r")
    size_bytes = path.stat().st_size
    path.unlink()
    return {"save_s": save_s, "restore_s": restore_s, "file_bytes": size_bytes, "ok": ok,
            "phases": phases}


class Qmp:
    def __init__(self, path: str, timeout: float = 20):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> dict:
        self.f.write(json.dumps({"execute": name, "arguments": args} if args
                                else {"execute": name}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        self.s.close()


def qemu_round(elf: Path, size: int, i: int, d: Path) -> dict:
    qmp_path, serial = str(d / f"q{size}-{i}.qmp"), d / f"q{size}-{i}.serial"
    path = d / f"q{size}-{i}.mig"
    base = C.qemu_cmd(elf, "kvm", memtouch_cmdline(size), f"{size}M")
    base = [a for a in base if a != "-nographic"]
    src = subprocess.Popen(base + ["-display", "none", "-serial", f"file:{serial}",
                                   "-qmp", f"unix:{qmp_path},server=on,wait=off"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while b"memtouch t=1 " not in (serial.read_bytes() if serial.exists() else b""):
            if time.monotonic() > deadline or src.poll() is not None:
                raise RuntimeError("QEMU guest did not start")
            time.sleep(0.1)
        q = Qmp(qmp_path)
        q.cmd("migrate-set-parameters", **{"max-bandwidth": 10_000_000_000})
        t = time.perf_counter()
        q.cmd("stop")
        q.cmd("migrate", uri=f"exec:cat > {path}")
        while q.cmd("query-migrate")["return"].get("status") not in ("completed", "failed"):
            time.sleep(0.005)
        save_s = time.perf_counter() - t
        q.close()
    finally:
        src.kill()
        src.wait()
    qmp2 = str(d / f"q{size}-{i}-in.qmp")
    t = time.perf_counter()
    dst = subprocess.Popen(base + ["-display", "none", "-serial", "null", "-qmp",
                                   f"unix:{qmp2},server=on,wait=off",
                                   "-incoming", f"exec:cat {path}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        q = Qmp(qmp2)
        while q.cmd("query-status")["return"].get("status") == "inmigrate":
            time.sleep(0.005)
        restore_s = time.perf_counter() - t
        q.close()
    finally:
        dst.kill()
        dst.wait()
    size_bytes = path.stat().st_size
    path.unlink()
    return {"save_s": save_s, "restore_s": restore_s, "file_bytes": size_bytes}


def warm_host_memory(d: Path, size_mib: int) -> None:
    """Write and delete a file of `size_mib`: on this machine the first use of a guest
    page of the host VM is ~10x slower than reusing one, and whichever side of the
    comparison ran first would pay for it."""
    block = bytes(8 << 20)
    path = d / "warm.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size_mib // 8):
            os.write(fd, block)
    finally:
        os.close(fd)
        path.unlink()


def run(args) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the snapshot benchmark needs root (the launcher)")
    if not C.have_qemu():
        raise RuntimeError("QEMU is needed for the peer")
    runs = 1 if args.quick else 3
    sizes = SIZES_MIB[:1] if args.quick else SIZES_MIB
    elf = C.guest(args.guests, "memtouch")
    base = Path(tempfile.mkdtemp(prefix="sealvm-bench-snap-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    d = base / "files"
    d.mkdir()
    shutil.chown(d, 63999, 63999)        # the daemon's uid writes the snapshots here
    os.chmod(d, 0o777)
    owner = Owner(base, elf, {f"m{size}": (memtouch_cmdline(size), size) for size in sizes})
    (base / "host").mkdir()
    hd = Hostd(base / "host")
    samples: dict = {}
    try:
        for size in sizes:
            warm_host_memory(d, 4 * size)
            for i in range(runs):          # alternate which side goes first
                order = ("sealvm", "qemu") if i % 2 == 0 else ("qemu", "sealvm")
                for side in order:
                    samples.setdefault(f"{side} {size} MiB", []).append(
                        sealvm_round(hd, owner, elf, size, i, d) if side == "sealvm"
                        else qemu_round(elf, size, i, d))
    finally:
        hd.close()
        owner.close()
        shutil.rmtree(base, ignore_errors=True)
    med = statistics.median
    rows, plot = [], {}
    for size in sizes:
        s, q = samples[f"sealvm {size} MiB"], samples[f"qemu {size} MiB"]
        ram = size * 2**20 / 1e9
        s_gbs = [ram / x["save_s"] for x in s]
        q_gbs = [ram / x["save_s"] for x in q]
        rows.append(C.summary_row(NAME, f"save {size} MiB, GB/s of RAM", med(s_gbs), med(q_gbs),
                                  "QEMU migrate exec:cat", ">= 1.5 GB/s and >= 2x QEMU",
                                  med(s_gbs) >= 1.5 and med(s_gbs) >= 2 * med(q_gbs), "GB/s"))
        s_rs, q_rs = [x["restore_s"] for x in s], [x["restore_s"] for x in q]
        goal_ok = med(s_rs) <= med(q_rs) / 2 and (size < 1024 or med(s_rs) <= 0.7)
        rows.append(C.summary_row(NAME, f"restore {size} MiB, s", med(s_rs), med(q_rs),
                                  "QEMU -incoming exec:cat", "<= 0.7 s at 1 GiB and <= 0.5x QEMU",
                                  goal_ok, "s"))
        plot[f"sealvm save {size}M (GB/s)"] = s_gbs
        plot[f"QEMU save {size}M (GB/s)"] = q_gbs
        plot[f"sealvm restore {size}M (s)"] = s_rs
        plot[f"QEMU restore {size}M (s)"] = q_rs
    result = {"description": __doc__.split("\n\n")[0], "samples": samples, "summary": rows,
              "all_restores_verified": all(x["ok"] for k, v in samples.items()
                                           if k.startswith("sealvm") for x in v)}
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag), "sealed snapshot vs QEMU exec: migration",
               plot, "GB/s (save) / s (restore)", log=True,
               note="sealvm: API call to the daemon, sealing, fsync, owner's broker round trip; "
                    "restore includes a new core's spawn and attestation.")
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])
    for name, runs in result["samples"].items():
        if name.startswith("sealvm"):
            ph = {k: statistics.median(r["phases"][k] for r in runs) for k in runs[0]["phases"]}
            print(f"  {name} phases (median s): " + ", ".join(f"{k}={v:.3f}" for k, v in ph.items()))
    print(f"  every restored guest verified its memory: {result['all_restores_verified']}")


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

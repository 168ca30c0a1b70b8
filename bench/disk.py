"""Sealed disk throughput: blkbench under sealvm vs QEMU virtio-blk raw and QEMU LUKS.

The same guest (`blkbench.elf`), the same requests, in the same run:

* sealvm: `sealvm run --disk` on a sealed image (AES-256-GCM per 4 KiB block, position
  and version bound, MACed hash tree, FLUSH = commit); the key reaches the core through
  the test-mode switch (no owner broker here);
* qemu-raw: QEMU microvm, `virtio-blk-device` on a raw file (no confidentiality, no
  integrity);
* qemu-luks: the same on a qcow2 image with `encrypt.format=luks` (key on the host;
  confidentiality only: no integrity, no freshness).

Metrics, from the guest's own TSC cycle counts per phase: 64 KiB sequential write and
read (MB/s, queue depth 4, FLUSH at the end of the write phase counted in), 4 KiB
random write and read IOPS at queue depth 1 and 32.  The crypto share is the time the
AEAD alone needs for that many 4 KiB blocks (measured in this process with the same
`cryptography` calls the core makes) over the phase's time under sealvm.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C

NAME = "disk"
PEERS = ("sealvm", "qemu-raw", "qemu-luks")
LUKS_SECRET = "sealvm-bench"


def configs(quick: bool) -> dict[str, str]:
    size = "8M" if quick else "64M"
    n1, n32 = (300, 1000) if quick else (3000, 12000)
    return {"seq64k": f"tests=seqwrite,seqread bs=65536 qd=4 size={size}",
            "rand4k-qd1": f"tests=randwrite,randread bs=4096 qd=1 count={n1} size={size}",
            "rand4k-qd32": f"tests=randwrite,randread bs=4096 qd=32 indirect=1 count={n32} "
                           f"size={size}"}


def parse_phases(out: str) -> dict[str, dict]:
    """{'seqwrite': {'ops':.., 'bytes':.., 'cycles':.., 'errors':.., 'mismatches':..}, ...}"""
    got = {}
    for name in ("seqwrite", "seqread", "randwrite", "randread"):
        w = C.find_line(out, f"blkbench {name} ")
        if w:
            got[name] = {k: int(w[k]) for k in ("ops", "bytes", "cycles", "errors", "mismatches")}
    return got


def _must(cmd: list[str]) -> None:
    r = subprocess.run(cmd, cwd=C.SEALVM_ROOT, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{C.shell_join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


class Images:
    """One disk image per peer, made once per benchmark run."""

    def __init__(self, work: Path, size_mib: int):
        self.work = work
        self.key = os.urandom(32)
        key_file = work / "disk.key"
        key_file.write_bytes(self.key)
        os.chmod(key_file, 0o600)
        self.sealed = work / "sealed.img"
        _must([sys.executable, "-m", "sealvm.cli", "disk", "create", f"{size_mib}M",
               "-o", str(self.sealed), "--key-file", str(key_file)])
        self.raw = work / "raw.img"
        with open(self.raw, "wb") as f:
            f.truncate(size_mib << 20)
        self.luks = work / "luks.qcow2"
        _must(["qemu-img", "create", "-f", "qcow2", "--object",
               f"secret,id=sec0,data={LUKS_SECRET}", "-o",
               "encrypt.format=luks,encrypt.key-secret=sec0", str(self.luks), f"{size_mib}M"])

    def command(self, peer: str, elf: Path, cmdline: str) -> tuple[list[str], dict]:
        if peer == "sealvm":
            env = {"SEALVM_TEST_MODE": "1", "SEALVM_TEST_DISK_KEY": self.key.hex()}
            return C.sealvm_cmd(elf, "--disk", str(self.sealed), cmdline=cmdline), env
        blk = ["-global", "virtio-mmio.force-legacy=false"]
        if peer == "qemu-raw":
            blk += ["-drive", f"if=none,id=d0,format=raw,file={self.raw}"]
        else:
            blk += ["-object", f"secret,id=sec0,data={LUKS_SECRET}",
                    "-drive", f"if=none,id=d0,file={self.luks},encrypt.key-secret=sec0"]
        blk += ["-device", "virtio-blk-device,drive=d0"]
        return C.qemu_cmd(elf, "kvm", cmdline, extra=blk), {}


def aead_seconds_per_block() -> tuple[float, float]:
    """(seal, open) seconds for one 4 KiB block with the core's AEAD calls."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    aead = AESGCM(os.urandom(32))
    data, aad, n = os.urandom(4096), os.urandom(32), 1000
    nonces = [os.urandom(12) for _ in range(n)]
    seal, open_ = [], []
    for _ in range(5):        # the fastest of five: a fixed cost, disturbed only upwards
        t0 = time.perf_counter()
        sealed = [aead.encrypt(nonce, data, aad) for nonce in nonces]
        t1 = time.perf_counter()
        for nonce, s in zip(nonces, sealed):
            aead.decrypt(nonce, s, aad)
        t2 = time.perf_counter()
        seal.append((t1 - t0) / n)
        open_.append((t2 - t1) / n)
    return min(seal), min(open_)


def run(args) -> dict:
    if not C.have_qemu() or not shutil.which("qemu-img"):
        raise SystemExit("this benchmark needs qemu-system-x86_64 and qemu-img")
    quick = args.quick
    runs = 1 if quick else 3
    hz = C.tsc_hz()
    elf = C.guest(args.guests, "blkbench")
    cfgs = configs(quick)
    work = Path(tempfile.mkdtemp(prefix="sealvm-bench-disk-", dir="/tmp"))
    samples: dict[str, list[float]] = {}
    raw: dict[str, list[dict]] = {}
    commands: dict[str, str] = {}
    try:
        images = Images(work, 16 if quick else 128)
        for _ in range(runs):
            for cfg, cmdline in cfgs.items():
                for peer in PEERS:
                    cmd, env = images.command(peer, elf, cmdline)
                    commands[f"{peer} {cfg}"] = C.shell_join(cmd)
                    r = C.timed_run(cmd, timeout=600, env=env)
                    C.check(r, 0, qemu=peer != "sealvm")
                    for phase, p in parse_phases(r.out).items():
                        if p["errors"] or p["mismatches"]:
                            raise RuntimeError(f"{peer} {cfg} {phase}: data check failed: {p}")
                        secs = p["cycles"] / hz
                        key = f"{peer} {cfg} {phase}"
                        value = p["bytes"] / secs / 1e6 if cfg == "seq64k" else p["ops"] / secs
                        samples.setdefault(key, []).append(value)
                        raw.setdefault(key, []).append({**p, "seconds": secs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seal_s, open_s = aead_seconds_per_block()
    med = {k: C.median(v) for k, v in samples.items()}
    crypto_share = {}
    for key, rows in raw.items():
        if key.startswith("sealvm "):
            per = seal_s if "write" in key else open_s
            shares = [r["bytes"] / 4096 * per / r["seconds"] for r in rows]
            crypto_share[key[len("sealvm "):]] = C.median(shares)
    rows = []
    metrics = [("seq64k", "seqwrite", "64 KiB seq write", "MB/s"),
               ("seq64k", "seqread", "64 KiB seq read", "MB/s"),
               ("rand4k-qd1", "randwrite", "4 KiB rand write QD1", "IOPS"),
               ("rand4k-qd1", "randread", "4 KiB rand read QD1", "IOPS"),
               ("rand4k-qd32", "randwrite", "4 KiB rand write QD32", "IOPS"),
               ("rand4k-qd32", "randread", "4 KiB rand read QD32", "IOPS")]
    for cfg, phase, label, unit in metrics:
        s = med.get(f"sealvm {cfg} {phase}")
        luks, plain = med.get(f"qemu-luks {cfg} {phase}"), med.get(f"qemu-raw {cfg} {phase}")
        seq = cfg == "seq64k"
        r_luks, r_raw = C.ratio(s, luks), C.ratio(s, plain)
        rows.append(C.summary_row(NAME, f"{label} ({unit})", s, luks, "qemu-luks",
                                  ">= 1.0x" if seq else "-",
                                  (r_luks >= 1.0) if seq and r_luks else None, unit))
        rows.append(C.summary_row(NAME, f"{label} ({unit})", s, plain, "qemu-raw",
                                  ">= 0.5x" if seq else "-",
                                  (r_raw >= 0.5) if seq and r_raw else None, unit))
    result = {
        "description": "blkbench phases timed by the guest (TSC cycles / host TSC Hz); "
                       "MB/s for 64 KiB sequential, IOPS for 4 KiB random",
        "tsc_hz": hz,
        "runs": runs,
        "configs": cfgs,
        "commands": commands,
        "raw": raw,
        "samples": samples,
        "medians": med,
        "aead_us_per_4k_block": {"seal": seal_s * 1e6, "open": open_s * 1e6},
        "crypto_share_of_sealvm_time": crypto_share,
        "notes": "sealvm gets its disk key through the test-mode switch in this benchmark; "
                 "qemu-luks is qcow2 with encrypt.format=luks (confidentiality only); "
                 "qemu-raw has neither confidentiality nor integrity.",
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    s = result["samples"]
    seq = {k.replace(" seq64k", ""): v for k, v in s.items() if " seq64k " in k}
    rnd = {k.replace(" rand4k", ""): v for k, v in s.items() if " rand4k" in k}
    C.bar_plot(path, "64 KiB sequential (MB/s, higher is better)", seq, "MB/s",
               note="sealvm: AES-256-GCM + hash tree + freshness; qemu-luks: encryption only; "
                    "qemu-raw: none")
    C.bar_plot(path.with_name(path.stem + "-iops.png"),
               "4 KiB random (IOPS, log scale, higher is better)", rnd, "IOPS", log=True)


def report(result: dict) -> None:
    for k, v in result["medians"].items():
        print(f"  {k:<36} {C.fmt(v)}")
    for k, v in result["crypto_share_of_sealvm_time"].items():
        print(f"  crypto share {k:<28} {C.fmt(v)}")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Exit costs: port I/O, MMIO and ioeventfd writes; virtio-rng throughput.

* `exits.elf kind=pio|mmio|ioevent|gate n=N` under sealvm (`--bench-sinks`
  for the ioeventfd address) and, for pio/mmio/gate, under QEMU microvm with
  -accel kvm, same ELF, same run.  The guest counts TSC cycles around N
  operations; cycles are turned into time with the host TSC frequency
  measured by bench/csrc/hostprobe.c (rdtsc against CLOCK_MONOTONIC_RAW).
* A plain-syscall peer: one getppid() system call in a native C loop, to put
  exits in proportion.
* `rng.elf count=.. chunk=..` under sealvm vs QEMU-KVM with
  `-device virtio-rng-device` (virtio-mmio version 2): bytes per second from
  the guest's own cycle count.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common as C

NAME = "exits"
KINDS = ("pio", "mmio", "ioevent", "gate")
RNG_CONFIGS = (("4 KiB chunks", "count=1024 chunk=4096"), ("512 B chunks", "count=2048 chunk=512"))


# ---------------------------------------------------------------- parsing
def parse_exits(out: str) -> dict | None:
    """'exits kind=pio n=20000 cycles=123' -> {'kind': 'pio', 'n': 20000, 'cycles': 123}."""
    w = C.find_line(out, "exits kind=")
    if not w or "cycles" not in w:
        return None
    return {"kind": w["kind"], "n": int(w["n"]), "cycles": int(w["cycles"])}


def parse_rng(out: str) -> dict | None:
    w = C.find_line(out, "rng bytes=")
    if not w:
        return None
    return {"bytes": int(w["bytes"]), "cycles": int(w["cycles"])}


def parse_getppid(out: str) -> dict | None:
    w = C.find_line(out, "getppid ")
    if not w:
        return None
    return {"n": int(w["n"]), "ns": int(w["ns"]), "cycles": int(w["cycles"])}


def usecs_per_op(cycles: int, n: int, tsc_hz: float) -> float:
    return cycles / n / tsc_hz * 1e6


# ---------------------------------------------------------------- running
def run(args) -> dict:
    quick = args.quick
    runs = 1 if quick else 3
    n = 2000 if quick else 20000
    elf = C.guest(args.guests, "exits")
    rng = C.guest(args.guests, "rng")
    hz = C.tsc_hz()
    probe = C.hostprobe()

    cmds: dict[str, list[str]] = {}
    for kind in KINDS:
        cl = f"kind={kind} n={n}"
        cmds[f"sealvm {kind}"] = C.sealvm_cmd(elf, "--bench-sinks", cmdline=cl)
        if kind != "ioevent":                      # QEMU has no sealvm.ioevent address
            cmds[f"qemu-kvm {kind}"] = C.qemu_cmd(elf, "kvm", cl)
    samples: dict[str, list[float]] = {k: [] for k in cmds}
    raw: dict[str, list[dict]] = {k: [] for k in cmds}
    skipped: dict[str, str] = {}
    for _ in range(runs):
        for label, cmd in cmds.items():
            if label in skipped:
                continue
            is_qemu = label.startswith("qemu")
            r = C.timed_run(cmd, timeout=300)
            C.check(r, 0, qemu=is_qemu)
            p = parse_exits(r.out)
            if p is None and "skipped" in r.out:
                skipped[label] = next(l for l in r.out.splitlines() if "skipped" in l)
                continue
            if p is None:
                raise RuntimeError(f"{label}: no 'exits kind=' line in {r.out[-500:]!r}")
            raw[label].append({**p, "wall_s": r.exit_s})
            samples[label].append(usecs_per_op(p["cycles"], p["n"], hz))

    # The plain system call.
    sys_n = 200_000 if quick else 1_000_000
    syscall_ns = []
    for _ in range(runs):
        r = C.timed_run([str(probe), "getppid", str(sys_n)], timeout=60)
        C.check(r, 0)
        g = parse_getppid(r.out)
        syscall_ns.append(g["ns"] / g["n"])

    # virtio-rng throughput.
    rng_samples: dict[str, list[float]] = {}
    rng_cmds: dict[str, list[str]] = {}
    for label, cl in RNG_CONFIGS:
        if quick:
            cl = "count=256 chunk=4096" if "4 KiB" in label else "count=256 chunk=512"
        rng_cmds[f"sealvm rng {label}"] = C.sealvm_cmd(rng, cmdline=cl)
        rng_cmds[f"qemu-kvm rng {label}"] = C.qemu_cmd(rng, "kvm", cl, rng=True)
    for k in rng_cmds:
        rng_samples[k] = []
    for _ in range(runs):
        for label, cmd in rng_cmds.items():
            r = C.timed_run(cmd, timeout=120)
            C.check(r, 0, qemu=label.startswith("qemu"))
            p = parse_rng(r.out)
            if p is None:
                raise RuntimeError(f"{label}: no 'rng bytes=' line in {r.out[-500:]!r}")
            rng_samples[label].append(p["bytes"] / (p["cycles"] / hz) / 1e6)   # MB/s

    med = {k: C.median(v) for k, v in samples.items()}
    sys_us = C.median(syscall_ns) / 1000.0
    rng_med = {k: C.median(v) for k, v in rng_samples.items()}
    rows = []
    for kind in ("pio", "mmio"):
        s, q = med[f"sealvm {kind}"], med[f"qemu-kvm {kind}"]
        rows.append(C.summary_row(NAME, f"{kind} exit (us/exit)", s, q, "qemu-kvm", "-", None,
                                  "us"))
    s = med["sealvm ioevent"]
    rows.append(C.summary_row(NAME, "ioeventfd write (us/write)", s, sys_us, "getppid syscall",
                              "- (no userspace exit)", None, "us"))
    rows.append(C.summary_row(NAME, "pio exit vs one syscall", med["sealvm pio"], sys_us,
                              "getppid syscall", "-", None, "us"))
    for label, _ in RNG_CONFIGS:
        s, q = rng_med[f"sealvm rng {label}"], rng_med[f"qemu-kvm rng {label}"]
        rows.append(C.summary_row(NAME, f"virtio-rng {label} (MB/s)", s, q, "qemu-kvm", "-",
                                  None, "MB/s"))
    result = {
        "description": "guest-timed cost per operation (TSC cycles / host TSC Hz); "
                       "virtio-rng bytes per second of guest time",
        "tsc_hz": hz,
        "n": n,
        "runs": runs,
        "commands": {**{k: C.shell_join(v) for k, v in cmds.items()},
                     **{k: C.shell_join(v) for k, v in rng_cmds.items()},
                     "getppid": f"{probe} getppid {sys_n}"},
        "raw": raw,
        "skipped": skipped,
        "samples_us_per_op": samples,
        "medians_us_per_op": med,
        "ratios_sealvm_vs_qemu_kvm": {k: C.ratio(med.get(f"sealvm {k}"), med.get(f"qemu-kvm {k}"))
                                      for k in ("pio", "mmio", "gate")},
        "syscall_getppid_ns": {"samples": syscall_ns, "median": C.median(syscall_ns)},
        "exit_in_syscalls": {k: v / sys_us for k, v in med.items() if v is not None},
        "rng_samples_MBps": rng_samples,
        "rng_medians_MBps": rng_med,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    groups = {k: v for k, v in result["samples_us_per_op"].items() if v}
    groups["getppid syscall"] = [x / 1000 for x in result["syscall_getppid_ns"]["samples"]]
    C.bar_plot(path, "Cost per operation (us, log scale; lower is better)", groups, "us",
               log=True, note=f"TSC {result['tsc_hz'] / 1e9:.3f} GHz; n={result['n']}")
    C.bar_plot(path.with_name(path.stem + "-rng.png"),
               "virtio-rng throughput (MB/s of guest time; higher is better)",
               result["rng_samples_MBps"], "MB/s")


def report(result: dict) -> None:
    for k, v in result["medians_us_per_op"].items():
        print(f"  {k:<18} {C.fmt(v, 'us')}")
    print(f"  getppid syscall    {C.fmt(result['syscall_getppid_ns']['median'], 'ns')}")
    for k, v in result["rng_medians_MBps"].items():
        print(f"  {k:<30} {C.fmt(v, 'MB/s')}")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

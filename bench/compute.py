"""Compute: the register-only loop of compute.elf vs the same loop natively.

`compute.elf iters=N` under sealvm and under QEMU microvm -accel kvm, and
`native_compute iters=N` (the same compute_loop.c built for the host),
interleaved in the same run.  Two measures: the loop's own TSC cycles (guest
or native rdtsc around the loop) and whole-process wall time (spawn ->
reaped, so it includes start-up and tear-down).  Speed relative to native is
native / sealvm (1.0 = as fast as native; the goal is >= 0.97).
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common as C

NAME = "compute"
ITERS = 1_000_000_000
QUICK_ITERS = 100_000_000
GOAL = 0.97


# ---------------------------------------------------------------- parsing
def parse_compute(out: str) -> dict | None:
    """First 'compute cpu=I iters=N cycles=C result=0x..' line -> ints (result as a string)."""
    w = C.find_line(out, "compute cpu=")
    if not w or "cycles" not in w:
        return None
    return {"cpu": w["cpu"], "iters": int(w["iters"]), "cycles": int(w["cycles"]),
            "result": w["result"]}


def speed_vs_native(native_value: float | None, value: float | None) -> float | None:
    """native / value: 1.0 = native speed, below 1 = slower (time-like inputs)."""
    return C.ratio(native_value, value)


# ---------------------------------------------------------------- running
def run(args) -> dict:
    iters = QUICK_ITERS if args.quick else ITERS
    runs = 1 if args.quick else 3
    elf = C.guest(args.guests, "compute")
    cl = f"iters={iters}"
    cmds = {
        "native": ([str(C.native(args.guests, "native_compute")), cl], False),
        "sealvm": (C.sealvm_cmd(elf, "--no-rng", cmdline=cl), False),
        "qemu-kvm": (C.qemu_cmd(elf, "kvm", cl), True),
    }
    cycles = {k: [] for k in cmds}
    wall = {k: [] for k in cmds}
    results = {k: set() for k in cmds}
    for _ in range(runs):
        for label, (cmd, is_qemu) in cmds.items():
            r = C.timed_run(cmd, timeout=600)
            C.check(r, 0, qemu=is_qemu)
            p = parse_compute(r.out)
            if p is None or p["iters"] != iters:
                raise RuntimeError(f"{label}: no matching compute line in {r.out[-500:]!r}")
            cycles[label].append(p["cycles"])
            wall[label].append(r.exit_s)
            results[label].add(p["result"])
    all_results = set().union(*results.values())
    if len(all_results) != 1:
        raise RuntimeError(f"compute results differ: {results}")
    hz = C.tsc_hz()
    mc = {k: C.median(v) for k, v in cycles.items()}
    mw = {k: C.median(v) for k, v in wall.items()}
    speed = {k: {"loop": speed_vs_native(mc["native"], mc[k]),
                 "process": speed_vs_native(mw["native"], mw[k])} for k in cmds}
    rows = [
        C.summary_row(NAME, "loop time, guest TSC (speed vs native)", mc["sealvm"] / hz,
                      mc["native"] / hz, "native", f">= {GOAL}x native",
                      speed["sealvm"]["loop"] >= GOAL, "s", ratio_value=speed["sealvm"]["loop"]),
        C.summary_row(NAME, "whole process wall (speed vs native)", mw["sealvm"], mw["native"],
                      "native", f">= {GOAL}x native", speed["sealvm"]["process"] >= GOAL, "s",
                      ratio_value=speed["sealvm"]["process"]),
        C.summary_row(NAME, "loop time vs QEMU-KVM (speed)", mc["sealvm"] / hz,
                      mc["qemu-kvm"] / hz, "qemu-kvm", "-", None, "s",
                      ratio_value=C.ratio(mc["qemu-kvm"], mc["sealvm"])),
    ]
    result = {
        "description": f"compute loop, iters={iters}: loop TSC cycles and whole-process wall "
                       "time; speed = native / sealvm",
        "iters": iters,
        "runs": runs,
        "result_value": all_results.pop(),
        "commands": {k: C.shell_join(v[0]) for k, v in cmds.items()},
        "samples_cycles": cycles,
        "samples_wall_s": wall,
        "median_cycles": mc,
        "median_wall_s": mw,
        "speed_vs_native": speed,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    hz = result["host"]["tsc_hz"]
    groups = {}
    for k, v in result["samples_cycles"].items():
        groups[f"{k}\nloop (TSC)"] = [c / hz for c in v]
    for k, v in result["samples_wall_s"].items():
        groups[f"{k}\nwhole process"] = v
    C.bar_plot(path, f"compute loop, {result['iters']:.0e} iterations (s, lower is better)",
               groups, "s")


def report(result: dict) -> None:
    hz = result["host"]["tsc_hz"]
    for k in result["median_cycles"]:
        s = result["speed_vs_native"][k]
        print(f"  {k:<9} loop {C.fmt(result['median_cycles'][k] / hz, 's'):>9} "
              f"({C.fmt(s['loop'])}x native)  process {C.fmt(result['median_wall_s'][k], 's'):>9} "
              f"({C.fmt(s['process'])}x native)")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

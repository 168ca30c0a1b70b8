"""Idle: host CPU used while the guest waits (idle.elf secs=S).

idle.elf calls idle_wait(1 s) S times.  Under sealvm that is a park on the
idle doorbell (the vCPU thread sleeps); QEMU has no such doorbell, so the same
guest spins with `pause` there (reported as it is: QEMU is not idle here).

Two measures per run:
  * steady idle: CPU seconds of the process tree (utime+stime of every
    process, from /proc/PID/stat, sampled every 0.25 s) between 1 s and S s
    after the spawn (the guest is waiting all that time), divided by that window:
    the share of one core the idle VM costs once started.  Goal: < 1 %.
  * whole run: utime+stime from wait4() on the child (all threads, plus any
    children it reaped), divided by the wall time; includes start-up.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common as C

NAME = "idle"
GOAL_PCT = 1.0
WINDOW_START_S = 1.0


# ---------------------------------------------------------------- parsing
def parse_idle(out: str) -> dict | None:
    w = C.find_line(out, "idle secs=")
    if not w or "idle done" not in out:
        return None
    return {"secs": int(w["secs"]), "cycles": int(w["cycles"]),
            "doorbell": int(w["doorbell"], 16)}


def steady_share(samples: list[tuple[float, float]], start: float = WINDOW_START_S,
                 end: float | None = None) -> dict:
    """[(elapsed s, tree CPU s)] -> CPU share of one core between `start` and `end`."""
    pts = [(t, c) for t, c in samples
           if t >= start and (end is None or t <= end) and c is not None]
    if len(pts) < 2:
        return {"window_s": None, "cpu_s": None, "pct_of_core": None, "resolution_pct": None}
    (t0, c0), (t1, c1) = pts[0], pts[-1]
    window = t1 - t0
    return {"window_s": window, "cpu_s": c1 - c0,
            "pct_of_core": (c1 - c0) / window * 100 if window > 0 else None,
            "resolution_pct": 100.0 / C.CLK_TCK / window if window > 0 else None}


# ---------------------------------------------------------------- running
def run(args) -> dict:
    secs = 3 if args.quick else 10
    elf = C.guest(args.guests, "idle")
    cl = f"secs={secs}"
    cmds = {"sealvm": (C.sealvm_cmd(elf, cmdline=cl), False),
            "qemu-kvm": (C.qemu_cmd(elf, "kvm", cl), True)}
    out = {}
    for label, (cmd, is_qemu) in cmds.items():
        r = C.timed_run(cmd, timeout=secs + 60,
                        sampler=lambda pid, t: (t, C.tree_cpu_seconds(pid)), sample_every=0.25)
        C.check(r, 0, qemu=is_qemu)
        p = parse_idle(r.out)
        if p is None:
            raise RuntimeError(f"{label}: no idle lines in {r.out[-500:]!r}")
        steady = steady_share(r.samples, WINDOW_START_S, secs)   # the guest waits until >= secs
        out[label] = {
            "guest": p,
            "wall_s": r.exit_s,
            "cpu_s": r.cpu_s,
            "utime_s": r.utime,
            "stime_s": r.stime,
            "whole_run_pct_of_core": r.cpu_s / r.exit_s * 100,
            "steady": steady,
            "samples": r.samples,
        }
    s, q = out["sealvm"], out["qemu-kvm"]
    rows = [
        C.summary_row(NAME, f"steady idle CPU, idle.elf secs={secs}",
                      s["steady"]["pct_of_core"], q["steady"]["pct_of_core"],
                      "qemu-kvm (spins)", f"< {GOAL_PCT}% of a core",
                      s["steady"]["pct_of_core"] is not None
                      and s["steady"]["pct_of_core"] < GOAL_PCT, "%"),
        C.summary_row(NAME, "whole run CPU / wall (incl. start-up)",
                      s["whole_run_pct_of_core"], q["whole_run_pct_of_core"], "qemu-kvm (spins)",
                      "-", None, "%"),
    ]
    result = {
        "description": "host CPU (utime+stime of the process tree) while idle.elf waits; "
                       "sealvm parks on its idle doorbell, QEMU (no doorbell) spins",
        "secs": secs,
        "commands": {k: C.shell_join(v[0]) for k, v in cmds.items()},
        "runs": out,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    plot(result, C.plot_path(NAME, args.out, args.tag))
    return result


def plot(result: dict, path: Path) -> None:
    plt = C.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, r in result["runs"].items():
        pts = [(t, c) for t, c in r["samples"] if c is not None]
        ax.plot([t for t, _ in pts], [c for _, c in pts], marker=".",
                label=f"{label}: steady {C.fmt(r['steady']['pct_of_core'])}% of a core")
    ax.set_xlabel("seconds since spawn")
    ax.set_ylabel("CPU seconds used (process tree)")
    ax.set_title(f"idle.elf secs={result['secs']}: cumulative host CPU", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict) -> None:
    for k, r in result["runs"].items():
        print(f"  {k:<9} steady {C.fmt(r['steady']['pct_of_core'], '%')} of a core over "
              f"{C.fmt(r['steady']['window_s'], 's')}; whole run {C.fmt(r['cpu_s'], 's')} CPU in "
              f"{C.fmt(r['wall_s'], 's')} ({C.fmt(r['whole_run_pct_of_core'], '%')})")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

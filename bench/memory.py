"""Memory: the monitor's own RSS beside a 256 MiB guest that has touched 200 MiB.

`memtouch.elf mib=200` (first touch, second pass, then a paced steady phase)
under sealvm (256M) and under QEMU microvm -accel kvm with memfd RAM
(`-object memory-backend-memfd,id=mem,size=256M -machine memory-backend=mem`),
so that in both the guest's pages are shared memory.  /proc/PID/status of
every process in the tree is sampled every 0.2 s; the monitor's own memory is
RssAnon + RssFile (guest RAM is RssShmem and is excluded).  The figure is the
largest such sum over the process tree once the guest has touched its 200 MiB
(RssShmem >= 200 MiB); when the monitor is split into several processes, the
process that holds guest RAM is also reported alone.  Goal: <= 40 MiB.
"""
from __future__ import annotations

import sys
from pathlib import Path

from . import common as C

NAME = "memory"
MIB = 200
GOAL_MIB = 40.0


# ---------------------------------------------------------------- parsing
def own_kib(status: dict) -> int:
    """RssAnon + RssFile of one /proc/PID/status (KiB)."""
    return status.get("RssAnon", 0) + status.get("RssFile", 0)


def steady_own_mib(samples: list[dict], touched_mib: float = MIB) -> dict:
    """samples: [{'t': s, 'procs': {pid: status}}] -> the monitor's peak own RSS once the
    guest's RAM (RssShmem summed over the tree) reached `touched_mib`."""
    best = None
    for s in samples:
        procs = s["procs"].values()
        shmem = sum(p.get("RssShmem", 0) for p in procs) / 1024
        if shmem < touched_mib:
            continue
        own = sum(own_kib(p) for p in procs) / 1024
        anon = sum(p.get("RssAnon", 0) for p in procs) / 1024
        file = sum(p.get("RssFile", 0) for p in procs) / 1024
        if best is None or own > best["own_mib"]:
            best = {"t": s["t"], "own_mib": own, "anon_mib": anon, "file_mib": file,
                    "shmem_mib": shmem, "processes": len(s["procs"]),
                    "per_process": [{"pid": pid, "comm": p.get("comm"),
                                     "anon_mib": p.get("RssAnon", 0) / 1024,
                                     "file_mib": p.get("RssFile", 0) / 1024,
                                     "shmem_mib": p.get("RssShmem", 0) / 1024}
                                    for pid, p in s["procs"].items()]}
    if best:
        vmm = max(best["per_process"], key=lambda p: p["shmem_mib"])
        best["vm_process_own_mib"] = vmm["anon_mib"] + vmm["file_mib"]
    return best or {"t": None, "own_mib": None, "anon_mib": None, "file_mib": None,
                    "shmem_mib": None, "processes": None, "per_process": [],
                    "vm_process_own_mib": None}


# ---------------------------------------------------------------- running
def run(args) -> dict:
    secs = 2 if args.quick else 4
    elf = C.guest(args.guests, "memtouch")
    cl = f"mib={MIB} secs={secs} rate=100000"
    cmds = {"sealvm": (C.sealvm_cmd(elf, "--memory", "256M", cmdline=cl), False),
            "qemu-kvm memfd": (C.qemu_cmd(elf, "kvm", cl, extra=C.QEMU_MEMFD), True)}
    out = {}
    for label, (cmd, is_qemu) in cmds.items():
        def sample(pid, t):
            return {"t": t, "procs": C.tree_status(pid)}
        r = C.timed_run(cmd, timeout=secs + 120, sampler=sample, sample_every=0.2)
        C.check(r, 0, qemu=is_qemu)
        if "memtouch done" not in r.out:
            raise RuntimeError(f"{label}: memtouch did not finish: {r.out[-500:]!r}")
        out[label] = {"steady": steady_own_mib(r.samples), "wall_s": r.exit_s,
                      "maxrss_kib_wait4": r.maxrss_kib,
                      "samples": [{"t": s["t"], "procs": {str(k): v for k, v in s["procs"].items()}}
                                  for s in r.samples]}
    s, q = out["sealvm"]["steady"], out["qemu-kvm memfd"]["steady"]
    rows = [C.summary_row(NAME, f"monitor RSS (anon+file), guest touched {MIB} MiB",
                          s["own_mib"], q["own_mib"], "qemu-kvm memfd", f"<= {GOAL_MIB:.0f} MiB",
                          s["own_mib"] is not None and s["own_mib"] <= GOAL_MIB, "MiB")]
    if (s.get("processes") or 0) > 1:      # a monitor split into several processes
        rows.append(C.summary_row(
            NAME, "the process that holds guest RAM alone (anon+file)", s["vm_process_own_mib"],
            q["vm_process_own_mib"], "qemu-kvm memfd", f"<= {GOAL_MIB:.0f} MiB",
            s["vm_process_own_mib"] <= GOAL_MIB, "MiB"))
    result = {
        "description": "peak RssAnon+RssFile summed over the monitor's process tree while the "
                       f"guest holds >= {MIB} MiB of RssShmem",
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
    labels = list(result["runs"])
    anon = [result["runs"][k]["steady"]["anon_mib"] or 0 for k in labels]
    file = [result["runs"][k]["steady"]["file_mib"] or 0 for k in labels]
    ax.bar(labels, anon, label="RssAnon", color="#7aa6c2")
    ax.bar(labels, file, bottom=anon, label="RssFile", color="#c2a67a")
    for i, (a, f) in enumerate(zip(anon, file)):
        ax.annotate(f"{a + f:.1f} MiB", (i, a + f), ha="center", va="bottom", fontsize=8)
    ax.axhline(GOAL_MIB, color="#aa3333", linestyle="--", label=f"goal {GOAL_MIB:.0f} MiB")
    ax.set_ylabel("MiB (guest RAM, RssShmem, excluded)")
    ax.set_title(f"Monitor's own RSS beside a 256 MiB guest that touched {MIB} MiB", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(result: dict) -> None:
    for k, r in result["runs"].items():
        s = r["steady"]
        print(f"  {k:<15} own {C.fmt(s['own_mib'], 'MiB')} (anon {C.fmt(s['anon_mib'])}, file "
              f"{C.fmt(s['file_mib'])}), guest shmem {C.fmt(s['shmem_mib'], 'MiB')}, "
              f"{s['processes']} process(es)")
        for p in s.get("per_process") or []:
            print(f"      pid {p['pid']} {p['comm']}: anon {C.fmt(p['anon_mib'])} MiB, file "
                  f"{C.fmt(p['file_mib'])} MiB, shmem {C.fmt(p['shmem_mib'])} MiB")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

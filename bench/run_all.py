"""Runs every sealvm benchmark and writes bench/results/summary.json and summary.md.

    python3 -m bench.run_all [--quick] [--only startup,exits] [--guests DIR]
                             [--sealvm-root DIR] [--host-hugepages]

Each benchmark also runs alone: `python3 -m bench.<name> [--quick]`.  A
benchmark that fails is reported as failed in the summary; the others still
run.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

from . import common as C

MODULES = ["startup", "compute", "firsttouch", "idle", "exits", "memory", "split", "attest",
           "snapshot", "migration", "linux_boot", "linux_sealed", "disk", "net", "fleet",
           "fleet_scale", "validation"]


def markdown(rows: list[dict], failures: dict, host: dict, elapsed: float) -> str:
    lines = [
        "# sealvm benchmark summary",
        "",
        f"{host['date']}; kernel {host['kernel']}; {host['cpu_model']} ({host['cpus']} CPUs); "
        f"KVM module {host['kvm_module']}; {host['qemu_version']}; Python {host['python']}; "
        f"TSC {host['tsc_hz'] / 1e9:.3f} GHz; sealvm tree {host['sealvm_root']} "
        f"({host['sealvm_git']}); total {elapsed:.0f} s.",
        "",
        "Ratio = sealvm / peer for the metric shown, except where the metric says "
        "\"speed\" (then peer time / sealvm time, 1.0 = as fast as the peer).",
        "",
        "| benchmark | metric | sealvm | peer | ratio | goal | met? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(f"| {r['benchmark']} | {r['metric']} | {C.fmt(r['sealvm'], r['unit'])} | "
                     f"{r['peer_name']}: {C.fmt(r['peer'], r['unit'])} | {C.fmt(r['ratio'])} | "
                     f"{r['goal']} | {met} |")
    for name, err in failures.items():
        lines.append(f"| {name} | FAILED: {err.splitlines()[-1][:120] if err else '?'} | | | | | |")
    lines.append("")
    lines.append("Details, raw samples and exact commands: bench/results/<benchmark>.json; "
                 "plots: bench/results/<benchmark>.png.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few, short runs (smoke test)")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(MODULES))
    p.add_argument("--guests", type=Path, default=C.DEFAULT_GUESTS)
    p.add_argument("--out", type=Path, default=C.RESULTS_DIR)
    p.add_argument("--tag", default="")
    p.add_argument("--sealvm-root", type=Path, default=C.ROOT)
    p.add_argument("--host-hugepages", action="store_true",
                   help="(root) firsttouch: allow shmem THP and reserve huge pages for its run")
    args = C.apply_args(p.parse_args(argv))
    names = [n for n in args.only.split(",") if n] or MODULES
    unknown = set(names) - set(MODULES)
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    t0 = time.monotonic()
    rows, failures, timings = [], {}, {}
    for name in names:
        mod = importlib.import_module(f"bench.{name}")
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            result = mod.run(args)
            mod.report(result)
            rows.extend(result["summary"])
        except Exception:
            failures[name] = traceback.format_exc()
            print(failures[name], file=sys.stderr)
        timings[name] = time.monotonic() - t
        print(f"   ({timings[name]:.0f} s)", flush=True)
    elapsed = time.monotonic() - t0
    host = C.host_facts()
    summary = {"host": host, "quick": args.quick, "elapsed_s": elapsed, "seconds": timings,
               "rows": rows, "failures": failures}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"summary-{args.tag}" if args.tag else "summary"
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md = markdown(rows, failures, host, elapsed)
    (out / f"{stem}.md").write_text(md)
    print()
    print(md)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

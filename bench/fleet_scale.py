"""Fleet at scale: decision time against fleet size, table writes, controller failover.

Simulated hosts and VMs (sealvm fleet simulate: no KVM) drive the real controller on the
real store, SQLite and a three-member etcd cluster side by side in the same run:

  * decision time: one host reported compromised (a signed fail report from its
    measurer) until the controller has failed it and claimed a target for each of its
    VMs, median of 5 hosts, at 1,000 / 3,000 / 10,000 hosts (2 VMs each); goal <= 100 ms
    at 10,000 hosts with the table in etcd; ratio etcd / SQLite;
  * verdict writes per second: compare-and-swap updates of host documents, one client;
  * failover: two controllers on the etcd table (auth on); the leader is killed and the
    time until the standby leads is taken, 3 times; goal <= 2 x the lease (2 s).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from . import common as C

NAME = "fleet_scale"
GOAL_DECISION_MS = 100.0
LEASE = 2.0


def _leading(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/leader", timeout=1).json()["leading"]
    except (httpx.HTTPError, ValueError):
        return False


def _wait(pred, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def failover(rounds: int) -> list[float]:
    """Seconds from SIGKILL of the leading controller until the standby leads."""
    from sealvm.fleet.etcd import EtcdCluster
    from sealvm.fleet.simulate import build, seed, start_controller
    from sealvm.fleet.store import EtcdStore
    base = Path(tempfile.mkdtemp(prefix="sealvm-bench-failover-"))
    cluster = EtcdCluster(base / "etcd").start()
    procs: dict[str, subprocess.Popen] = {}
    try:
        cluster.secure({"controller": "pw"}, {})
        (base / "pw").write_text("pw\n")
        config, keys = build(12)
        config.update(lease=LEASE, snapshot_every=0)
        (base / "fleet.json").write_text(json.dumps(config))
        seed(EtcdStore(cluster.endpoints, "controller", "pw"), config, keys)
        urls = {}

        def start(name: str) -> None:
            procs[name], urls[name] = start_controller(
                name, base / "fleet.json", cluster.endpoints, base / "pw", base / name)
        start("a")
        if not _wait(lambda: _leading(urls["a"]), 30):
            raise RuntimeError("no controller took the lead")
        start("b")
        time.sleep(1.0)
        times = []
        for _ in range(rounds):
            leader = next(n for n in urls if _leading(urls[n]))
            standby = next(n for n in urls if n != leader)
            procs[leader].send_signal(signal.SIGKILL)
            t0 = time.monotonic()
            procs[leader].wait(10)
            if not _wait(lambda: _leading(urls[standby]), 10 * LEASE):
                raise RuntimeError("the standby never took over")
            times.append(time.monotonic() - t0)
            start(leader)                            # back as the new standby
            time.sleep(1.0)
        return times
    finally:
        for p in procs.values():
            p.kill()
            p.wait(10)
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def run(args) -> dict:
    from sealvm.fleet.simulate import run_one
    sizes = [200, 1000] if args.quick else [1000, 3000, 10000]
    runs = {"sqlite": {}, "etcd": {}}
    for n in sizes:
        for kind in ("sqlite", "etcd"):
            runs[kind][n] = run_one(kind, n, trials=3 if args.quick else 5,
                                    progress=lambda m: print("  " + m, flush=True))
    fo = failover(1 if args.quick else 3)
    big = sizes[-1]
    rows = []
    for n in sizes:
        e, s = runs["etcd"][n]["decision_ms_median"], runs["sqlite"][n]["decision_ms_median"]
        goal = n >= 10000
        rows.append(C.summary_row(NAME, f"decision time, {n} hosts (etcd vs SQLite)", e, s,
                                  "SQLite", f"<= {GOAL_DECISION_MS:.0f} ms at 10,000 (etcd)"
                                  if goal else "-", e <= GOAL_DECISION_MS if goal else None,
                                  "ms"))
    we, ws = runs["etcd"][big]["verdict_writes_per_s"], runs["sqlite"][big]["verdict_writes_per_s"]
    rows.append(C.summary_row(NAME, "verdict writes/s (CAS, one client)", we, ws, "SQLite", "-",
                              None, "/s"))
    med = C.median(fo)
    rows.append(C.summary_row(NAME, f"controller failover (lease {LEASE:.0f} s)", med,
                              2 * LEASE, "goal", f"<= {2 * LEASE:.0f} s (2 x lease)",
                              med <= 2 * LEASE, "s"))
    result = {"description": __doc__.splitlines()[0], "sizes": sizes, "runs": runs,
              "failover_s": fo, "lease_s": LEASE, "summary": rows}
    C.write_result(NAME, result, args.out, args.tag)
    plt = C.pyplot()
    if plt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        for kind, style in (("sqlite", "o--"), ("etcd", "s-")):
            ax[0].plot(sizes, [runs[kind][n]["decision_ms_median"] for n in sizes], style,
                       label=kind)
            for n in sizes:
                ax[0].scatter([n] * len(runs[kind][n]["decision_ms"]),
                              runs[kind][n]["decision_ms"], s=8, color="#444444")
        ax[0].axhline(GOAL_DECISION_MS, color="#aa3333", lw=0.8, label="goal (etcd, 10k)")
        ax[0].set_xscale("log")
        ax[0].set_xlabel("simulated hosts (2 VMs each)")
        ax[0].set_ylabel("ms from the fail report to all targets claimed")
        ax[0].set_title("decision time against fleet size", fontsize=10)
        ax[0].legend(fontsize=8)
        ax[1].bar(["SQLite", "etcd (3 members)"], [ws, we], color="#7aa6c2")
        ax[1].set_ylabel("verdict writes / s")
        ax[1].set_title(f"table writes; failover {med:.2f} s (lease {LEASE:.0f} s)", fontsize=10)
        fig.tight_layout()
        fig.savefig(C.plot_path(NAME, args.out, args.tag), dpi=110)
        plt.close(fig)
    return result


def report(result: dict) -> None:
    for kind, by_n in result["runs"].items():
        for n, r in by_n.items():
            print(f"  {kind:<6} {n:>6} hosts: decision {r['decision_ms_median']:.1f} ms, first "
                  f"scan {r['first_scan_s']:.1f} s, {r['verdict_writes_per_s']:.0f} writes/s")
    print(f"  failover: {', '.join(f'{t:.2f}' for t in result['failover_s'])} s")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

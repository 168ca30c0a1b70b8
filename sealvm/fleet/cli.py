"""`sealvm fleet ...`: runtime integrity of a fleet of hosts, and evacuation.

    sealvm fleet agent --name NAME --listen IP:PORT --controller URL --code-dir DIR
                       --uid-range LO-HI [--config FILE] [--state-dir DIR]
                       [--tpm HOST:PORT] [--period 1.0]
    sealvm fleet controller --config FLEET.json [--listen IP:PORT] [--state-dir DIR]
                            [--db FILE | --store etcd://HOST:PORT,...] [--store-user U]
    sealvm fleet simulate --hosts N [--store sqlite|etcd] ...     (docs/fleet.md)
    sealvm fleet status [--controller URL | --db FILE] [--json]
    sealvm fleet golden --code-dir DIR [--config FILE]

See docs/fleet.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parser(sub) -> None:
    f = sub.add_parser("fleet", help="runtime integrity measurement of hosts and evacuation",
                       description="Agents measure their hosts and their neighbours; the "
                                   "controller keeps the integrity validation table and moves "
                                   "VMs off hosts that fail or go missing. See docs/fleet.md.")
    fs = f.add_subparsers(dest="fleet_command", required=True)
    a = fs.add_parser("agent", help="measure this host, answer challenges, measure neighbours",
                      description="Every --period seconds: measure this host's sealvm tree, "
                                  "config and cores, extend the measurement into PCR 23 of the "
                                  "host's TPM and log it; challenge the neighbours the "
                                  "controller assigns and report pass/fail/missing to it.")
    a.add_argument("--name", required=True, help="this host's name, as enrolled")
    a.add_argument("--listen", default="127.0.0.1:8480", help="IP:PORT for challenges "
                                                              "(default %(default)s)")
    a.add_argument("--controller", required=True, help="the controller's URL")
    a.add_argument("--code-dir", default=str(Path(__file__).resolve().parents[2]),
                   help="the installed tree holding sealvm/ (default: this installation)")
    a.add_argument("--config", help="the host's configuration file to measure")
    a.add_argument("--uid-range", default="64000-64999",
                   help="uids of this host's cores (default %(default)s)")
    a.add_argument("--state-dir", default="/var/lib/sealvm-agent",
                   help="key, event log, swtpm state (default %(default)s)")
    a.add_argument("--tpm", help="HOST:PORT of the TPM (swtpm); default: start a swtpm in "
                                 "STATE_DIR/tpm")
    a.add_argument("--period", type=float, default=1.0, help="seconds (default %(default)s)")
    c = fs.add_parser("controller", help="keep the integrity validation table; evacuate",
                      description="Accept neighbours' signed reports, set verdicts, place VMs "
                                  "on trusted hosts and evacuate failed or missing ones.")
    c.add_argument("--config", required=True, help="fleet JSON: period, k, hosts (enrolment)")
    c.add_argument("--listen", default="127.0.0.1:8490", help="IP:PORT (default %(default)s)")
    c.add_argument("--state-dir", default="/var/lib/sealvm-fleet", help="(default %(default)s)")
    c.add_argument("--db", help="SQLite file (default STATE_DIR/fleet.db)")
    c.add_argument("--store", help="where the table lives instead of --db: etcd://HOST:PORT"
                                   "[,HOST:PORT...] (a cluster several controllers share; one "
                                   "leads) or sqlite:FILE")
    c.add_argument("--store-user", help="etcd user (a controller role)")
    c.add_argument("--store-password-file",
                   help="file with that user's password (or SEALVM_FLEET_STORE_PASSWORD)")
    c.add_argument("--id", help="this controller's name in the leadership (default: pid-based)")
    c.add_argument("--simulate", action="store_true",
                   help="move simulated VMs (sealvm fleet simulate), not real ones")
    m = fs.add_parser("simulate", help="measure the controller on thousands of simulated hosts",
                      description="Simulated hosts and VMs (no KVM) in a real store, driven "
                                  "by the real controller: seeds the table, reports hosts "
                                  "compromised and times the decision; prints JSON.")
    m.add_argument("--hosts", type=int, default=1000, help="simulated hosts (default "
                                                           "%(default)s; two VMs each)")
    m.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                   help="sqlite (a temporary file) or etcd (a 3-member cluster started here, "
                        "or --endpoints)")
    m.add_argument("--endpoints", help="HOST:PORT,... of an existing etcd cluster (no auth)")
    m.add_argument("--trials", type=int, default=5, help="compromised hosts to time")
    m.add_argument("--json", help="also write the result here")
    s = fs.add_parser("status", help="show the integrity validation table",
                      description="Print hosts (verdict, who measured, when, VMs) and the "
                                  "latest decisions, from the controller or its database.")
    s.add_argument("--controller", default="http://127.0.0.1:8490", help="controller URL")
    s.add_argument("--db", help="read the controller's SQLite file instead")
    s.add_argument("--json", action="store_true", help="print JSON")
    g = fs.add_parser("golden", help="print the golden values of an installed tree",
                      description="The values a clean host with this tree and config measures; "
                                  "put them in the fleet JSON when enrolling the host.")
    g.add_argument("--code-dir", default=str(Path(__file__).resolve().parents[2]))
    g.add_argument("--config")


def _table_from_db(path: str) -> dict:
    from .controller import table_of
    from .store import SqliteStore
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    store = SqliteStore(path)
    try:
        return table_of(store)
    finally:
        store.close()


def status(args) -> int:
    if args.db:
        try:
            table = _table_from_db(args.db)
        except Exception as e:                          # noqa: BLE001
            print(f"sealvm fleet status: cannot read {args.db}: {e}", file=sys.stderr)
            return 1
    else:
        import httpx
        try:
            table = httpx.get(f"{args.controller.rstrip('/')}/v1/table", timeout=5).json()
        except (httpx.HTTPError, ValueError) as e:
            print(f"sealvm fleet status: controller {args.controller} unreachable: {e}",
                  file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table
    colour = {"trusted": "green", "failed": "red", "missing": "yellow"}
    t = Table(title="integrity validation table")
    for col in ("host", "verdict", "reason", "measured by", "age", "VMs", "MiB"):
        t.add_column(col)
    now = time.time()
    for h in table["hosts"]:
        age = f"{now - h['measured_at']:.1f} s" if h["measured_at"] else "-"
        t.add_row(h["name"], f"[{colour.get(h['verdict'], 'white')}]{h['verdict']}",
                  (h["reason"] or "")[:70], h["measured_by"], age, ", ".join(h["vms"]),
                  f"{h['used_mib']}/{h['capacity_mib']}")
    d = Table(title="decisions (latest 10)")
    for col in ("vm", "from", "to", "how", "outcome", "s", "reason"):
        d.add_column(col)
    for r in table["decisions"][-10:]:
        d.add_row(r["vm"], r["source"], r["target"], r["how"], r["outcome"][:30],
                  f"{r['seconds']:.2f}", r["reason"][:80])
    con = Console()
    con.print(t)
    con.print(d)
    return 0


def run(args) -> int:
    if args.fleet_command == "agent":
        from .agent import run_agent
        return run_agent(args)
    if args.fleet_command == "controller":
        from .controller import run_controller
        return run_controller(args)
    if args.fleet_command == "status":
        return status(args)
    if args.fleet_command == "simulate":
        from .simulate import run_simulate
        return run_simulate(args)
    if args.fleet_command == "golden":
        from .measure import golden_values
        print(json.dumps(golden_values(Path(args.code_dir), Path(args.config) if args.config
                                       else None), indent=1))
        return 0
    return 2

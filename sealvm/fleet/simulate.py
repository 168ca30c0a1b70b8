"""`sealvm fleet simulate`: thousands of simulated hosts and VMs (no KVM) driving the real
controller and the real store, to measure how fast the controller decides and how much
the table takes.

The simulated hosts are enrolment records with their own agent keys; each starts with a
signed pass report from its first measurer (the window is long, so they stay trusted
without a stream of reports).  Where each VM "runs" is a document sim/VM in the same
store, which SimMover changes after `move_seconds`, as a migration would.  Then one host
is reported compromised, signed by its measurer's key, and the time is taken until the
controller has failed it and chosen a target for each of its VMs.

    sealvm fleet simulate --hosts 10000 --store etcd      # a 3-member etcd, started here
    sealvm fleet simulate --hosts 1000 --store sqlite --json out.json
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from .store import Conflict


class SimMover:
    """Moves of simulated VMs: sim/VM says which host runs it, and how often it moved."""

    def __init__(self, store, move_seconds: float = 0.5):
        self.store, self.move_seconds = store, move_seconds

    def place(self, h: dict, spec: dict) -> tuple[bool, str]:
        self.store.put(f"sim/{spec['name']}", {"host": h["name"]})
        return True, "simulated"

    def _move(self, vm: dict, s: dict, t: dict) -> tuple[bool, str]:
        time.sleep(self.move_seconds)
        doc, rev = self.store.get(f"sim/{vm['id']}")
        if doc is None or doc["host"] != s["name"]:
            return False, f"the VM is not on {s['name']} (it is on {doc and doc['host']})"
        try:
            self.store.put(f"sim/{vm['id']}", {"host": t["name"],
                                               "moves": doc.get("moves", 0) + 1}, expect=rev)
        except Conflict:
            return False, "the VM moved meanwhile"
        return True, "simulated move"

    live = restore = _move

    def snapshot(self, vm: dict, h: dict, path: str) -> tuple[bool, str]:
        return True, "simulated"

    def running_on(self, vm: str, h: dict) -> bool:
        doc, _ = self.store.get(f"sim/{vm}")
        return doc is not None and doc["host"] == h["name"]


def start_controller(name: str, config: Path, endpoints: list[str], password_file: Path,
                     state: Path, log=None, user: str = "controller"):
    """A `sealvm fleet controller --simulate` process on the etcd table; (process, URL)."""
    import socket
    import subprocess
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "sealvm.cli", "fleet", "controller", "--config", str(config),
         "--listen", f"127.0.0.1:{port}", "--state-dir", str(state), "--store",
         "etcd://" + ",".join(endpoints), "--store-user", user, "--store-password-file",
         str(password_file), "--id", name, "--simulate"],
        cwd=Path(__file__).resolve().parents[2], stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def build(n_hosts: int, vms_per_host: int = 2, k: int = 2, capacity: int = 4096,
          vm_mib: int = 256) -> tuple[dict, dict]:
    """(fleet config, agent keys by host)."""
    from .evidence import load_or_create_key, pub_hex
    keys, hosts = {}, []
    tmp = Path(tempfile.mkdtemp(prefix="sealvm-sim-keys-"))
    try:
        for i in range(n_hosts):
            name = f"h{i:05d}"
            keys[name] = load_or_create_key(tmp / name)
            hosts.append({"name": name, "agent": f"http://sim/{name}", "daemon": "sim",
                          "address": "sim", "capacity_mib": capacity, "uid_range": [1, 2],
                          "agent_pub": pub_hex(keys[name]), "tpm_ak_pub": "00",
                          "golden": {}})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config = {"period": 1.0, "window": 3600, "k": k, "parallel": max(8, vms_per_host),
              "lease": 2.0, "snapshot_every": 0, "hosts": hosts,
              "vms_per_host": vms_per_host, "vm_mib": vm_mib}
    return config, keys


def seed(store, config: dict, keys: dict) -> None:
    """Every host trusted with one signed pass report, and its VMs placed on it."""
    from .evidence import sign
    now = time.time()
    names = [h["name"] for h in config["hosts"]]
    n, k = len(names), config["k"]
    items = []
    for i, h in enumerate(config["hosts"]):
        name = h["name"]
        items.append((f"hosts/{name}", {
            "name": name, "agent": h["agent"], "daemon": h["daemon"], "address": h["address"],
            "capacity_mib": h["capacity_mib"], "uid_lo": 1, "uid_hi": 2,
            "agent_pub": h["agent_pub"], "tpm_ak_pub": "00", "golden": {}, "verdict": "trusted",
            "reason": "seeded", "measured_by": names[(i - 1) % n], "measured_at": now,
            "verdict_at": now, "enrolled_at": now}))
        for j in range(1, min(k, n - 1) + 1):          # every measurer has said pass once
            measurer = names[(i - j) % n]
            body = {"reporter": measurer, "subject": name, "verdict": "pass",
                    "reason": "seeded", "time": now, "counter": 1}
            items.append((f"evidence/{measurer}/{name}", {
                "signed": sign(keys[measurer], body), "time": now, "verdict": "pass",
                "reason": "seeded"}))
        for j in range(config["vms_per_host"]):
            vid = f"v{i:05d}-{j}"
            items.append((f"vms/{vid}", {
                "id": vid, "host": name, "image": "sim", "manifest": "sim", "broker": "sim",
                "memory_mib": config["vm_mib"], "cmdline": "", "priority": 0,
                "state": "running", "placed_at": now, "snapshot": "", "snapshot_at": 0,
                "restored": 0, "claim": None}))
            items.append((f"sim/{vid}", {"host": name}))
    store.put_many(items)


def fail_report(config: dict, keys: dict, subject: str, counter: int = 2) -> dict:
    from .evidence import sign
    names = [h["name"] for h in config["hosts"]]
    measurer = names[(names.index(subject) - 1) % len(names)]
    return sign(keys[measurer], {"reporter": measurer, "subject": subject, "verdict": "fail",
                                 "reason": "simulated: code differs", "time": time.time(),
                                 "counter": counter})


def decision_time(c, config: dict, keys: dict, subject: str, counter: int,
                  timeout: float = 30) -> dict:
    """Report `subject` failed to controller `c` (the leader); seconds until its verdict is
    failed and until every one of its VMs has a claimed target."""
    vms = [v for v, _ in c.vms.values() if v["host"] == subject]
    t0 = time.perf_counter()
    ok, why = c.receive_report(fail_report(config, keys, subject, counter))
    if not ok:
        raise RuntimeError(f"the fail report was refused: {why}")
    verdict_at = decided_at = None
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        h = c.host(subject)
        if verdict_at is None and h and h["verdict"] == "failed":
            verdict_at = time.perf_counter()
        claimed = [c.vms[v["id"]][0].get("claim") or c.vms[v["id"]][0]["host"] != subject
                   for v in vms]
        if verdict_at and all(claimed):
            decided_at = time.perf_counter()
            break
        time.sleep(0.0005)
    if decided_at is None:
        raise RuntimeError(f"no decision for {subject} within {timeout} s")
    return {"verdict_s": verdict_at - t0, "decided_s": decided_at - t0, "vms": len(vms)}


def write_rate(store, seconds: float = 2.0) -> float:
    """Verdict writes per second: compare-and-swap updates of host documents."""
    keys = [k for k, _, _ in store.range("hosts/")][:200]
    docs = {k: store.get(k) for k in keys}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        k = keys[n % len(keys)]
        doc, rev = docs[k]
        doc = {**doc, "measured_at": time.time()}
        docs[k] = (doc, store.put(k, doc, expect=rev))
        n += 1
    return n / (time.perf_counter() - t0)


def run_one(kind: str, n_hosts: int, trials: int = 5, endpoints: list[str] | None = None,
            base: Path | None = None, progress=print) -> dict:
    """Build, seed and measure one fleet of `n_hosts` on a fresh store of `kind`."""
    from .controller import Controller
    from .store import EtcdStore, SqliteStore
    base = base or Path(tempfile.mkdtemp(prefix="sealvm-sim-"))
    cluster = None
    if kind == "etcd" and endpoints is None:
        from .etcd import EtcdCluster
        cluster = EtcdCluster(base / "etcd").start()
        endpoints = cluster.endpoints
    try:
        store = EtcdStore(endpoints) if kind == "etcd" else SqliteStore(base / "fleet.db")
        t = time.perf_counter()
        config, keys = build(n_hosts)
        seed(store, config, keys)
        seeded = time.perf_counter() - t
        progress(f"{kind} {n_hosts} hosts: seeded {n_hosts * (2 + 2 * config['vms_per_host'])} "
                 f"documents in {seeded:.1f} s")
        c = Controller({**config, "full_scan_every": 3600}, store,
                       SimMover(store, move_seconds=0.2), me="sim-controller")
        t = time.perf_counter()
        c.step()                                 # takes the lead, reads the whole table
        first = time.perf_counter() - t
        c.run_loops()
        results = []
        for i in range(trials):
            subject = config["hosts"][(i * 7919 + 1) % n_hosts]["name"]
            results.append(decision_time(c, config, keys, subject, counter=10 + i))
        c.stop.set()
        rate = write_rate(store)
        out = {"store": kind, "hosts": n_hosts, "vms": n_hosts * config["vms_per_host"],
               "seed_s": seeded, "first_scan_s": first,
               "verdict_ms": [r["verdict_s"] * 1e3 for r in results],
               "decision_ms": [r["decided_s"] * 1e3 for r in results],
               "decision_ms_median": statistics.median(r["decided_s"] * 1e3 for r in results),
               "verdict_writes_per_s": rate}
        progress(f"{kind} {n_hosts} hosts: decision {out['decision_ms_median']:.1f} ms (median "
                 f"of {trials}), first full scan {first:.1f} s, {rate:.0f} verdict writes/s")
        store.close()
        return out
    finally:
        if cluster:
            cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def run_simulate(args) -> int:
    import logging
    logging.basicConfig(level=logging.ERROR)
    if args.hosts < 3:
        print("sealvm fleet simulate: --hosts must be at least 3", file=sys.stderr)
        return 2
    try:
        out = run_one(args.store, args.hosts, args.trials,
                      args.endpoints.split(",") if args.endpoints else None,
                      progress=lambda m: print(m, file=sys.stderr, flush=True))
    except (RuntimeError, OSError) as e:
        print(f"sealvm fleet simulate: {e}", file=sys.stderr)
        return 1
    text = json.dumps(out, indent=1)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0

"""Two controllers on one etcd table, a simulated fleet (no KVM): the leader is killed in
the middle of an evacuation, with one etcd member of three down as well.  The standby
takes over, settles the VMs its predecessor was moving, and finishes; every VM ends up on
exactly one host, the one the table names, and none is moved twice."""
from __future__ import annotations

import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import poll

SUSPECT = "h00003"
LEASE = 2.0


@pytest.fixture
def fleet():
    if not shutil.which("etcd"):
        pytest.skip("etcd-server not installed")
    from sealvm.fleet.etcd import EtcdCluster
    from sealvm.fleet.simulate import build, seed, start_controller
    from sealvm.fleet.store import EtcdStore
    base = Path(tempfile.mkdtemp(prefix="sealvm-failover-"))
    cluster = EtcdCluster(base / "etcd").start()
    cluster.secure({"controller": "ctl-pw"}, {})
    (base / "pw").write_text("ctl-pw\n")
    config, keys = build(12, vms_per_host=4)
    config.update(lease=LEASE, move_seconds=1.0, parallel=2, snapshot_every=0)
    (base / "fleet.json").write_text(json.dumps(config))
    store = EtcdStore(cluster.endpoints, "controller", "ctl-pw")
    seed(store, config, keys)
    procs = {}

    def start(name: str) -> str:
        procs[name], url = start_controller(name, base / "fleet.json", cluster.endpoints,
                                            base / "pw", base / name,
                                            log=open(base / f"{name}.log", "ab"))
        assert poll(lambda: _up(url), 30), (base / f"{name}.log").read_text()
        return url
    yield dict(base=base, cluster=cluster, store=store, config=config, keys=keys,
               start=start, procs=procs)
    for p in procs.values():
        p.kill()
        p.wait(10)
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def leading(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/leader", timeout=2).json()["leading"]
    except (httpx.HTTPError, ValueError):
        return False


@pytest.mark.functional("controller failover in the middle of an evacuation")
def test_standby_finishes_the_evacuation_when_the_leader_dies(fleet):
    from sealvm.fleet.simulate import fail_report
    store, f = fleet["store"], fleet
    urls = {"ctl-a": f["start"]("ctl-a")}
    assert poll(lambda: leading(urls["ctl-a"]), 15), "the first controller never led"
    urls["ctl-b"] = f["start"]("ctl-b")
    time.sleep(1)
    assert not leading(urls["ctl-b"])                 # one leader at a time
    before = {k.split("/")[1]: d for k, d, _ in store.range("vms/")}
    moving = sorted(v for v, d in before.items() if d["host"] == SUSPECT)
    assert len(moving) == 4

    f["cluster"].kill(0)                              # one etcd member of three down
    r = httpx.post(f"{urls['ctl-a']}/v1/reports",
                   json=fail_report(f["config"], f["keys"], SUSPECT, counter=5), timeout=10)
    assert r.status_code == 200, r.text

    def claimed():
        return [k for k, d, _ in store.range("vms/") if (d.get("claim") or {}).get("by") == "ctl-a"]
    assert poll(claimed, 10), "the leader claimed nothing"
    f["procs"]["ctl-a"].send_signal(signal.SIGKILL)   # in the middle of the moves
    killed = time.monotonic()
    f["procs"]["ctl-a"].wait(10)
    assert poll(lambda: leading(urls["ctl-b"]), 5 * LEASE), "the standby never took over"
    took_over = time.monotonic() - killed

    def done():
        docs = {k.split("/")[1]: d for k, d, _ in store.range("vms/")}
        return all(docs[v]["host"] != SUSPECT and not docs[v].get("claim") for v in moving)
    assert poll(done, 30), json.dumps({k: d for k, d, _ in store.range("vms/")
                                       if k.split("/")[1] in moving}, indent=1)
    after = {k.split("/")[1]: d for k, d, _ in store.range("vms/")}
    sim = {k.split("/")[1]: d["host"] for k, d, _ in store.range("sim/")}
    assert set(after) == set(before)                  # nothing lost, nothing added
    for v, d in after.items():                        # each runs where the table says
        assert sim[v] == d["host"], (v, sim[v], d)
        assert d["state"] == "running" and not d.get("claim"), d
    moves = {k.split("/")[1]: d.get("moves", 0) for k, d, _ in store.range("sim/")}
    assert all(moves[v] == 1 for v in moving), moves      # each moved once, not twice
    assert all(n == 0 for v, n in moves.items() if v not in moving)
    decisions = [d for _, d, _ in store.range("decisions/")]
    assert any(d["how"] == "lead" and d["by"] == "ctl-b" for d in decisions)
    print(f"standby took over {took_over:.2f} s after the leader died (lease {LEASE} s)")

"""One test-suite for both homes of the integrity validation table: SQLite and a real
three-member etcd cluster (started here from Debian's etcd-server).  Then what only etcd
has: authorization by role (a host cannot set its own verdict or touch another host's
entries) and losing one member of three."""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sealvm.fleet.store import Conflict, EtcdStore, SqliteStore, StoreError

# The store suite checks behaviour; the authorization test below is an attack.
pytestmark = pytest.mark.functional("the integrity validation table's store")


@pytest.fixture(scope="module")
def cluster():
    if not shutil.which("etcd"):
        pytest.skip("etcd-server not installed")
    from sealvm.fleet.etcd import EtcdCluster
    base = Path(tempfile.mkdtemp(prefix="sealvm-etcd-"))
    c = EtcdCluster(base).start()
    c.secure({"controller": "ctl-pw"}, {"h1": "h1-pw", "h2": "h2-pw"})
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


def _ns() -> str:
    return f"t{time.monotonic_ns()}/"


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    """(make_store, key prefix): make_store() opens another client of the same table."""
    if request.param == "sqlite":
        path = tmp_path / "ivt.db"
        stores = []

        def make():
            stores.append(SqliteStore(path))
            return stores[-1]
        yield make, _ns()
        for s in stores:
            s.close()
    else:
        c = request.getfixturevalue("cluster")
        yield (lambda: EtcdStore(c.endpoints, "controller", "ctl-pw")), _ns()


def test_put_get_range_and_revisions(backend):
    make, p = backend
    s = make()
    assert s.get(p + "none") == (None, 0)
    r1 = s.put(p + "hosts/a", {"verdict": "trusted"})
    r2 = s.put(p + "hosts/b", {"verdict": "failed", "reason": "code differs"})
    assert r2 > r1 > 0
    assert s.get(p + "hosts/a") == ({"verdict": "trusted"}, r1)
    got = s.range(p + "hosts/")
    assert [(k, d) for k, d, _ in got] == [(p + "hosts/a", {"verdict": "trusted"}),
                                           (p + "hosts/b", {"verdict": "failed",
                                                            "reason": "code differs"})]
    assert s.range(p + "hosts/a") == [(p + "hosts/a", {"verdict": "trusted"}, r1)]
    s.delete(p + "hosts/a")
    assert s.get(p + "hosts/a") == (None, 0)
    assert [k for k, _, _ in s.range(p)] == [p + "hosts/b"]


def test_compare_and_swap(backend):
    make, p = backend
    s = make()
    rev = s.put(p + "vms/v1", {"host": "h1"}, expect=0)          # create only
    with pytest.raises(Conflict):
        s.put(p + "vms/v1", {"host": "h9"}, expect=0)
    rev2 = s.put(p + "vms/v1", {"host": "h2"}, expect=rev)
    with pytest.raises(Conflict):                                  # a stale revision
        s.put(p + "vms/v1", {"host": "h3"}, expect=rev)
    with pytest.raises(Conflict):
        s.delete(p + "vms/v1", expect=rev)
    assert s.get(p + "vms/v1") == ({"host": "h2"}, rev2)
    s.delete(p + "vms/v1", expect=rev2)
    assert s.get(p + "vms/v1")[1] == 0


def test_two_controllers_never_both_win_the_same_claim(backend):
    make, p = backend
    a, b = make(), make()
    _, rev = a.get(p + "vms/v")
    a.put(p + "vms/v", {"host": "h1", "state": "running"})
    doc, rev = a.get(p + "vms/v")
    wins = []
    for who in (a, b):
        try:
            who.put(p + "vms/v", {**doc, "state": "moving", "by": id(who)}, expect=rev)
            wins.append(who)
        except Conflict:
            pass
    assert len(wins) == 1


def test_concurrent_increments_lose_nothing(backend):
    make, p = backend
    key = p + "counter"
    make().put(key, {"n": 0})

    def worker():
        s = make()
        for _ in range(15):
            while True:
                doc, rev = s.get(key)
                try:
                    s.put(key, {"n": doc["n"] + 1}, expect=rev)
                    break
                except Conflict:
                    continue
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert make().get(key)[0] == {"n": 60}


def test_leadership_is_single_and_passes_on_when_the_holder_stops(backend):
    make, p = backend
    a, b = make(), make()
    name = p.strip("/")
    assert a.lead(name, "ctl-a", ttl=1)
    assert not b.lead(name, "ctl-b", ttl=1)
    assert a.lead(name, "ctl-a", ttl=1)                  # renewing keeps it
    assert a.leader(name) == b.leader(name) == "ctl-a"
    deadline = time.monotonic() + 10                     # a stops renewing: b takes over
    while not b.lead(name, "ctl-b", ttl=1):
        assert time.monotonic() < deadline, "the leadership never lapsed"
        time.sleep(0.2)
    assert b.leader(name) == "ctl-b"
    assert not a.lead(name, "ctl-a", ttl=1)


# ---- etcd only --------------------------------------------------------------------------
@pytest.mark.attack(adversary="fleet host", asset="fleet",
                    technique="write its own verdict or another host's evidence into the "
                              "shared table with its agent's credentials",
                    defence="etcd roles: an agent may write only evidence/NAME/",
                    outcome="etcd refuses (permission denied); the verdict is unchanged",
                    control="test_control_with_the_controller_role_the_same_writes_succeed")
def test_a_host_cannot_set_its_own_verdict_or_touch_another_host(cluster):
    ctl = EtcdStore(cluster.endpoints, "controller", "ctl-pw")
    ctl.put("hosts/h1", {"verdict": "failed", "reason": "code differs"})
    ctl.put("evidence/h2/h1", {"verdict": "fail"})
    agent = EtcdStore(cluster.endpoints, "agent-h1", "h1-pw")
    agent.put("evidence/h1/h2", {"verdict": "pass"})          # its own evidence: allowed
    for key in ("hosts/h1", "evidence/h2/h1", "evidence/h2/h3", "vms/v1", "leader/controller"):
        with pytest.raises(StoreError, match="permission denied"):
            agent.put(key, {"verdict": "trusted"})
    with pytest.raises(StoreError, match="permission denied"):
        agent.delete("evidence/h2/h1")
    with pytest.raises(StoreError, match="permission denied"):
        agent.get("hosts/h1")
    assert ctl.get("hosts/h1")[0]["verdict"] == "failed"
    assert ctl.get("evidence/h2/h1")[0] == {"verdict": "fail"}
    with pytest.raises(StoreError):                           # and no user at all: nothing
        EtcdStore(cluster.endpoints).put("hosts/h1", {"verdict": "trusted"})
    with pytest.raises(StoreError, match="refused user"):
        EtcdStore(cluster.endpoints, "agent-h1", "wrong")


def test_control_with_the_controller_role_the_same_writes_succeed(cluster):
    ctl = EtcdStore(cluster.endpoints, "controller", "ctl-pw")
    ctl.put("hosts/h1", {"verdict": "trusted"})
    ctl.put("evidence/h2/h1", {"verdict": "pass"})
    assert ctl.get("hosts/h1")[0]["verdict"] == "trusted"


@pytest.mark.functional("the table survives losing one etcd member of three")
def test_the_table_keeps_working_with_one_member_of_three_down(cluster):
    s = EtcdStore(cluster.endpoints, "controller", "ctl-pw")
    s.put("loss/before", {"n": 1})
    cluster.kill(0)                       # the member the client talks to first
    try:
        rev = s.put("loss/during", {"n": 2})
        assert s.get("loss/before")[0] == {"n": 1}
        s.put("loss/during", {"n": 3}, expect=rev)
        with pytest.raises(Conflict):
            s.put("loss/during", {"n": 4}, expect=rev)
        assert s.lead("loss", "ctl-a", ttl=2)
        fresh = EtcdStore(cluster.endpoints, "controller", "ctl-pw")   # a new client too
        assert fresh.get("loss/during")[0] == {"n": 3}
    finally:
        cluster.restart(0)
        cluster.wait_healthy()
    assert EtcdStore(cluster.endpoints[:1], "controller", "ctl-pw").get("loss/during")[0] == \
        {"n": 3}                          # the member that was down caught up

"""The fleet's evidence and the controller's rules, without VMs or namespaces: a real
agent on a swtpm, its evidence appraised and altered; a controller's table fed
signed, forged, replayed and misassigned reports."""
from __future__ import annotations

import copy
import secrets
import shutil
import time
from pathlib import Path

import pytest

from sealvm.fleet.controller import Controller
from sealvm.fleet.store import SqliteStore
from sealvm.fleet.evidence import appraise, load_or_create_key, pub_hex, sign
from sealvm.fleet.measure import golden_values
from sealvm.tools import swtpm
from tests.conftest import ROOT

UIDS = (64900, 64949)


@pytest.fixture
def agent(tmp_path):
    if shutil.which("swtpm") is None:
        pytest.skip("swtpm is not installed")
    pytest.importorskip("tpm2_pytss")
    from sealvm.fleet.agent import Agent
    port = swtpm.start_on_free_port(tmp_path / "tpm")
    code = tmp_path / "code"
    shutil.copytree(ROOT / "sealvm", code / "sealvm",
                    ignore=shutil.ignore_patterns("__pycache__"))
    conf = tmp_path / "host.conf"
    conf.write_text("x=1\n")
    a = Agent("h1", tmp_path / "agent", code, conf, UIDS, ("127.0.0.1", port),
              "http://127.0.0.1:9", period=1.0)
    golden = {"name": "h1", "agent": "", "agent_pub": a.agent_pub, "tpm_ak_pub": a.ak_pub.hex(),
              "uid_range": list(UIDS), "values": golden_values(code, conf)}
    yield a, golden, code, conf
    a.tpm.close()
    swtpm.stop(tmp_path / "tpm")


def test_clean_evidence_passes_and_every_lie_fails(agent):
    a, golden, code, conf = agent
    a.measure_once()
    a.measure_once()
    nonce = secrets.token_bytes(32)
    ev = a.evidence(nonce)
    assert appraise(ev, nonce, golden, 3.0).verdict == "pass"
    # another challenge's nonce
    assert "nonce" in appraise(ev, secrets.token_bytes(32), golden, 3.0).reason
    # an entry dropped from the log (and the body re-signed with the agent's own key)
    body = copy.deepcopy(ev["body"])
    body["log"] = body["log"][1:]
    assert "quote" in appraise(sign(a.key, body), nonce, golden, 3.0).reason
    # a body changed without the agent's key
    forged = copy.deepcopy(ev)
    forged["body"]["log"][0]["code"] = "0" * 64
    assert "signature" in appraise(forged, nonce, golden, 3.0).reason
    # a TPM that is not the enrolled one
    other = dict(golden, tpm_ak_pub="30" + "00" * 90)
    assert appraise(ev, nonce, other, 3.0).verdict == "fail"


def test_a_change_stays_in_the_log_after_it_is_undone(agent):
    a, golden, code, conf = agent
    a.measure_once()
    conf.write_text("x=2\n")
    a.measure_once()
    conf.write_text("x=1\n")
    a.measure_once()
    nonce = secrets.token_bytes(32)
    r = appraise(a.evidence(nonce), nonce, golden, 3.0)
    assert r.verdict == "fail" and "measurement 1: config differs" in r.reason


def test_a_stopped_agent_is_stale(agent):
    a, golden, code, conf = agent
    a.measure_once()
    time.sleep(1.2)
    nonce = secrets.token_bytes(32)
    r = appraise(a.evidence(nonce), nonce, golden, 1.0)
    assert r.verdict == "fail" and "stale" in r.reason


# ---- the controller's table ------------------------------------------------------------
@pytest.fixture
def ctl(tmp_path):
    keys = {n: load_or_create_key(tmp_path / f"{n}.key") for n in "abc"}
    hosts = [{"name": n, "agent": f"http://x/{n}", "daemon": str(tmp_path / "none.sock"),
              "address": "127.0.0.1", "capacity_mib": 1024, "uid_range": [1, 2],
              "agent_pub": pub_hex(keys[n]), "tpm_ak_pub": "00", "golden": {}} for n in "abc"]
    c = Controller({"period": 1.0, "k": 1, "hosts": hosts}, SqliteStore(tmp_path / "fleet.db"))
    return c, keys


def report(key, reporter, subject, verdict, counter, when=None):
    return sign(key, {"reporter": reporter, "subject": subject, "verdict": verdict,
                      "reason": "r", "time": when or time.time(), "counter": counter})


def test_controller_accepts_only_signed_assigned_fresh_new_reports(ctl):
    c, keys = ctl
    assert c.subjects_of("a") == ["b"] and c.measurers_of("a") == ["c"]
    assert c.receive_report(report(keys["a"], "a", "b", "pass", 1)) == (True, "")
    ok, why = c.receive_report(report(keys["a"], "a", "b", "pass", 1))
    assert not ok and "counter" in why
    ok, why = c.receive_report(report(keys["b"], "a", "b", "fail", 2))
    assert not ok and "signature" in why
    ok, why = c.receive_report(report(keys["a"], "a", "c", "fail", 3))
    assert not ok and "not assigned" in why
    ok, why = c.receive_report(report(keys["a"], "a", "b", "fail", 4, time.time() - 60))
    assert not ok and "fresh" in why


def test_controller_verdicts(ctl):
    c, keys = ctl
    for n, (rep, subj) in enumerate((("a", "b"), ("b", "c"), ("c", "a")), 1):
        assert c.receive_report(report(keys[rep], rep, subj, "pass", n))[0]
    c.evaluate()
    assert {h["name"]: h["verdict"] for h in c.table()["hosts"]} == {
        "a": "trusted", "b": "trusted", "c": "trusted"}
    assert c.receive_report(report(keys["a"], "a", "b", "fail", 10))[0]
    c.evaluate()
    assert c.host("b")["verdict"] == "failed" and c.host("b")["measured_by"] == "a"
    # a failed host's reports are not believed
    ok, why = c.receive_report(report(keys["b"], "b", "c", "pass", 11))
    assert not ok and "failed" in why
    # nothing is placed on it
    assert c.choose(64, None)[0] in ("a", "c")
    # it stays failed though later reports pass
    assert c.receive_report(report(keys["a"], "a", "b", "pass", 12))[0]
    c.evaluate()
    assert c.host("b")["verdict"] == "failed"

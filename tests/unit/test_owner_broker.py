"""The key broker's own rules, below HTTP: switches, nonces, TPM dispatch, versions, faults.

The attack suite (tests/security/test_broker_attacks.py) drives the broker over HTTP;
these tests call `Broker` directly, plus the HTTP layer's body limits in-process.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sealvm.owner import broker as B
from sealvm.owner import client, keys, manifest, policy
from sealvm.owner.appraise import Refusal
from sealvm.wire import attest as A
from tests.security.test_broker_attacks import CMDLINE, HOST, IMAGE, VM, Core, build_log
from tests.security.test_broker_attacks import Broker as Served


@pytest.fixture
def owner(tmp_path):
    d = tmp_path / "owner"
    keys.init(d)
    (tmp_path / "g.elf").write_bytes(IMAGE)
    manifest.sign_guest(d, tmp_path / "g.elf", VM, cmdline=CMDLINE)
    policy.edit(d, "add", "core", A.core_measurement(build_log(HOST, bytes(32))).hex())
    policy.edit(d, "add", "host", HOST.public_key().public_bytes_raw().hex())
    return d


def core_for(owner, **kw) -> Core:
    return Core(keys.load_public(owner)["wrap"], **kw)


def request(core: Core, nonce: str, eph=None) -> dict:
    data, sig = core.evidence(bytes.fromhex(nonce), eph)
    return {"evidence": data.decode(), "signature": sig.hex()}


def refusal(fn, *args) -> str:
    with pytest.raises(Refusal) as e:
        fn(*args)
    return e.value.reason


def log_lines(owner) -> list[dict]:
    return [json.loads(x) for x in (owner / "broker.log").read_text().splitlines()]


# ---- test switches -----------------------------------------------------------------------

def test_switches_are_ignored_outside_test_mode(capsys):
    assert B.test_switches({"SEALVM_BROKER_TEST_DISABLE": "ak_sig"}) == frozenset()
    assert "IGNORING" in capsys.readouterr().err
    on = {"SEALVM_TEST_MODE": "1", "SEALVM_BROKER_TEST_DISABLE": "ak_sig, manifest"}
    assert B.test_switches(on) == {"ak_sig", "manifest"}
    assert "DISABLED: ak_sig, manifest" in capsys.readouterr().err
    assert B.test_switches({}) == frozenset()


def test_an_unknown_switch_stops_the_broker(owner):
    with pytest.raises(ValueError, match="unknown defences \\['ak_sgi'\\]"):
        B.Broker(owner, environ={"SEALVM_TEST_MODE": "1", "SEALVM_BROKER_TEST_DISABLE": "ak_sgi"})


def test_a_tampered_policy_stops_the_broker(owner):
    p = owner / "policy.json"
    p.write_bytes(p.read_bytes().replace(b'"require_tpm":false', b'"require_tpm":true '))
    with pytest.raises(keys.OwnerError, match="does not match its signature"):
        B.Broker(owner, environ={})


# ---- requests and nonces -----------------------------------------------------------------

def test_challenge_rules_and_their_log_lines(owner):
    b = B.Broker(owner, environ={})
    assert refusal(b.challenge, {"vm": "nobody"}, "t").startswith("unknown VM 'nobody'")
    assert refusal(b.challenge, {"vm": "../x"}, "t").startswith("malformed request")
    assert refusal(b.challenge, {"vm": VM, "x": 1}, "t").startswith("malformed request")
    nonce = b.challenge({"vm": VM}, "t")["nonce"]
    assert len(bytes.fromhex(nonce)) == 32
    events = [(r["event"], r.get("reason", "")[:10]) for r in log_lines(owner)]
    assert events == [("refused", "unknown VM"), ("refused", "malformed "),
                      ("refused", "malformed "), ("challenge", "")]


def test_malformed_attest_requests(owner):
    b = B.Broker(owner, environ={})
    good = request(core_for(owner), b.challenge({"vm": VM}, "t")["nonce"])
    assert refusal(b.attest, {"evidence": good["evidence"]}, "t").startswith("malformed request")
    assert "signature" in refusal(b.attest, {**good, "signature": "00" * 63}, "t")
    assert refusal(b.attest, {**good, "evidence": "{}"}, "t").startswith("malformed evidence")
    assert refusal(b.attest, {**good, "evidence": "x" * (A.MAX_EVIDENCE + 1)}, "t") \
        .startswith("malformed evidence: over")
    assert b.attest(good, "t")["wrapped"], "a malformed request does not spend the nonce"


def test_a_nonce_is_for_one_vm(owner, tmp_path):
    manifest.sign_guest(owner, tmp_path / "g.elf", "other", cmdline=CMDLINE)
    b = B.Broker(owner, environ={})
    nonce = b.challenge({"vm": "other"}, "t")["nonce"]
    assert refusal(b.attest, request(core_for(owner), nonce), "t") == \
        "nonce was issued for VM 'other', not 'web1'"
    assert log_lines(owner)[-1]["nonce_consumed"] is True


def test_restore_keeps_young_challenges_and_drops_old_or_spent_ones(owner):
    b = B.Broker(owner, environ={})
    young, spent = b.challenge({"vm": VM}, "t")["nonce"], b.challenge({"vm": VM}, "t")["nonce"]
    b.attest(request(core_for(owner), spent), "t")
    with open(owner / "broker.log", "a") as f:
        f.write(json.dumps({"event": "challenge", "vm": VM, "nonce": "aa" * 32,
                            "time": b.clock() - 61}) + "\n")
        f.write('{"event": "chall')                      # a torn line after a crash
    again = B.Broker(owner, environ={})
    assert set(again.nonces.issued) == {young}
    assert refusal(again.attest, request(core_for(owner), spent), "t") == "nonce already used"
    assert refusal(again.attest, request(core_for(owner), "aa" * 32), "t").startswith("unknown")


def test_outstanding_challenges_are_bounded(owner, monkeypatch):
    monkeypatch.setattr(B, "MAX_OUTSTANDING", 3)
    b = B.Broker(owner, environ={})
    for _ in range(3):
        b.challenge({"vm": VM}, "t")
    assert refusal(b.challenge, {"vm": VM}, "t").startswith("too many outstanding")


# ---- appraisal steps the attack suite does not cover ------------------------------------

def test_core_version_below_the_minimum_is_refused(owner):
    policy.edit(owner, "min-version", value=2)
    b = B.Broker(owner, environ={})
    reason = refusal(b.attest, request(core_for(owner), b.challenge({"vm": VM}, "t")["nonce"]), "t")
    assert reason == "core version 1 is below the minimum 2 (policy 2, manifest 1)"


def test_a_core_set_up_for_another_owner_is_refused(owner):
    b = B.Broker(owner, environ={})
    other = Core(keys.raw_public(keys.X25519PrivateKey.generate()))
    reason = refusal(b.attest, request(other, b.challenge({"vm": VM}, "t")["nonce"]), "t")
    assert reason.startswith("core serves another owner")


def _tpm_request(core: Core, nonce: str) -> dict:
    log = core.log
    root = {"kind": "tpm", "quote": "ff544347", "quote_sig": "3006020101020101",
            "tpm_ak_pub": "3059aa", "pcrs": {"23": A.replay(log).hex()}}
    data, sig = A.make_evidence(VM, bytes.fromhex(nonce), log, core.ak, core.eph.public_key(), root)
    return {"evidence": data.decode(), "signature": sig.hex()}


def test_tpm_evidence_without_a_verifier_is_refused(owner, monkeypatch):
    monkeypatch.setitem(sys.modules, "sealvm.owner.tpm_verify", None)
    b = B.Broker(owner, environ={})
    assert refusal(b.attest, _tpm_request(core_for(owner), b.challenge({"vm": VM}, "t")["nonce"]),
                   "t") == "TPM evidence not supported by this broker"


def test_tpm_evidence_goes_to_verify_quote_with_the_replayed_log(owner, monkeypatch):
    calls = []

    def verify_quote(root, expected_pcr23, qualifying_data, trusted_tpms):
        calls.append((root, expected_pcr23, qualifying_data, trusted_tpms))
        if len(calls) == 1:
            raise ValueError("tpm nonce: quote extraData does not match")
    monkeypatch.setitem(sys.modules, "sealvm.owner.tpm_verify",
                        types.SimpleNamespace(verify_quote=verify_quote))
    b = B.Broker(owner, environ={})
    core = core_for(owner)
    nonce = b.challenge({"vm": VM}, "t")["nonce"]
    assert refusal(b.attest, _tpm_request(core, nonce), "t") == \
        "tpm nonce: quote extraData does not match"
    nonce = b.challenge({"vm": VM}, "t")["nonce"]
    answer = b.attest(_tpm_request(core, nonce), "t")          # paired: the quote verifies
    keys, generation = A.parse_release(core.open(answer, bytes.fromhex(nonce)))
    assert keys == A.parse_vm_keys(manifest.load_vm_keys(owner, VM)) and generation >= 1
    root, pcr, qd, trusted = calls[-1]
    assert pcr == A.replay(core.log) and trusted == []
    assert qd == A.qualifying_data(bytes.fromhex(nonce), A._raw(core.ak.public_key()),
                                   A._raw(core.eph.public_key()))
    assert "tpm, AK" in log_lines(owner)[-1]["root"]


def test_tpm_evidence_with_the_real_verifier_is_refused_when_untrusted(owner):
    pytest.importorskip("sealvm.owner.tpm_verify")
    b = B.Broker(owner, environ={})
    reason = refusal(b.attest, _tpm_request(core_for(owner), b.challenge({"vm": VM}, "t")["nonce"]),
                     "t")
    assert reason.startswith("tpm ")


# ---- faults on the owner's side, and the HTTP layer -----------------------------------------

def test_unreadable_vm_keys_are_a_broker_fault(owner):
    os.chmod(owner / "vms" / VM / "keys.json", 0o644)
    served = Served(owner)
    try:
        nonce = served.challenge().hex()
        r = served.http.post("/v1/attest", json=request(core_for(owner), nonce))
    finally:
        served.close()
    assert r.status_code == 500
    assert r.json()["error"].startswith("broker fault: owner configuration:")
    assert "mode 0644" in r.json()["error"] and log_lines(owner)[-1]["event"] == "fault"


def test_http_bodies_are_bounded_and_must_be_json(owner, monkeypatch):
    monkeypatch.setattr(B, "MAX_BODY", 1000)
    served = Served(owner)
    http = served.http
    try:
        r = http.post("/v1/attest", content=b"x" * 1001)
        assert r.status_code == 403 and "body over 1000 bytes" in r.json()["error"]
        r = http.post("/v1/challenge", content=b"{not json")
        assert r.status_code == 403 and r.json()["error"] == "malformed request: body is not JSON"
        r = http.post("/v1/challenge", json=["web1"])
        assert r.status_code == 403 and r.json()["error"].startswith("malformed request")
        assert http.post("/v1/challenge", json={"vm": VM}).status_code == 200
    finally:
        served.close()


def test_owner_verify_prints_an_offline_appraisal(owner, capsys, tmp_path):
    from tests.unit.test_owner import owner_cli
    core = core_for(owner)
    data, sig = core.evidence(bytes(32))
    (tmp_path / "ev.json").write_bytes(data)
    (tmp_path / "ev.sig").write_text(sig.hex())
    assert owner_cli("verify", "--dir", str(owner), "--evidence", str(tmp_path / "ev.json"),
                     "--signature", str(tmp_path / "ev.sig")) == 0
    out = capsys.readouterr().out
    assert "appraisal: PASS" in out and "ok   manifest" in out
    bad = Core(keys.load_public(owner)["wrap"], cmdline="init=/bin/sh", ak=core.ak,
               host=Ed25519PrivateKey.generate())
    data, sig = bad.evidence(bytes(32))
    (tmp_path / "ev.json").write_bytes(data)
    (tmp_path / "ev.sig").write_bytes(sig)
    assert owner_cli("verify", "--dir", str(owner), "--evidence", str(tmp_path / "ev.json"),
                     "--signature", str(tmp_path / "ev.sig")) == 1
    out = capsys.readouterr().out
    assert "FAIL root: software root: host key" in out
    assert "FAIL manifest: manifest mismatch: cmdline" in out and "ok   core measurement" in out


# ---- the broker as its own process ---------------------------------------------------------

def test_broker_process_ignores_test_switches_outside_test_mode(owner):
    """`serve` in a fresh interpreter; SEALVM_BROKER_TEST_DISABLE without test mode is inert."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "SEALVM_TEST_MODE"}
    env.update(SEALVM_BROKER_TEST_DISABLE="ak_sig", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    code = ("import sys; from sealvm.owner.broker import serve; "
            "serve(sys.argv[1], '127.0.0.1', int(sys.argv[2]))")
    p = subprocess.Popen([sys.executable, "-c", code, str(owner), str(port)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url, core = f"http://127.0.0.1:{port}", core_for(owner)
        with httpx.Client(timeout=5, trust_env=False) as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    nonce = client.challenge(http, url, VM)
                    break
                except client.BrokerUnavailable:
                    assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
                    time.sleep(0.05)
            data, _ = core.evidence(nonce)
            with pytest.raises(client.BrokerRefused, match="evidence signature does not verify"):
                client.submit(http, url, data, bytes(64))
            nonce = client.challenge(http, url, VM)
            got = client.submit(http, url, *core.evidence(nonce))
            keys, _ = A.parse_release(A.unwrap_keys(*got, core.eph, nonce, core.owner_wrap))
            assert keys == A.parse_vm_keys(manifest.load_vm_keys(owner, VM))
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    assert b"IGNORING SEALVM_BROKER_TEST_DISABLE" in err

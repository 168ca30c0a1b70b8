"""The fleet against live hosts: three network namespaces on one bridge, each with its own
installed tree, `sealvm hostd`, swtpm and `sealvm fleet agent`, and a controller.

Each compromise is injected into a running host and must be detected by its neighbours,
its VMs must leave (live migration, or the sealed snapshot when a core is suspect) and
keep verifying their memory on a trusted host. Each attack has a paired control that
switches off one defence (in the appraisal the neighbours run, or in the controller)
and shows the lie is then accepted.
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from sealvm.fleet.evidence import appraise
from tests.conftest import ROOT, needs_kvm

pytestmark = needs_kvm

TRACER = """
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
if libc.ptrace(0x4206, int(sys.argv[1]), None, None) != 0:      # PTRACE_SEIZE
    print("ptrace failed", ctypes.get_errno(), flush=True)
    sys.exit(1)
print("attached", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def fleet():
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        pytest.skip("no ip netns here")
    from tests.fleet.world import Fleet
    f = Fleet()
    try:
        f.start()
        f.wait_all_trusted(40)
        yield f
    finally:
        f.close()


def golden_of(f, name: str) -> dict:
    measurer = next(h.name for h in f.hosts
                    if name in [s["name"] for s in httpx.get(
                        f"{f.controller_url}/v1/assignments/{h.name}").json()["subjects"]])
    subjects = httpx.get(f"{f.controller_url}/v1/assignments/{measurer}").json()["subjects"]
    return next(s for s in subjects if s["name"] == name)


def challenge(f, name: str) -> tuple[bytes, dict]:
    nonce = secrets.token_bytes(32)
    r = httpx.post(f"{f.host(name).agent_url}/v1/challenge", json={"nonce": nonce.hex()},
                   timeout=10)
    return nonce, r.json()


def appraise_with(monkeypatch, disabled: str, evidence: dict, nonce: bytes, golden: dict):
    with monkeypatch.context() as m:
        m.setenv("SEALVM_TEST_MODE", "1")
        m.setenv("SEALVM_FLEET_TEST_DISABLE", disabled)
        return appraise(evidence, nonce, golden, max_age=3.0)


def host_with_vms(f, n: int = 1) -> str:
    """A trusted host running at least n VMs (placing new VMs until one does)."""
    for _ in range(6):
        t = f.table()
        for h in t["hosts"]:
            if h["verdict"] == "trusted" and len(h["vms"]) >= n:
                return h["name"]
        f.place(f"v{len(t['vms']) + 1}")
    raise AssertionError("no host got VMs")


def console(f, host: str, vm: str) -> str:
    return f.host(host).api().get(f"/v1/vms/{vm}/console").content.decode(errors="replace")


def assert_evacuated(f, suspect: str, vms: list[str], how: str, timeout: float = 60) -> None:
    """Every VM left the suspect for a trusted host, by `how`, and keeps verifying memory."""
    f.wait(lambda: all(f.where(v) != suspect for v in vms), timeout, f"{vms} leave {suspect}")
    t = f.table()
    verdicts = {h["name"]: h["verdict"] for h in t["hosts"]}
    for v in vms:
        target = f.where(v)
        assert verdicts[target] == "trusted", (v, target, verdicts)
        moves = [d for d in t["decisions"] if d["vm"] == v and d["source"] == suspect
                 and d["outcome"] == "done"]
        assert moves and moves[-1]["how"] == how and moves[-1]["target"] == target, moves
        assert suspect in moves[-1]["reason"]
        before = console(f, target, v).count("memtouch t=")
        f.wait(lambda: console(f, target, v).count("memtouch t=") >= before + 2, 20,
               f"{v} progresses on {target}")
        text = console(f, target, v)
        assert "MISMATCH" not in text and " ok" in text, text[-600:]
        state = f.host(suspect).api().get(f"/v1/vms/{v}")
        assert state.status_code == 404 or state.json()["state"] != "running", state.text
    # No VM was placed or moved onto the suspect once it stopped being trusted.
    failed_at = next(h["verdict_at"] for h in t["hosts"] if h["name"] == suspect)
    for d in t["decisions"]:
        assert d["target"] != suspect or d["time"] < failed_at, d


def repair(f, name: str) -> None:
    f.readmit(name)
    f.wait_all_trusted(30)


@pytest.mark.functional('a clean fleet')
def test_clean_fleet_is_trusted_places_vms_and_reports_status(fleet):
    f = fleet
    assert set(f.verdicts().values()) == {"trusted"}
    placed = [f.place(n)["host"] for n in ("v1", "v2")]
    assert len(set(placed)) == 2                      # least loaded: spread out
    r = f.cli("fleet", "status", "--controller", f.controller_url)
    assert r.returncode == 0 and "trusted" in r.stdout and "v1" in r.stdout, r.stdout
    metrics = httpx.get(f"{f.controller_url}/metrics").text
    for h in f.hosts:
        assert f'sealvm_fleet_host_trusted{{host="{h.name}"}} 1.0' in metrics
    r = f.cli("fleet", "status", "--db", str(f.base / "controller" / "fleet.db"), "--json")
    assert json.loads(r.stdout)["hosts"][0]["verdict"] == "trusted"


def changed_file_is_detected(f, monkeypatch, path_of, addition: str, reason_text: str,
                             defence: str, then=lambda suspect: None) -> None:
    """Append `addition` to the file `path_of(host)` names on a host running VMs: the host
    fails with `reason_text`, its VMs live-migrate away, `then(suspect)` holds; control:
    with the one appraisal `defence` off, the same host's evidence passes."""
    suspect = host_with_vms(f)
    vms = [v["id"] for v in f.table()["vms"] if v["host"] == suspect]
    target = path_of(f.host(suspect))
    original = target.read_text()
    target.write_text(original + addition)
    try:
        f.wait(lambda: f.verdicts()[suspect] == "failed", 10, f"{suspect} failed")
        reason = next(h["reason"] for h in f.table()["hosts"] if h["name"] == suspect)
        assert reason_text in reason, reason
        assert_evacuated(f, suspect, vms, "live")
        then(suspect)
        nonce, ev = challenge(f, suspect)
        golden = golden_of(f, suspect)
        assert appraise(ev, nonce, golden, 3.0).verdict == "fail"
        assert appraise_with(monkeypatch, defence, ev, nonce, golden).verdict == "pass"
    finally:
        target.write_text(original)
    repair(f, suspect)


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique="patch the host daemon's code",
                    defence='fleet appraisal: code measurements',
                    outcome="host failed 'code differs'; its VMs live-migrate away",
                    control='inline')
def test_changed_code_is_detected_and_the_vms_live_migrate(fleet, monkeypatch):
    def nothing_new_goes_there(suspect):
        for n in ("v-after-1", "v-after-2"):
            assert fleet.place(n)["host"] != suspect
    changed_file_is_detected(fleet, monkeypatch,
                             lambda h: h.code / "sealvm" / "host" / "api.py",
                             "\n# an operator's tool patched the daemon\n", "code differs", "code",
                             then=nothing_new_goes_there)


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique="change the host's config to insecure-dev",
                    defence='fleet appraisal: config',
                    outcome="host failed 'config differs'; VMs migrate",
                    control='inline')
def test_changed_config_is_detected_and_the_vms_live_migrate(fleet, monkeypatch):
    changed_file_is_detected(fleet, monkeypatch, lambda h: h.config, "insecure-dev=1\n",
                             "config differs", "config")


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique='ptrace a core on the host',
                    defence='fleet appraisal: tracer check',
                    outcome="host failed 'traced by pid'; VMs restored elsewhere, old copy fenced",
                    control='inline')
def test_traced_core_is_restored_from_its_sealed_snapshot_and_the_old_copy_fenced(
        fleet, monkeypatch):
    f = fleet
    suspect = host_with_vms(f)
    vm = next(v["id"] for v in f.table()["vms"] if v["host"] == suspect)
    f.wait(lambda: next(v for v in f.table()["vms"] if v["id"] == vm)["snapshot"], 20,
           f"a sealed snapshot of {vm}")
    gen_before = json.loads((f.owner / "vms" / vm / "generation").read_text())["generation"]
    pid = f.host(suspect).api().get(f"/v1/vms/{vm}").json()["pid"]
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(pid)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert tracer.stdout.readline().strip() == "attached"
        f.wait(lambda: f.verdicts()[suspect] == "failed", 10, f"{suspect} failed")
        reason = next(h["reason"] for h in f.table()["hosts"] if h["name"] == suspect)
        assert f"traced by pid {tracer.pid}" in reason, reason
        # Control: with the tracer check off, the same evidence passes.
        nonce, ev = challenge(f, suspect)
        golden = golden_of(f, suspect)
        assert appraise(ev, nonce, golden, 3.0).verdict == "fail"
        assert appraise_with(monkeypatch, "tracer", ev, nonce, golden).verdict == "pass"
        vms = [v["id"] for v in f.table()["vms"] if v["host"] == suspect]
        assert_evacuated(f, suspect, vms, "snapshot")
        # The owner's broker moved the generation to the restored copy: the old one is fenced.
        gen_after = json.loads((f.owner / "vms" / vm / "generation").read_text())["generation"]
        new = f.host(f.where(vm)).api().get(f"/v1/vms/{vm}").json()
        assert gen_after > gen_before and new["generation"] == gen_after
        assert new["image"].endswith(".sealed")      # rebuilt from the sealed snapshot
    finally:
        tracer.kill()
        tracer.wait()
    repair(f, suspect)


@pytest.mark.functional('a silent host goes missing')
def test_stopped_agent_goes_missing_and_its_vms_leave(fleet):
    f = fleet
    suspect = host_with_vms(f)
    vms = [v["id"] for v in f.table()["vms"] if v["host"] == suspect]
    f.host(suspect).stop_agent()
    f.wait(lambda: f.verdicts()[suspect] == "missing", 15, f"{suspect} missing")
    assert_evacuated(f, suspect, vms, "live")
    f.host(suspect).start_agent()
    f.wait(lambda: f.verdicts()[suspect] == "trusted", 20, f"{suspect} back")


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique='replay old clean evidence from the host',
                    defence='nonce + age checks',
                    outcome="host failed 'nonce'; VMs migrate",
                    control='inline')
def test_agent_replaying_old_evidence_is_failed(fleet, monkeypatch):
    f = fleet
    suspect = host_with_vms(f)
    vms = [v["id"] for v in f.table()["vms"] if v["host"] == suspect]
    old_nonce, old = challenge(f, suspect)              # clean evidence, recorded
    golden = golden_of(f, suspect)
    assert appraise(old, old_nonce, golden, 3.0).verdict == "pass"
    recorded = f.base / f"recorded-{suspect}.json"
    recorded.write_text(json.dumps(old))
    h = f.host(suspect)
    h.stop_agent()
    liar = subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable,
                             str(ROOT / "tests" / "fleet" / "replayer.py"), str(recorded), h.ip,
                             str(h.agent_port)])
    try:
        f.wait(lambda: f.verdicts()[suspect] == "failed", 15, f"{suspect} failed")
        reason = next(x["reason"] for x in f.table()["hosts"] if x["name"] == suspect)
        assert "nonce" in reason, reason
        # Control: with the freshness checks (nonce, age) off the replay is accepted.
        nonce, ev = challenge(f, suspect)
        assert ev == old
        assert appraise(ev, nonce, golden, 3.0).verdict == "fail"
        assert appraise_with(monkeypatch, "nonce,stale", ev, nonce, golden).verdict == "pass"
        assert_evacuated(f, suspect, vms, "live")
    finally:
        liar.kill()
        liar.wait()
    repair(f, suspect)


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique='answer with an agent key that is not enrolled',
                    defence='enrolled agent keys',
                    outcome="host failed 'signature'",
                    control='inline')
def test_agent_with_a_key_that_is_not_enrolled_is_failed(fleet, monkeypatch):
    """A replaced agent (same host, same TPM, golden measurements) signs with a key the
    controller never enrolled: its evidence is refused."""
    f = fleet
    suspect = host_with_vms(f)
    vms = [v["id"] for v in f.table()["vms"] if v["host"] == suspect]
    h = f.host(suspect)
    h.stop_agent()
    h.start_agent(state=f"agent-forged-{time.monotonic_ns()}")
    try:
        f.wait(lambda: f.verdicts()[suspect] == "failed", 15, f"{suspect} failed")
        reason = next(x["reason"] for x in f.table()["hosts"] if x["name"] == suspect)
        assert "signature" in reason, reason
        nonce, ev = challenge(f, suspect)
        golden = golden_of(f, suspect)
        assert appraise(ev, nonce, golden, 3.0).verdict == "fail"
        # Control: accept whatever agent key the evidence names, and it passes.
        assert appraise_with(monkeypatch, "agent-key", ev, nonce, golden).verdict == "pass"
        assert_evacuated(f, suspect, vms, "live")
    finally:
        h.stop_agent()
    repair(f, suspect)


@pytest.mark.attack(adversary='fleet host', asset='fleet',
                    technique='post a forged failure report about a clean host',
                    defence='report-signature',
                    outcome='403; the host stays trusted',
                    control='inline')
def test_forged_report_cannot_frame_a_trusted_host(fleet):
    """Anyone may post to the controller; a report that a host failed must come from
    that host's neighbour's enrolled key. Control: a controller with that check off
    takes the forged report and fails a clean host."""
    from sealvm.fleet.evidence import load_or_create_key, sign
    f = fleet
    victim = f.hosts[0].name
    measurer = next(h.name for h in f.hosts if victim in [s["name"] for s in httpx.get(
        f"{f.controller_url}/v1/assignments/{h.name}").json()["subjects"]])
    forger = load_or_create_key(f.base / f"forger-{time.monotonic_ns()}.key")

    def forged():
        return sign(forger, {"reporter": measurer, "subject": victim, "verdict": "fail",
                             "reason": "forged: code differs", "time": time.time(),
                             "counter": time.time_ns()})
    r = httpx.post(f"{f.controller_url}/v1/reports", json=forged())
    assert r.status_code == 403 and "signature" in r.text
    time.sleep(1)
    assert f.verdicts()[victim] == "trusted"
    from tests.fleet.world import free_port
    port = free_port()
    env = dict(os.environ, SEALVM_TEST_MODE="1", SEALVM_FLEET_TEST_DISABLE="report-signature")
    lax = f.start_controller(port, env, state="controller-lax")
    try:
        url = f"http://{f.controller_ip}:{port}"
        r = httpx.post(f"{url}/v1/reports", json=forged())
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            hosts = httpx.get(f"{url}/v1/table").json()["hosts"]
            lax_verdict = next(h for h in hosts if h["name"] == victim)
            if lax_verdict["verdict"] == "failed":
                break
            time.sleep(0.1)
        assert lax_verdict["verdict"] == "failed" and "forged" in lax_verdict["reason"]
    finally:
        lax.terminate()
        lax.wait(10)

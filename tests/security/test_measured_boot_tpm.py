"""Measured boot with a TPM root (swtpm), against the real launcher, core, preboot and broker.

`SEALVM_TPM=HOST:PORT` makes the launcher reset PCR 23 and extend its log
into it, and the preboot stage extend the core's entries and quote it.  The
owner requires a TPM and trusts this swtpm's attestation key.  Each attack
has a paired control that changes only what the defence looks at:
(a) the host runs without a TPM: refused; control: require-tpm no, released
with the software root; (b) a TPM the owner does not trust: refused; control:
trust it, released; (c) a host extending PCR 23 beyond the log (an extra
digest, or one entry twice, through the preboot stage's test-only switch):
refused on the PCR digest; control: the same switch without test mode is
ignored, released.  The lock serialising attested launches is exercised by
two concurrent launches, both released.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import ROOT, guest_image, needs_kvm
from tests.security.harness import start_broker

pytestmark = needs_kvm
if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed (apt-get install -y swtpm swtpm-tools)",
                allow_module_level=True)
pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed")

from sealvm.tools import swtpm                                  # noqa: E402

GOOD_CMDLINE = "greeting=owner"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Environment for the CLI: a private launcher dir (its own lock and host key)."""
    launcher = tmp_path_factory.mktemp("launcher") / "l"
    e = {k: v for k, v in os.environ.items() if not k.startswith("SEALVM_")}
    e["SEALVM_LAUNCHER_DIR"] = str(launcher)
    return e


@pytest.fixture(scope="module")
def tpms(tmp_path_factory):
    """{"trusted": HOST:PORT, "other": HOST:PORT}: two private swtpms."""
    states = [tmp_path_factory.mktemp(f"swtpm-{n}") for n in ("trusted", "other")]
    ports = [swtpm.start_on_free_port(s) for s in states]
    yield {"trusted": f"127.0.0.1:{ports[0]}", "other": f"127.0.0.1:{ports[1]}"}
    for s in states:
        swtpm.stop(s)


def cli(env, *args, tpm=None, extra=None, timeout=60) -> subprocess.CompletedProcess:
    e = dict(env, **(extra or {}))
    if tpm:
        e["SEALVM_TPM"] = tpm
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def owner(tmp_path_factory, env, tpms):
    """An owner requiring a TPM, trusting the first swtpm's key, with a live broker."""
    d = tmp_path_factory.mktemp("owner") / "o"
    assert cli(env, "owner", "init", str(d)).returncode == 0
    r = cli(env, "owner", "sign", "--dir", str(d), str(guest_image("hello")), "--name", "demo",
            "--cmdline", GOOD_CMDLINE)
    assert r.returncode == 0, r.stderr
    r = cli(env, "measure", tpm=tpms["trusted"])
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    other = json.loads(cli(env, "measure", tpm=tpms["other"]).stdout)["tpm_ak_pub"]
    assert other != m["tpm_ak_pub"]
    for args in (("add", "core", m["core_measurement"]), ("add", "tpm", m["tpm_ak_pub"]),
                 ("add", "host", m["host_pub"]), ("require-tpm", "yes")):
        assert cli(env, "owner", "policy", "--dir", str(d), *args).returncode == 0
    broker, url = start_broker(d, env)
    yield {"dir": d, "url": url, "other_ak": other}
    broker.terminate()
    broker.wait(10)


def policy(env, owner, *args):
    r = cli(env, "owner", "policy", "--dir", str(owner["dir"]), *args)
    assert r.returncode == 0, r.stderr


def run_vm(env, owner, tpm=None, extra=None):
    return cli(env, "run", str(guest_image("hello")), "--cmdline", GOOD_CMDLINE,
               "--manifest", str(owner["dir"] / "vms" / "demo"), "--broker", owner["url"],
               tpm=tpm, extra=extra)


def last_event(owner) -> dict:
    return json.loads((owner["dir"] / "broker.log").read_text().splitlines()[-1])


def released(r, root: str) -> bool:
    return (r.returncode == 0 and f"({root} root); keys released" in r.stderr
            and "HELLO" in r.stdout)


def refused(r, owner, reason: str) -> None:
    assert r.returncode != 0 and "keys released" not in r.stderr and "HELLO" not in r.stdout
    assert reason in r.stderr, r.stderr
    event = last_event(owner)
    assert event["event"] == "refused" and reason in event["reason"], event


@pytest.mark.functional('baseline: the genuine VM gets its keys with a TPM root')
def test_control_the_genuine_vm_gets_its_keys_with_a_tpm_root(env, owner, tpms):
    r = run_vm(env, owner, tpm=tpms["trusted"])
    assert released(r, "tpm"), r.stderr
    event = last_event(owner)
    assert event["event"] == "release" and event["root"].startswith("tpm"), event


@pytest.mark.attack(adversary='host operator', asset='attestation',
                    technique="launch without the host's TPM where the owner requires one",
                    defence='require_tpm policy',
                    outcome="refused: 'policy requires a TPM root'",
                    control='test_control_without_require_tpm_the_software_root_is_released')
def test_a_host_without_its_tpm_is_refused_when_the_owner_requires_one(env, owner):
    refused(run_vm(env, owner), owner, "policy requires a TPM root")


def test_control_without_require_tpm_the_software_root_is_released(env, owner):
    policy(env, owner, "require-tpm", "no")
    try:
        r = run_vm(env, owner)
    finally:
        policy(env, owner, "require-tpm", "yes")
    assert released(r, "software"), r.stderr
    assert last_event(owner)["root"].startswith("software")


@pytest.mark.attack(adversary='host operator', asset='attestation',
                    technique='quote from a TPM the owner does not trust',
                    defence='trusted TPM keys in policy',
                    outcome="refused: 'tpm trust'",
                    control='test_control_the_other_tpm_once_trusted_is_released')
def test_a_tpm_the_owner_does_not_trust_is_refused(env, owner, tpms):
    refused(run_vm(env, owner, tpm=tpms["other"]), owner, "tpm trust")


def test_control_the_other_tpm_once_trusted_is_released(env, owner, tpms):
    policy(env, owner, "add", "tpm", owner["other_ak"])
    try:
        r = run_vm(env, owner, tpm=tpms["other"])
    finally:
        policy(env, owner, "remove", "tpm", owner["other_ak"])
    assert released(r, "tpm"), r.stderr


@pytest.mark.attack(adversary='host operator', asset='attestation',
                    technique='extend the PCR beyond the measured log',
                    defence='PCR digest replayed from the log',
                    outcome="refused: 'tpm pcr-digest'",
                    control='test_control_the_extend_switch_is_ignored_outside_test_mode', baseline=True, variants=True)
@pytest.mark.parametrize("how", ["extra", "twice"])
def test_a_pcr_extended_beyond_the_log_is_refused(env, owner, tpms, how):
    r = run_vm(env, owner, tpm=tpms["trusted"],
               extra={"SEALVM_TEST_MODE": "1", "SEALVM_PREBOOT_TEST_EXTEND": how})
    refused(r, owner, "tpm pcr-digest")


def test_control_the_extend_switch_is_ignored_outside_test_mode(env, owner, tpms):
    r = run_vm(env, owner, tpm=tpms["trusted"], extra={"SEALVM_PREBOOT_TEST_EXTEND": "extra"})
    assert released(r, "tpm"), r.stderr


@pytest.mark.functional('two attested launches share one TPM')
def test_concurrent_attested_launches_are_serialised_and_both_released(env, owner, tpms):
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run_vm(env, owner, tpm=tpms["trusted"]), range(2)))
    for r in results:
        assert released(r, "tpm"), r.stderr


@pytest.mark.functional('a bad SEALVM_TPM stops the launch with a clear error')
@pytest.mark.parametrize("address, says", [("no-port-here", "SEALVM_TPM"),
                                           ("127.0.0.1:1", "cannot reach a TPM")])
def test_a_bad_or_unreachable_tpm_stops_the_launch(env, owner, address, says):
    r = run_vm(env, owner, tpm=address)
    assert r.returncode != 0 and says in r.stderr and "HELLO" not in r.stdout, r.stderr

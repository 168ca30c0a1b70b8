"""The attack catalogue cannot rot: every test in the security modules (and the fleet's
attacks) says what it is, every attack names its adversary, asset, technique, defence
and outcome, and has a paired control that exists; and there are at least 30 distinct
(adversary, asset, technique) triples whose control switches the defence off."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.security.catalog import ADVERSARIES, ASSETS, CATALOGUE_ENV


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("cat") / "catalogue.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "tests/security", "tests/fleet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, CATALOGUE_ENV: str(out)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_security_test_says_what_it_is(catalogue):
    assert catalogue["problems"] == []
    unmarked = [n for n, role in catalogue["roles"].items() if role == "unmarked"]
    assert unmarked == [], "mark these attack(...) / functional(...): " + ", ".join(unmarked)


def test_every_attack_has_its_metadata_and_a_control(catalogue):
    for name, a in catalogue["attacks"].items():
        assert a["adversary"] in ADVERSARIES and a["asset"] in ASSETS, name
        assert a["attack_cases"] and a["control_cases"], name
        for case in a["control_cases"]:
            assert catalogue["roles"].get(case) in ("control", "attack"), (name, case)


def test_at_least_thirty_distinct_attacks_proved_by_a_defence_off_control(catalogue):
    triples = {tuple(t) for t in catalogue["triples"]}
    assert len(triples) >= 30, len(triples)
    adversaries = {t[0] for t in triples}
    assets = {t[1] for t in triples}
    assert {"host daemon", "host storage", "network relay", "snapshot store",
            "key-broker impostor"} <= adversaries, adversaries
    assert {"guest memory", "sealed disk", "network", "snapshots", "migration",
            "attestation", "fleet", "launcher"} <= assets, assets

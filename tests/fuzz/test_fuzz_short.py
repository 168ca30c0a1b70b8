"""The short fuzzing pass CI runs: every target, its seeds, its regression inputs, and a few
thousand mutants from the runner's seeded mutator (the long, coverage-guided runs are
`make fuzz`; docs/fuzzing.md).

A regression input is an input that once crashed a target; fuzz/regressions/<target>/
keeps every one, so the fix stays fixed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import runner as R
from fuzz import target as T

# Inputs per target: a few thousand, fewer for the targets whose every input does
# public-key work (handshakes, signatures) or allocates a snapshot reader's buffer.
RUNS = {"snapshot": 1500, "migration": 1500, "tunnel": 3000, "broker": 3000}


def test_every_target_is_listed_and_has_seeds():
    names = sorted(p.stem for p in (R.ROOT / "fuzz" / "targets").glob("[a-z]*.py"))
    assert names == sorted(T.NAMES)
    for n in T.NAMES:
        assert R.inputs_of(R.CORPUS / n), f"no seed corpus for {n}"


@pytest.mark.parametrize("name", T.NAMES)
def test_short_pass(name):
    assert R.random_pass(name, RUNS.get(name, 5000)) > 0


@pytest.mark.parametrize("name", sorted(p.name for p in R.REGRESSIONS.iterdir()
                                        if p.is_dir()) if R.REGRESSIONS.is_dir() else [])
def test_regressions_stay_fixed(name):
    mod = T.load(name)
    mod.setup()
    files = R.inputs_of(R.REGRESSIONS / name)
    assert files
    for f in files:
        T.check(name, mod, f.read_bytes())


def test_the_oracle_catches_an_unexpected_exception():
    mod = T.load("launcher")
    orig = mod.one
    try:
        mod.one = lambda data: [][1]
        with pytest.raises(T.Crash, match="IndexError"):
            T.check("launcher", mod, b"x")
    finally:
        mod.one = orig


def test_launcher_regression_would_fail_without_the_fix(monkeypatch):
    """The regression input is a real one: with `$`-style matching it is accepted again."""
    import re

    from sealvm.launcher import protocol, spawn
    old = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

    def check_vm_id(vm_id):
        if not old.match(vm_id):
            raise spawn.LaunchError("bad VM id")
        return vm_id

    monkeypatch.setattr(protocol, "check_vm_id", check_vm_id)
    mod = T.load("launcher")
    data = (R.REGRESSIONS / "launcher" / "vm-id-trailing-newline").read_bytes()
    with pytest.raises(T.Crash, match="accepted"):
        T.check("launcher", mod, data)

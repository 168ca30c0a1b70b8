"""The runtime TCB (modules a running core loads, plus the launcher) stays within budget.

The count comes from a real core: the TCB tool boots a guest and takes the
module list the core reports from its own sys.modules, so an import that
sneaks into the core is counted the moment it is loaded.
"""
from __future__ import annotations


from sealvm.tools import tcb
from tests.conftest import needs_kvm


def test_line_counter_skips_comments_blank_lines_and_docstrings(tmp_path):
    f = tmp_path / "m.py"
    f.write_text('"""doc\nmore doc\n"""\n\n# comment\nx = 1\n\ndef f():\n    """d"""\n    return x\n')
    assert tcb.count_lines(f) == 3


@needs_kvm
def test_core_and_launcher_stay_within_the_budget():
    r = tcb.measure()
    assert any(m.startswith("sealvm.core.machine") for m in r["modules"]), "no core measured"
    assert set(r["outside_project"]) <= {"cryptography", "cryptography (attested VMs only)"}, \
        f"the core loaded modules from outside the project: {r['outside_project']}"
    assert r["total"] <= r["budget"], (
        f"runtime TCB is {r['total']} lines (core {r['core_lines']}, launcher "
        f"{r['launcher_lines']}), over the budget of {r['budget']}: {r['subsystems']}")


@needs_kvm
def test_core_loads_nothing_from_host_owner_fleet_or_preboot():
    names = tcb.running_core_modules()
    bad = [n for n in names if n.split(".")[:2][-1] in ("host", "owner", "fleet", "preboot")]
    assert not bad, bad
    assert "sealvm.wire.portal_client" not in names, "the core loaded the host-side client"


@needs_kvm
def test_launcher_measures_every_stdlib_module_a_running_core_loads():
    from sealvm.launcher.measure import CORE_STDLIB
    loaded = set(tcb.measure()["stdlib"])
    missing = sorted(loaded - set(CORE_STDLIB))
    assert not missing, f"add to CORE_STDLIB in sealvm/launcher/measure.py: {missing}"

"""The launcher's measurement of the code a core will run.

Altering any byte the core could load (a source file, a .pyc, the
interpreter) or a .pth file of its environment must change the core
measurement an owner's policy pins, and say which item changed.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from sealvm.launcher import measure as M
from sealvm.wire.attest import core_measurement

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path):
    """A copy of the core's files (sources and bytecode) to tamper with."""
    for rel in M.CORE_TREES:
        shutil.copytree(ROOT / rel, tmp_path / rel, ignore=shutil.ignore_patterns("*.tmp"))
    shutil.copy(ROOT / "sealvm/__init__.py", tmp_path / "sealvm/__init__.py")
    return tmp_path


def test_measurement_is_stable_and_covers_every_kind():
    a, b = M.measure_core(), M.measure_core()
    assert a == b
    kinds = {e["kind"] for e in a}
    assert {"interpreter", "core-file", "stdlib-file"} <= kinds
    assert any(e["name"].endswith("core/machine.py") for e in a)


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("pattern", ["core/machine.py", "wire/portal.py", "__pycache__/*.pyc"])
def test_altering_a_core_file_changes_the_measurement(tree, pattern):
    base = M.measure_core(root=tree)
    target = sorted(tree.glob(f"sealvm/**/{pattern}"))
    if not target:
        pytest.skip(f"no {pattern} in the tree (run make to build the bytecode)")
    _tamper(target[0])
    after = M.measure_core(root=tree)
    assert core_measurement(after) != core_measurement(base)
    assert M.differences(base, after) == [f"core-file {target[0].relative_to(tree)}: changed"]


def test_control_an_untouched_copy_measures_the_same(tree):
    assert core_measurement(M.measure_core(root=tree)) == core_measurement(M.measure_core(root=tree))


def test_a_new_file_in_the_core_tree_is_measured(tree):
    base = M.measure_core(root=tree)
    (tree / "sealvm/core/sneaky.py").write_text("x = 1\n")
    assert M.differences(base, M.measure_core(root=tree)) == ["core-file sealvm/core/sneaky.py: unexpected"]


def test_altering_a_pth_file_changes_the_measurement(tmp_path, monkeypatch):
    site = tmp_path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    (site / "a.pth").write_text("import os\n")
    monkeypatch.setattr(M, "pth_files", lambda prefix=str(tmp_path): sorted(site.glob("*.pth")))
    base = M.measure_core()
    (site / "a.pth").write_text("import evil\n")
    assert M.differences(base, M.measure_core()) == ["pth-file a.pth: changed"]


def test_altering_the_interpreter_changes_the_measurement(tmp_path):
    python = tmp_path / "python3"
    shutil.copy(M.os.path.realpath(sys.executable), python)
    base = M.measure_core(python=str(python))
    _tamper(python)
    after = M.measure_core(python=str(python))
    assert core_measurement(after) != core_measurement(base)
    assert M.differences(base, after) == [f"interpreter {python}: changed"]

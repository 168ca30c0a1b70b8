"""The trusted core's import contract, checked on its source.

The core (sealvm/core and the pure sealvm/wire it uses) may import only the
standard library and `cryptography`, and nothing from the untrusted host, the
boot-time preboot stage, owner tools or the fleet.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "sealvm"
TRUSTED = [ROOT / "core", ROOT / "wire"]
ALLOWED_THIRD_PARTY = {"cryptography"}
FORBIDDEN_PROJECT = {"host", "preboot", "owner", "fleet", "cli", "tools"}


def _modules():
    for base in TRUSTED:
        yield from sorted(base.rglob("*.py"))


def _imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level + 1])
                name = ".".join(base + ([node.module] if node.module else []))
                yield node.lineno, name
            else:
                yield node.lineno, node.module


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_only_stdlib_and_cryptography(path):
    bad = []
    for line, name in _imports(path):
        top = name.split(".")[0]
        if top == "sealvm":
            parts = name.split(".")
            if len(parts) > 1 and parts[1] in FORBIDDEN_PROJECT:
                bad.append(f"{line}: {name} (untrusted or boot-time code)")
        elif top not in sys.stdlib_module_names and top not in ALLOWED_THIRD_PARTY:
            bad.append(f"{line}: {name} (not stdlib or cryptography)")
    assert not bad, f"{path.relative_to(ROOT)} imports outside the core's contract:\n" + "\n".join(bad)


def test_the_checker_catches_a_forbidden_import(tmp_path):
    """The contract check itself must be able to fail."""
    fake = ROOT / "core" / "_arch_probe_tmp.py"
    try:
        fake.write_text("import requests\nfrom sealvm.host import daemon\n")
        found = [n for _, n in _imports(fake)]
        assert "requests" in found and "sealvm.host" in found
    finally:
        fake.unlink()

"""Measure what a core will run, before it runs (the launcher's half of measured boot).

The launcher hashes every file the core's interpreter can load: the
interpreter binary, every source and bytecode file of the core and the wire
codec, the standard-library modules a core loads (CORE_STDLIB; a test checks
a running core loads nothing outside it), and every `.pth` file of the
environment (the core runs with -S and never reads them, but a changed one
still changes the measurement, so nothing in the environment moves unseen).
Entries follow docs/attestation.md; `core_measurement` of the code entries is
what an owner's policy lists.  A core measuring itself would prove nothing:
this runs in the launcher, before the core exists.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

from ..wire.attest import make_entry

ROOT = Path(__file__).resolve().parents[2]
CORE_TREES = ("sealvm/core", "sealvm/wire")
CORE_TOP_FILES = ("sealvm/__init__.py",)
# Standard-library modules a running core loads (tests/arch keeps this complete).
CORE_STDLIB = sorted("""
    __future__ _collections_abc _ctypes _frozen_importlib _frozen_importlib_external _hashlib
    _typing _weakrefset abc ast bisect codecs collections collections.abc contextlib copy copyreg
    ctypes ctypes._endian dataclasses dis encodings encodings.aliases encodings.utf_8 enum
    functools genericpath hashlib hmac importlib importlib._bootstrap
    importlib._bootstrap_external importlib.machinery inspect io keyword linecache logging mmap
    opcode operator os os.path posixpath re re._casefix re._compiler re._constants re._parser
    reprlib resource selectors signal socket stat string struct textwrap threading token tokenize
    base64 random secrets json json.decoder json.encoder json.scanner _json
    traceback types typing warnings weakref zipimport
""".split())


def _entry(kind: str, name: str, digest: bytes) -> dict:
    return make_entry(kind, name, digest)


def file_digest(path: str | os.PathLike) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def core_files(root: Path = ROOT) -> list[Path]:
    """Every .py and .pyc file under the core's trees, in a stable order."""
    files = [root / p for p in CORE_TOP_FILES]
    for tree in CORE_TREES:
        files += [p for p in (root / tree).rglob("*") if p.suffix in (".py", ".pyc") and p.is_file()]
    return sorted(set(files))


def stdlib_files(names: list[str] = CORE_STDLIB) -> list[tuple[str, Path]]:
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
        if origin and origin not in ("built-in", "frozen") and os.path.isfile(origin):
            out.append((name, Path(origin)))
    return out


LIBRARIES = ("cryptography", "_cffi_backend")   # what the core imports from site-packages


def library_files(names: tuple[str, ...] = LIBRARIES) -> list[tuple[str, Path]]:
    """Every file of the third-party packages the core may load (sources and binaries)."""
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = Path(spec.origin)
        if spec.submodule_search_locations:          # a package: all of its files
            base = origin.parent
            out += [(f"{name}/{p.relative_to(base)}", p) for p in sorted(base.rglob("*"))
                    if p.is_file() and p.suffix in (".py", ".pyc", ".so")]
        else:
            out.append((name, origin))
    return out


def pth_files(prefix: str = sys.prefix) -> list[Path]:
    site = Path(prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    return sorted(site.glob("*.pth")) if site.is_dir() else []


def measure_core(python: str = sys.executable, root: Path = ROOT) -> list[dict]:
    """The measurement log of the code a core started with `python` will run."""
    interpreter = os.path.realpath(python)
    log = [_entry("interpreter", interpreter, file_digest(interpreter))]
    log += [_entry("core-file", str(p.relative_to(root)), file_digest(p)) for p in core_files(root)]
    log += [_entry("stdlib-file", name, file_digest(p)) for name, p in stdlib_files()]
    log += [_entry("library-file", name, file_digest(p)) for name, p in library_files()]
    log += [_entry("pth-file", p.name, file_digest(p)) for p in pth_files()]
    return log


def differences(expected: list[dict], actual: list[dict]) -> list[str]:
    """Which measured items differ between two logs, by kind and name (for error messages)."""
    want = {(e["kind"], e["name"]): e["digest"] for e in expected}
    got = {(e["kind"], e["name"]): e["digest"] for e in actual}
    out = [f"{k} {n}: changed" for (k, n) in want if (k, n) in got and want[k, n] != got[k, n]]
    out += [f"{k} {n}: missing" for (k, n) in want if (k, n) not in got]
    out += [f"{k} {n}: unexpected" for (k, n) in got if (k, n) not in want]
    return out

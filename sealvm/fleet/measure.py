"""What an agent measures on its host, at runtime, every period.

A measurement is a JSON object:

    {"time": unix seconds,
     "code": sha256 over the installed sealvm tree (every .py file: path and digest),
     "launcher": the same over sealvm/launcher alone (the root part of the host),
     "core": the core measurement the launcher would compute for this tree,
     "config": sha256 of the host's configuration file (absent file: sha256 of b""),
     "cores": [{"pid", "uid", "vm", "tracer"}],   every process whose uid is in the
              host's core uid range, with its TracerPid from /proc/PID/status
     }

`appraise_measurement` compares one against the golden values the controller keeps
for the host; it returns the list of problems (empty: the measurement is golden).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..launcher.measure import core_files, file_digest
from ..wire.attest import core_measurement, make_entry
from .testmode import test_disabled

GOLDEN_KEYS = ("code", "launcher", "core", "config")


def tree_digest(root: Path, sub: str = "sealvm") -> str:
    """sha256 over (relative path, file digest) of every .py file under root/sub."""
    h = hashlib.sha256()
    base = root / sub
    for p in sorted(base.rglob("*.py")):
        if "__pycache__" in p.parts or not p.is_file():
            continue
        h.update(str(p.relative_to(root)).encode() + b"\0" + file_digest(p))
    return h.hexdigest()


def core_digest(root: Path) -> str:
    entries = [make_entry("core-file", str(p.relative_to(root)), file_digest(p))
               for p in core_files(root) if p.suffix == ".py"]
    return core_measurement(entries).hex()


def config_digest(path: Path | None) -> str:
    try:
        data = path.read_bytes() if path else b""
    except FileNotFoundError:
        data = b""
    return hashlib.sha256(data).hexdigest()


def _status_field(pid: int, field: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def running_cores(uid_range: tuple[int, int]) -> list[dict]:
    """Every process whose real uid is in the host's core uid range, with its tracer."""
    lo, hi = uid_range
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        uids = _status_field(pid, "Uid")
        if not uids:
            continue
        uid = int(uids.split()[0])
        if not lo <= uid <= hi:
            continue
        tracer = _status_field(pid, "TracerPid")
        vm = ""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            for a in argv:
                if a.startswith(b"--vm-id="):
                    vm = a[8:].decode(errors="replace")
        except OSError:
            pass
        out.append({"pid": pid, "uid": uid, "vm": vm, "tracer": int(tracer or 0)})
    return sorted(out, key=lambda c: c["pid"])


def golden_values(code_dir: Path, config: Path | None) -> dict:
    """The values a clean host of this installation measures (for enrolment)."""
    return {"code": tree_digest(code_dir), "launcher": tree_digest(code_dir, "sealvm/launcher"),
            "core": core_digest(code_dir), "config": config_digest(config)}


def measure_host(code_dir: Path, config: Path | None, uid_range: tuple[int, int]) -> dict:
    m = golden_values(code_dir, config)
    m["cores"] = running_cores(uid_range)
    m["time"] = round(time.time(), 3)
    return m


def canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def measurement_digest(m: dict) -> bytes:
    return hashlib.sha256(canonical(m)).digest()


def appraise_measurement(m: dict, golden: dict, uid_range: tuple[int, int]) -> list[str]:
    problems = []
    if not isinstance(m, dict):
        return ["measurement is not an object"]
    for key in GOLDEN_KEYS:
        if m.get(key) != golden.get(key) and not test_disabled(key):
            problems.append(f"{key} differs from the golden value")
    cores = m.get("cores")
    if not isinstance(cores, list):
        return problems + ["no list of cores"]
    lo, hi = uid_range
    for c in cores:
        if not isinstance(c, dict):
            problems.append("a core entry is not an object")
            continue
        if not (isinstance(c.get("uid"), int) and lo <= c["uid"] <= hi):
            problems.append(f"core pid {c.get('pid')} runs outside the core uid range")
        if c.get("tracer") and not test_disabled("tracer"):
            problems.append(f"core pid {c.get('pid')} (vm {c.get('vm') or '?'}) is traced "
                            f"by pid {c['tracer']}")
    return problems

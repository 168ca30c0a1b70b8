"""`make tcb`: the runtime trusted computing base, measured from a running core.

Starts a real core through the launcher, boots the rng guest (so the virtio
path is loaded too), and takes the list of modules the core reports from its
own `sys.modules` once the guest runs.  It then counts the source lines of
each project module (non-blank, non-comment, docstrings excluded) plus the
launcher, per subsystem, lists the modules loaded from outside the project,
and counts the portal's operations.

    python -m sealvm.tools.tcb [--json FILE] [--check]

`--check` exits 1 when core + launcher exceed TCB_BUDGET.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Core + launcher, counted lines.  Raised only by what a later capability adds
# (say so in the commit message and in the README's TCB table).
TCB_BUDGET = 8364
# The root launcher; with SEALVM_TPM set it also loads sealvm.preboot.tpm (and tpm2-pytss)
# for the extends it makes before each core starts, and stays alive with it loaded.
LAUNCHER_MODULES = ["sealvm.launcher.spawn", "sealvm.launcher.protocol", "sealvm.launcher.service",
                    "sealvm.launcher.measure", "sealvm.launcher.attest_boot",
                    "sealvm.launcher.tpm_boot", "sealvm.launcher.witness", "sealvm.preboot.tpm"]
# Loaded by a core only when its VM has an owner manifest (the measured guest boots
# with a rng guest and no broker here); counted as part of the runtime TCB all the same.
ATTESTED_PATH_MODULES = ["sealvm.core.attestation", "sealvm.wire.attest", "sealvm.wire.bootchannel"]
# Loaded by a core only when its VM has a network (the measured guest has none).
NET_MODULES = ["sealvm.core.devices.virtio.net", "sealvm.core.net_tunnel"]
# Loaded by a core only when the host attached a sealed disk (the measured guest has none).
DISK_MODULES = ["sealvm.core.diskseal", "sealvm.core.devices.virtio.blk", "sealvm.wire.witness"]
# Loaded by a core only when its guest is a Linux kernel (the rng guest is an ELF image):
# the boot protocols (bzImage, PVH vmlinux), the ACPI tables and the irqchip/irqfd bindings.
LINUX_GUEST_MODULES = ["sealvm.core.boot.bzimage", "sealvm.core.boot.vmlinux", "sealvm.core.boot.acpi",
                       "sealvm.core.kvm.state", "sealvm.core.kvm.state_structs"]
# Loaded by an attested core before seccomp, for snapshots and restores.
SNAPSHOT_PATH_MODULES = ["sealvm.core.snapshot", "sealvm.core.migration", "sealvm.core.vmstate", "sealvm.core.vmstate_devices",
                         "sealvm.core.kvm.state", "sealvm.core.kvm.state_structs",
                         "sealvm.wire.sealed", "sealvm.wire.sealed_layout"]
# The two-step boot stage: gone before the guest's first instruction.
PREBOOT_MODULES = ["sealvm.preboot.entry", "sealvm.preboot.main", "sealvm.owner.client",
                   "sealvm.wire.bootchannel", "sealvm.wire.attest", "sealvm.preboot.tpm"]


def count_lines(path: str | os.PathLike) -> int:
    """Non-blank, non-comment lines, not counting docstrings."""
    src = Path(path).read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                docs.update(range(first.lineno, first.end_lineno + 1))
    return sum(1 for i, line in enumerate(src.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in docs)


def module_file(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return spec.origin if spec and spec.origin and spec.origin.endswith(".py") else None


def running_core_modules(guest: str = "guests/build/rng.elf") -> list[str]:
    """Modules a real core has loaded with its guest running (from its own report)."""
    from sealvm.host.corelink import CoreLink
    from sealvm.launcher.spawn import spawn_core

    run_dir = tempfile.mkdtemp(prefix="sealvm-tcb-")
    os.chmod(run_dir, 0o711)
    handle = spawn_core("tcb", memory_mib=64, run_dir=run_dir, host_uid=os.getuid(),
                        insecure_same_uid=os.geteuid() != 0)
    names: list[str] = []
    done = threading.Event()

    class Capture(CoreLink):
        def _event(self, msg):
            f = msg.fields
            if "message" in f and f["message"].startswith("modules: "):
                names.extend(f["message"][len("modules: "):].split())
                done.set()
            super()._event(msg)
    link = Capture("tcb", handle.portal, None)
    try:
        link.hello()
        link.load_image((ROOT / guest).read_bytes())
        link.configure(64, 1, "pvh", 1, "count=4")
        link.start()
        done.wait(20)
        threading.Event().wait(0.3)   # the list may come in several LOG events
    finally:
        try:
            link.stop()
        except Exception:
            pass
        link.close()
        handle.process.wait(10)
    if not names:
        raise RuntimeError("the core did not report its modules")
    return sorted(set(names))


def measure() -> dict:
    # The core's __main__ is its entry script, sealvm/core/entry.py.
    modules = ["sealvm.core.entry" if m == "__main__" else m for m in running_core_modules()]
    project = sorted(set(m for m in modules if m.split(".")[0] == "sealvm")
                     | set(ATTESTED_PATH_MODULES) | set(SNAPSHOT_PATH_MODULES)
                     | set(DISK_MODULES) | set(LINUX_GUEST_MODULES) | set(NET_MODULES))
    stdlib = sorted(m for m in modules if m.split(".")[0] in sys.stdlib_module_names)
    outside = sorted({m.split(".")[0] for m in modules
                      if m.split(".")[0] != "sealvm" and m not in stdlib}
                     | {"cryptography (attested VMs only)"})
    per_module = {m: count_lines(module_file(m)) for m in project if module_file(m)}
    launcher = {m: count_lines(module_file(m)) for m in LAUNCHER_MODULES}
    subsystems: dict[str, int] = {}
    for m, n in {**per_module, **launcher}.items():
        parts = m.split(".") + [""]
        key = ".".join(parts[:3]) if parts[1] == "core" and len(parts) > 4 else ".".join(parts[:2])
        if parts[1] == "core" and len(parts) == 4:
            key = "sealvm.core (run loop, service)"
        key = key.rstrip(".") or "sealvm"
        subsystems[key] = subsystems.get(key, 0) + n
    from sealvm.wire.portal import EVENT_OPS, REQUEST_OPS
    core_total = sum(per_module.values())
    total = core_total + sum(launcher.values())
    preboot = {m: count_lines(module_file(m)) for m in PREBOOT_MODULES}
    boot_only = sum(n for m, n in preboot.items() if m not in per_module)
    return {"core_lines": core_total, "launcher_lines": sum(launcher.values()), "total": total,
            "budget": TCB_BUDGET, "subsystems": dict(sorted(subsystems.items())),
            "modules": per_module, "launcher": launcher, "outside_project": outside,
            "stdlib": stdlib,
            "preboot": preboot, "boot_tcb": core_total + boot_only + sum(launcher.values()),
            "portal_requests": sorted(op.name for op in REQUEST_OPS),
            "portal_events": sorted(op.name for op in EVENT_OPS)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="sealvm-tcb", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the numbers to FILE")
    p.add_argument("--check", action="store_true", help="exit 1 when over budget")
    a = p.parse_args(argv)
    r = measure()
    print(f"{'subsystem':<40} {'lines':>6}")
    for k, v in r["subsystems"].items():
        print(f"{k:<40} {v:>6}")
    print(f"{'core (modules a running core loaded)':<40} {r['core_lines']:>6}")
    print(f"{'launcher':<40} {r['launcher_lines']:>6}")
    print(f"{'RUNTIME TCB: core + launcher (budget ' + str(r['budget']) + ')':<40} {r['total']:>6}")
    print(f"{'BOOT TCB: runtime + preboot stage':<40} {r['boot_tcb']:>6}  (preboot also loads "
          f"httpx)")
    print(f"loaded from outside the project: {', '.join(r['outside_project']) or 'nothing'} "
          f"(besides {len(r['stdlib'])} standard-library modules)")
    print(f"portal operations: {len(r['portal_requests'])} requests "
          f"({', '.join(r['portal_requests'])}) + {len(r['portal_events'])} events")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    if a.check and r["total"] > r["budget"]:
        print(f"over budget by {r['total'] - r['budget']} lines", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

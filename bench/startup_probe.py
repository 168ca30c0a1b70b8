"""Runs `sealvm run ...` exactly as the CLI does, stamping where the time goes.

Usage: python bench/startup_probe.py run GUEST.elf [sealvm run options]

It wraps (never changes) the steps of sealvm.cli.main: importing the CLI,
parsing the arguments, and, when this process builds the VM itself, opening
/dev/kvm, guest RAM, devices, loading the image, vCPUs, the first console
byte, the guest's exit and the clean-up; when another process (the core)
builds it, the front's preflight, spawning the core and each portal request
(hello, image, configure, start).  Modules are patched only if and when the
CLI imports them, so the probe adds no imports of its own.
The stamps are time.monotonic() (CLOCK_MONOTONIC, the parent's clock too)
and go to stderr as one line `STARTUP-PROBE {json}` at the end; the parent
adds the spawn, the first byte on its pipe and the reaping of the process.
"""
import time

T = {"interpreter_ready": time.monotonic()}

import importlib.machinery  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

# The tree whose sealvm package runs (the benchmark's --sealvm-root, or a
# byte-compiled copy of it); this checkout by default.
sys.path.insert(0, os.environ.get("SEALVM_BENCH_PATH")
                or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stamp(name: str) -> None:
    T.setdefault(name, time.monotonic())


def wrap(owner, attr: str, before: str, after: str) -> None:
    fn = getattr(owner, attr)

    def wrapper(*a, **kw):
        stamp(before)
        try:
            return fn(*a, **kw)
        finally:
            stamp(after)
    setattr(owner, attr, wrapper)


def patch_machine(M) -> None:
    """Stamps inside sealvm.core.machine (called right after the CLI imports it)."""
    stamp("machine_imported")
    wrap(M, "Kvm", "kvm_open0", "kvm_open1")
    wrap(M, "load_guest", "load0", "load1")
    wrap(M.Machine, "_add_devices", "devices0", "devices1")
    wrap(M.Machine, "build", "build0", "build1")
    wrap(M.Machine, "start", "start0", "start1")
    gm = M.GuestMemory
    create = gm.create.__func__

    def create_stamped(cls, *a, **kw):
        stamp("ram0")
        try:
            return create(cls, *a, **kw)
        finally:
            stamp("ram1")
    gm.create = classmethod(create_stamped)
    init, on_stop = M.Machine.__init__, M.Machine._on_stop

    def machine_init(self, config, console, *a, **kw):
        def first_write(data):
            stamp("first_console_write")
            console(data)
        init(self, config, first_write, *a, **kw)

    def machine_stop(self, *a, **kw):
        stamp("vm_stop")
        return on_stop(self, *a, **kw)
    M.Machine.__init__ = machine_init
    M.Machine._on_stop = machine_stop


def patch_oneshot(O) -> None:
    """Stamps in the front process of a monitor split into processes (sealvm.host.oneshot)."""
    stamp("oneshot_imported")
    if hasattr(O, "preflight"):
        wrap(O, "preflight", "preflight0", "preflight1")
    if hasattr(O, "spawn_core"):
        wrap(O, "spawn_core", "spawn0", "spawn1")
    if hasattr(O, "CoreLink"):
        patch_corelink(O)


def patch_corelink(L) -> None:
    """Stamps around each portal request of the front process (sealvm.host.corelink)."""
    link = L.CoreLink
    if getattr(link, "_probe_patched", False):
        return
    link._probe_patched = True
    for name in ("hello", "load_image", "configure", "start"):
        if hasattr(link, name):
            wrap(link, name, f"{name}0", f"{name}1")


class PatchOnImport:
    """A meta-path finder that calls `patch(module)` once `name` has been executed."""

    def __init__(self, name: str, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.patch(module)
        spec.loader.exec_module = exec_module
        return spec


def main() -> int:
    sys.meta_path.insert(0, PatchOnImport("sealvm.core.machine", patch_machine))
    sys.meta_path.insert(0, PatchOnImport("sealvm.host.oneshot", patch_oneshot))
    sys.meta_path.insert(0, PatchOnImport("sealvm.host.corelink", patch_corelink))
    import argparse
    import sealvm.cli as cli
    stamp("cli_imported")
    parse = argparse.ArgumentParser.parse_args

    def parse_stamped(self, *a, **kw):
        try:
            return parse(self, *a, **kw)
        finally:
            stamp("args_parsed")
    argparse.ArgumentParser.parse_args = parse_stamped
    rc = cli.main(sys.argv[1:])
    stamp("main_returned")
    return rc


if __name__ == "__main__":
    rc = main()
    import json
    print("STARTUP-PROBE " + json.dumps(T), file=sys.stderr, flush=True)
    sys.exit(rc)

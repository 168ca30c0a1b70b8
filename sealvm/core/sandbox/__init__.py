"""The core's process sandbox: what a running core may still do, and nothing more.

The core calls

    harden_process(mlock_limit_needed=..., keep_fds=...)   # not dumpable, no_new_privs,
                                                           # memlock checked, fds closed
    lock_memory(ram) / dont_dump(ram)                      # secrets out of swap and dumps
    install_core_filter()                                  # seccomp allow-list, all threads

Modules: bpf (assembler), policy (the allow-list and its reasons), seccomp
(installing), runtime (tracebacks without opening files), process (dumpable,
no_new_privs, fds, rlimit), memlock (mlock, MADV_DONTDUMP), switches (test-only
switches that turn single defences off for paired tests), libc (ctypes calls),
and probe (what this machine allows: host side, never loaded by the core).

Everything the core will run after the filter must be imported and every file
it needs opened before install_core_filter(): opening a file, importing a new
module, making a socket or a process kills it with SIGSYS (logged by the kernel).
"""
from __future__ import annotations

from .libc import SandboxError
from .memlock import dont_dump, lock_memory
from .process import close_other_fds, harden_process
from .seccomp import install_core_filter
from .switches import DEFENCES, disabled_defences


def __getattr__(name: str):
    """probe_capabilities / capability_problems, loaded only when the host asks for them."""
    if name in ("probe_capabilities", "capability_problems"):
        from . import probe
        return getattr(probe, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The core's process sandbox: what a running core may still do, and nothing more.

After `Machine.build()` and before the guest starts, the core calls

    harden_process(mlock_limit_needed=..., keep_fds=...)   # not dumpable, no_new_privs,
                                                           # memlock checked, fds closed
    lock_memory(ram) / dont_dump(ram) / lock_all_memory()  # secrets out of swap and dumps
    install_core_filter()                                  # seccomp allow-list, all threads

`probe_capabilities()` says at start what this machine allows;
`raise_memlock_limit()` is for the root launcher before it drops privileges.
Test-only switches (`switches.py`) turn single defences off for paired tests.

Modules: bpf (assembler), syscalls (x86-64 numbers), policy (the allow-list and
its reasons), seccomp (installing), runtime (tracebacks without opening files),
process (dumpable, no_new_privs, fds, rlimit), memlock (mlock, MADV_DONTDUMP),
switches, probe, libc (ctypes calls).

Everything the core will run after the filter must be imported and every file
it needs opened before install_core_filter(): opening a file, importing a new
module, making a socket or a process kills it with SIGSYS (logged by the kernel).
"""
from __future__ import annotations

from .bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS, ArgCheck, SyscallRule, assemble
from .libc import SandboxError
from .memlock import dont_dump, lock_all_memory, lock_memory
from .policy import CORE_ALLOWED_SYSCALLS, NOTABLY_DENIED, core_program, core_rules
from .probe import capability_problems, probe_capabilities
from .process import (HardeningReport, check_memlock_limit, close_other_fds, harden_process,
                      raise_memlock_limit)
from .runtime import prepare_runtime
from .seccomp import install_core_filter, install_filter, seccomp_mode
from .switches import DEFENCES, disabled_defences

__all__ = [
    "SECCOMP_RET_ALLOW", "SECCOMP_RET_KILL_PROCESS", "ArgCheck", "SyscallRule", "assemble",
    "SandboxError", "dont_dump", "lock_all_memory", "lock_memory", "CORE_ALLOWED_SYSCALLS",
    "NOTABLY_DENIED", "core_program", "core_rules", "capability_problems",
    "probe_capabilities", "HardeningReport", "check_memlock_limit", "close_other_fds",
    "harden_process", "raise_memlock_limit", "install_core_filter", "install_filter",
    "seccomp_mode", "DEFENCES", "disabled_defences", "prepare_runtime",
]

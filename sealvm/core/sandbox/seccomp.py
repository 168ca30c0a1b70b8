"""Installing seccomp filters: seccomp(2) with TSYNC and LOG.

The core installs its filter once, after setup, when its vCPU and queue threads
may already exist: SECCOMP_FILTER_FLAG_TSYNC applies it to every thread
atomically (or fails naming the thread that could not be synchronised).  The
kernel logs every kill (audit / dmesg: pid, syscall number, ip), so a denied call
is visible rather than a mystery death; SECCOMP_FILTER_FLAG_LOG extends that to
every non-allow action (the clone3 ENOSYS answers).  The filter is permanent
and inherited; it can only be narrowed by stacking more filters.
"""
from __future__ import annotations

import errno
import os

from .bpf import CompiledFilter, Insn
from .libc import SandboxError, raw_syscall
from .policy import core_program
from .runtime import prepare_runtime
from .switches import disabled

SYS_SECCOMP = 317
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2


def install_filter(insns: list[Insn], *, tsync: bool = True, log: bool = True) -> None:
    """Install `insns` as a seccomp filter on this process (all threads with `tsync`).

    Needs no_new_privs (or CAP_SYS_ADMIN).  Raises SandboxError if the kernel
    refuses; never returns with the filter silently missing.
    """
    prog = CompiledFilter(insns)
    flags = (SECCOMP_FILTER_FLAG_TSYNC if tsync else 0) | (SECCOMP_FILTER_FLAG_LOG if log else 0)
    # SAFETY: prog.pointer() is the address of a sock_fprog whose filter array `prog` keeps alive.
    r, err = raw_syscall(SYS_SECCOMP, SECCOMP_SET_MODE_FILTER, flags, prog.pointer())
    if r == 0:
        return
    if r > 0:
        raise SandboxError(errno.EBUSY, f"seccomp TSYNC failed: thread {r} has a different "
                                        "filter or mode and could not be synchronised")
    if err == errno.EACCES:
        raise SandboxError(err, "seccomp filter refused: set no_new_privs first "
                                "(harden_process does) or run with CAP_SYS_ADMIN")
    raise SandboxError(err, f"seccomp(SET_MODE_FILTER) failed: {os.strerror(err)} (needs "
                            "Linux 4.14+ with CONFIG_SECCOMP_FILTER)")


def install_core_filter(*, log: bool = True) -> bool:
    """Install the running core's allow-list (policy.CORE_ALLOWED_SYSCALLS) on all threads.

    Call after Machine.build() and harden_process(), before the guest starts.
    Tracebacks are first made file-free (runtime.prepare_runtime), so a logged
    exception cannot trip the filter.  `log` asks the kernel to log every
    action but allow.  Returns False only when the test switch disabled seccomp.
    """
    if disabled("seccomp"):
        return False
    prepare_runtime()
    install_filter(core_program(os.getpid()), tsync=True, log=log)
    return True

"""Installing seccomp filters: seccomp(2) with TSYNC and LOG, prctl as fallback.

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
from typing import Iterable

from .bpf import CompiledFilter, Insn
from .libc import PR_SET_SECCOMP, SandboxError, prctl, raw_syscall
from .policy import core_program
from .runtime import prepare_runtime
from .switches import disabled
from .syscalls import number

SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
SECCOMP_MODE_FILTER = 2


def thread_count() -> int:
    """Threads of this process (from /proc/self/task; 0 when /proc is unavailable)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def seccomp_mode() -> int:
    """This thread's seccomp mode from /proc/self/status (0 none, 1 strict, 2 filter)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0


def _seccomp(flags: int, prog: CompiledFilter) -> tuple[int, int]:
    # SAFETY: prog.pointer() is the address of a sock_fprog whose filter array `prog` keeps alive.
    return raw_syscall(number("seccomp"), SECCOMP_SET_MODE_FILTER, flags, prog.pointer())


def install_filter(insns: list[Insn], *, tsync: bool = True, log: bool = True) -> None:
    """Install `insns` as a seccomp filter on this process (all threads with `tsync`).

    Needs no_new_privs (or CAP_SYS_ADMIN).  Raises SandboxError if the kernel
    refuses; never returns with the filter silently missing.
    """
    prog = CompiledFilter(insns)
    flags = (SECCOMP_FILTER_FLAG_TSYNC if tsync else 0) | (SECCOMP_FILTER_FLAG_LOG if log else 0)
    r, err = _seccomp(flags, prog)
    if r == -1 and err == errno.EINVAL and log:
        # Kernels before 4.14 know no FLAG_LOG; the filter itself is what matters.
        flags &= ~SECCOMP_FILTER_FLAG_LOG
        r, err = _seccomp(flags, prog)
    if r == 0:
        return
    if r > 0:
        raise SandboxError(errno.EBUSY, f"seccomp TSYNC failed: thread {r} has a different "
                                        "filter or mode and could not be synchronised")
    if err == errno.ENOSYS:
        _install_with_prctl(prog, tsync)
        return
    if err == errno.EACCES:
        raise SandboxError(err, "seccomp filter refused: set no_new_privs first "
                                "(harden_process does) or run with CAP_SYS_ADMIN")
    if err == errno.EINVAL:
        raise SandboxError(err, "the kernel rejected the seccomp filter or its flags "
                                "(is CONFIG_SECCOMP_FILTER enabled?)")
    raise SandboxError(err, f"seccomp(SET_MODE_FILTER) failed: {os.strerror(err)}")


def _install_with_prctl(prog: CompiledFilter, tsync: bool) -> None:
    """prctl(PR_SET_SECCOMP) filters only the calling thread: refuse if there are others."""
    if tsync and thread_count() != 1:
        raise SandboxError(errno.ENOSYS, "no seccomp(2) syscall, and prctl(PR_SET_SECCOMP) "
                                         "cannot filter the other threads: install the filter "
                                         "before any thread starts")
    # SAFETY: the sock_fprog and its array stay alive in `prog` for the duration of the call.
    prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, prog.pointer().value or 0)


def install_core_filter(*, extra: Iterable[str] = (), prepare: bool = True,
                        log: bool = True) -> bool:
    """Install the running core's allow-list (policy.CORE_ALLOWED_SYSCALLS) on all threads.

    Call after Machine.build() and harden_process(), before the guest starts.
    With `prepare` (the default) tracebacks are first made file-free
    (runtime.prepare_runtime), so a logged exception cannot trip the filter.
    `log` asks the kernel to log every action but allow (kills are logged
    anyway; with it, each clone3 answered ENOSYS at thread start is logged too).
    Returns False only when the test switch disabled seccomp.
    """
    if disabled("seccomp"):
        return False
    if prepare:
        prepare_runtime()
    install_filter(core_program(os.getpid(), extra), tsync=True, log=log)
    return True

"""What this machine lets the sandbox do, asked once at start (host side: the core never
imports this).

`probe_capabilities()` answers without changing the calling process: seccomp
is tried for real in a forked child (an errno filter on the harmless getppid),
SECCOMP_RET_KILL_PROCESS is asked about with SECCOMP_GET_ACTION_AVAIL (so
probing leaves no kill in the kernel log), the rest is read from /proc and
getrlimit.
Every value is a boolean "can do", so a caller may refuse on any False;
`capability_problems()` turns the answers into sentences, so `sealvm` can say
what it cannot do and refuse to run a guest unless `--insecure-dev`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import resource

from .bpf import SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS, SyscallRule, assemble, ret_errno
from .libc import (PR_GET_DUMPABLE, PR_GET_NO_NEW_PRIVS, PR_SET_NO_NEW_PRIVS, SandboxError,
                   prctl, raw_syscall)
from .process import CAP_SETGID, CAP_SETUID, CAP_SYS_RESOURCE, has_capability
from .seccomp import SECCOMP_GET_ACTION_AVAIL, SYS_SECCOMP, install_filter

SYS_GETPPID = 110

_CHILD_NNP, _CHILD_INSTALL, _CHILD_ERRNO = 10, 11, 12


def _seccomp_child() -> int:
    """In a forked child: prove a filter installs (with TSYNC) and acts (errno on getppid)."""
    getppid = SYS_GETPPID
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    except SandboxError:
        return _CHILD_NNP
    try:
        install_filter(assemble([SyscallRule(getppid, ret_errno(errno.EDOM))],
                                default=SECCOMP_RET_ALLOW), tsync=True, log=False)
    except SandboxError:
        return _CHILD_INSTALL
    return 0 if raw_syscall(getppid) == (-1, errno.EDOM) else _CHILD_ERRNO


def _probe_filter() -> bool:
    """Whether seccomp filters install and act, tried in a forked child."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _seccomp_child()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _action_available(action: int) -> bool:
    """seccomp(SECCOMP_GET_ACTION_AVAIL): the kernel knows `action` (no kill needed to ask)."""
    value = ctypes.c_uint32(action)
    # SAFETY: the kernel reads one u32 from `value`, a live ctypes object for the whole call.
    r, _ = raw_syscall(SYS_SECCOMP, SECCOMP_GET_ACTION_AVAIL, 0,
                       ctypes.c_void_p(ctypes.addressof(value)))
    return r == 0


def _prctl_works(option: int) -> bool:
    try:
        prctl(option)
        return True
    except SandboxError:
        return False


def _memlock_ok(nbytes: int) -> bool:
    """Whether a core under its own uid can lock `nbytes`: it inherits our hard limit
    (and may raise its soft limit up to it), or the launcher can raise the hard limit."""
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return hard == resource.RLIM_INFINITY or hard >= nbytes or has_capability(CAP_SYS_RESOURCE)


def probe_capabilities(*, mlock_bytes: int = 1 << 20) -> dict[str, bool]:
    """Which defences this machine can provide; every value True means "can".

    seccomp_filter        filters install on all threads (TSYNC) and act (probed in a child)
    seccomp_kill_process  SECCOMP_RET_KILL_PROCESS kills the whole process (probed)
    no_new_privs          PR_SET_NO_NEW_PRIVS is available
    non_dumpable          PR_SET_DUMPABLE is available
    setuid                CAP_SETUID and CAP_SETGID: each core can run under its own uid
    mlock                 a core under its own uid can lock `mlock_bytes` (default: 1 MiB
                          of keys; pass guest RAM + keys to ask about RAM as well)
    """
    filters = _probe_filter()
    return {
        "seccomp_filter": filters,
        "seccomp_kill_process": filters and _action_available(SECCOMP_RET_KILL_PROCESS),
        "no_new_privs": _prctl_works(PR_GET_NO_NEW_PRIVS),
        "non_dumpable": _prctl_works(PR_GET_DUMPABLE),
        "setuid": has_capability(CAP_SETUID) and has_capability(CAP_SETGID),
        "mlock": _memlock_ok(mlock_bytes),
    }


_PROBLEMS = {
    "seccomp_filter": "seccomp filters cannot be installed (kernel without "
                      "CONFIG_SECCOMP_FILTER?): the core would run without a syscall allow-list",
    "seccomp_kill_process": "seccomp cannot kill a whole process "
                            "(SECCOMP_RET_KILL_PROCESS needs Linux 4.14+)",
    "no_new_privs": "PR_SET_NO_NEW_PRIVS is unavailable (Linux 3.5+)",
    "non_dumpable": "PR_SET_DUMPABLE is unavailable: same-uid processes could read the core",
    "setuid": "no CAP_SETUID/CAP_SETGID (not root): cannot run each core under its own uid",
    "mlock": "RLIMIT_MEMLOCK is too low for the core's keys and cannot be raised here "
             "(raising the hard limit needs CAP_SYS_RESOURCE)",
}


def capability_problems(caps: dict[str, bool]) -> list[str]:
    """One sentence per defence this machine cannot provide (empty: all good)."""
    return [_PROBLEMS.get(name, f"cannot {name}") for name, ok in caps.items() if not ok]

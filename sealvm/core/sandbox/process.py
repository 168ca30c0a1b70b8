"""Locking the core process down: not dumpable, no new privileges, few fds.

`harden_process` runs first thing in the core:

* `PR_SET_DUMPABLE=0`: processes of the same uid can no longer ptrace the core
  or open its /proc/<pid>/mem, and a crash writes no core file;
* `PR_SET_NO_NEW_PRIVS=1`: no exec can ever gain privileges again (and it lets
  an unprivileged process install a seccomp filter);
* RLIMIT_MEMLOCK must cover the bytes the core will lock (guest RAM and keys),
  else `SandboxError` says the limit and how to raise it;
* optionally every fd not explicitly kept is closed.

Each step reads its result back: a defence that did not take raises.
"""
from __future__ import annotations

import errno
import os
import resource
from typing import Iterable

from .libc import (PR_GET_DUMPABLE, PR_GET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS,
                   SandboxError, prctl, raw_syscall)
from .memlock import HOW_TO_RAISE, memlock_limit_text
from .switches import disabled

SYS_CLOSE_RANGE = 436
CLOSE_RANGE_MAX = 0xFFFF_FFFF  # ~0U: "to the last possible fd"
CAP_SETGID, CAP_SETUID, CAP_IPC_LOCK, CAP_SYS_RESOURCE = 6, 7, 14, 24


def has_capability(cap: int) -> bool:
    """Whether `cap` is in this process's effective set (CapEff in /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return False


def check_memlock_limit(needed: int) -> None:
    """Refuse (SandboxError) when RLIMIT_MEMLOCK cannot cover `needed` bytes.

    A process with CAP_IPC_LOCK is not bound by the limit (the kernel skips it).
    """
    if needed < 0:
        raise ValueError("mlock_limit_needed must not be negative")
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and soft < needed and not has_capability(CAP_IPC_LOCK):
        raise SandboxError(errno.ENOMEM,
                           f"the core must lock {needed} bytes of memory (guest RAM and keys) but "
                           f"{memlock_limit_text()}; {HOW_TO_RAISE}")


def close_other_fds(keep: Iterable[int]) -> None:
    """Close every file descriptor of this process except those in `keep` (close_range(2)).

    Python objects still wrapping a closed fd must not be used afterwards.
    """
    kept = sorted(set(keep))
    if any(not isinstance(fd, int) or fd < 0 for fd in kept):
        raise ValueError(f"kept fds must be non-negative ints: {kept}")
    if disabled("close_fds"):
        return
    first = 0
    for fd in kept + [CLOSE_RANGE_MAX + 1]:   # close the gap below each kept fd
        if fd > first:
            # SAFETY: close_range takes two fd numbers (unsigned ints) and flags; it reads no memory.
            r, err = raw_syscall(SYS_CLOSE_RANGE, first, fd - 1, 0)
            if r == -1:
                raise SandboxError(err, f"close_range({first}, {fd - 1}) failed: "
                                        f"{os.strerror(err)} (needs Linux 5.9+)")
        first = fd + 1


def harden_process(*, mlock_limit_needed: int, keep_fds: Iterable[int] | None = None) -> None:
    """Make this process non-dumpable and no_new_privs, check its memlock limit.

    `mlock_limit_needed` is how many bytes the core will lock (guest RAM plus
    key material, or 0).  With `keep_fds`, every other fd is closed.  Raises
    SandboxError when a defence cannot be applied.
    """
    if not disabled("dumpable"):
        prctl(PR_SET_DUMPABLE, 0)
        if prctl(PR_GET_DUMPABLE) != 0:
            raise SandboxError(errno.EPERM, "PR_SET_DUMPABLE=0 did not take effect")
    if not disabled("no_new_privs"):
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if prctl(PR_GET_NO_NEW_PRIVS) != 1:
            raise SandboxError(errno.EPERM, "PR_SET_NO_NEW_PRIVS=1 did not take effect")
    if not disabled("memlock_check"):
        check_memlock_limit(mlock_limit_needed)
    if keep_fds is not None:
        close_other_fds(keep_fds)

"""Locking the core process down: not dumpable, no new privileges, few fds.

`harden_process` runs after setup and before the guest boots:

* `PR_SET_DUMPABLE=0`: processes of the same uid can no longer ptrace the core
  or open its /proc/<pid>/mem, and a crash writes no core file;
* `PR_SET_NO_NEW_PRIVS=1`: no exec can ever gain privileges again (and it lets
  an unprivileged process install a seccomp filter);
* RLIMIT_MEMLOCK must cover the bytes the core will lock (guest RAM and keys),
  else `SandboxError` says the limit and how to raise it;
* optionally every fd not explicitly kept is closed.

Each step reads its result back, so the report states what is true, not what
was asked for.
"""
from __future__ import annotations

import errno
import os
import resource
from dataclasses import dataclass
from typing import Iterable

from .libc import (PR_GET_DUMPABLE, PR_GET_NO_NEW_PRIVS, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS,
                   SandboxError, prctl, raw_syscall)
from .memlock import HOW_TO_RAISE, memlock_limit_text
from .switches import disabled, disabled_defences
from .syscalls import number

CLOSE_RANGE_MAX = 0xFFFF_FFFF  # ~0U: "to the last possible fd"
CAP_SETGID, CAP_SETUID, CAP_IPC_LOCK, CAP_SYS_RESOURCE = 6, 7, 14, 24


@dataclass(frozen=True)
class HardeningReport:
    """What harden_process left in place (read back from the kernel)."""
    dumpable: bool                # False: the core is not dumpable (the defence is on)
    no_new_privs: bool
    memlock_limit: int | None     # soft RLIMIT_MEMLOCK in bytes; None = unlimited
    memlock_needed: int
    fds_closed: bool
    disabled: tuple[str, ...]     # defences switched off for a test (empty in production)


def is_dumpable() -> bool:
    return prctl(PR_GET_DUMPABLE) != 0


def has_no_new_privs() -> bool:
    return prctl(PR_GET_NO_NEW_PRIVS) == 1


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


def memlock_soft_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else soft


def check_memlock_limit(needed: int) -> None:
    """Refuse (SandboxError) when RLIMIT_MEMLOCK cannot cover `needed` bytes.

    A process with CAP_IPC_LOCK is not bound by the limit (the kernel skips it).
    """
    if needed < 0:
        raise ValueError("mlock_limit_needed must not be negative")
    soft = memlock_soft_limit()
    if soft is not None and soft < needed and not has_capability(CAP_IPC_LOCK):
        raise SandboxError(errno.ENOMEM,
                           f"the core must lock {needed} bytes of memory (guest RAM and keys) but "
                           f"{memlock_limit_text()}; {HOW_TO_RAISE}")


def raise_memlock_limit(nbytes: int) -> tuple[int, int]:
    """Raise RLIMIT_MEMLOCK (soft and, if needed, hard) to at least `nbytes`.

    Raising the hard limit needs CAP_SYS_RESOURCE: call this as root in the
    launcher before dropping to the core's uid.  Returns the new (soft, hard).
    """
    if nbytes < 0:
        raise ValueError("nbytes must not be negative")
    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    new_hard = hard if hard == inf or hard >= nbytes else nbytes
    new_soft = soft if soft == inf or soft >= nbytes else nbytes
    if (new_soft, new_hard) == (soft, hard):
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (new_soft, new_hard))
    except (ValueError, OSError) as e:
        raise SandboxError(errno.EPERM,
                           f"cannot raise RLIMIT_MEMLOCK to {nbytes} bytes "
                           f"({memlock_limit_text()}): {e}; raising the hard limit needs root "
                           "(CAP_SYS_RESOURCE) - do it in the launcher before dropping "
                           "privileges") from None
    return new_soft, new_hard


def _close_gaps(keep: list[int]) -> Iterable[tuple[int, int]]:
    """Inclusive fd ranges between the sorted kept fds, the last open-ended."""
    low = 0
    for fd in keep:
        if fd > low:
            yield low, fd - 1
        low = fd + 1
    yield low, CLOSE_RANGE_MAX


def _close_by_listing(keep: set[int]) -> None:
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = 65536 if soft == resource.RLIM_INFINITY else soft
        names = [str(fd) for fd in range(limit)]
    for name in names:
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # EBADF: the listing's own fd, or never open
                pass


def close_other_fds(keep: Iterable[int]) -> None:
    """Close every file descriptor of this process except those in `keep`.

    Uses close_range(2) over the gaps between kept fds, falling back to
    /proc/self/fd when the kernel lacks it.  Python objects still wrapping a
    closed fd must not be used afterwards.
    """
    kept = sorted(set(keep))
    if any(not isinstance(fd, int) or fd < 0 for fd in kept):
        raise ValueError(f"kept fds must be non-negative ints: {kept}")
    if disabled("close_fds"):
        return
    nr = number("close_range")
    for first, last in _close_gaps(kept):
        # SAFETY: close_range takes two fd numbers (unsigned ints) and flags; it reads no memory.
        r, err = raw_syscall(nr, first, last, 0)
        if r == -1:
            if err in (errno.ENOSYS, errno.EPERM):  # old kernel, or a seccomp policy denying it
                _close_by_listing(set(kept))
                return
            raise SandboxError(err, f"close_range({first}, {last}) failed: {os.strerror(err)}")


def harden_process(*, mlock_limit_needed: int,
                   keep_fds: Iterable[int] | None = None) -> HardeningReport:
    """Make this process non-dumpable and no_new_privs, check its memlock limit.

    `mlock_limit_needed` is how many bytes the core will lock (guest RAM plus
    key material, or 0).  With `keep_fds`, every other fd is closed.  Raises
    SandboxError when a defence cannot be applied.
    """
    if not disabled("dumpable"):
        prctl(PR_SET_DUMPABLE, 0)
        if is_dumpable():
            raise SandboxError(errno.EPERM, "PR_SET_DUMPABLE=0 did not take effect")
    if not disabled("no_new_privs"):
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if not has_no_new_privs():
            raise SandboxError(errno.EPERM, "PR_SET_NO_NEW_PRIVS=1 did not take effect")
    if not disabled("memlock_check"):
        check_memlock_limit(mlock_limit_needed)
    closed = False
    if keep_fds is not None:
        close_other_fds(keep_fds)
        closed = "close_fds" not in disabled_defences()
    return HardeningReport(dumpable=is_dumpable(), no_new_privs=has_no_new_privs(),
                           memlock_limit=memlock_soft_limit(), memlock_needed=mlock_limit_needed,
                           fds_closed=closed, disabled=tuple(sorted(disabled_defences())))

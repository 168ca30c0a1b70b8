"""Keeping secrets out of swap and core dumps: mlock, mlockall, MADV_DONTDUMP.

Guest RAM and key buffers are locked so they are never written to swap, and
marked don't-dump so a crash leaves no copy in a core file.  Locking counts
against RLIMIT_MEMLOCK for an unprivileged core; a failure raises
`SandboxError` saying what the limit is and how to raise it.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import resource

from .libc import SandboxError, libc_function, last_errno, raw_syscall
from .switches import disabled
from .syscalls import number

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
MLOCK_ONFAULT = 1
MADV_DONTDUMP = 16
PAGE_SIZE = mmap.PAGESIZE

# SAFETY: prototypes as in <sys/mman.h>: mlock(void*, size_t), mlockall(int),
# madvise(void*, size_t, int); all return int.
_mlock = libc_function("mlock")
_mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_mlockall = libc_function("mlockall")
_mlockall.argtypes = [ctypes.c_int]
_madvise = libc_function("madvise")
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def memlock_limit_text() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    def fmt(v: int) -> str:
        return "unlimited" if v == resource.RLIM_INFINITY else f"{v} bytes"
    return f"RLIMIT_MEMLOCK is {fmt(soft)} (hard {fmt(hard)})"


HOW_TO_RAISE = ("raise it: the launcher (as root, before dropping privileges) calls "
                "sandbox.raise_memlock_limit(bytes); by hand `ulimit -l KIB` (root), "
                "LimitMEMLOCK= in a systemd unit, or a memlock line in "
                "/etc/security/limits.conf")


def _range_of(target, length: int | None) -> tuple[int, int]:
    """(address, length) of a writable buffer (mmap, bytearray...) or of an address."""
    if isinstance(target, int):
        if length is None or length <= 0:
            raise ValueError("an address needs a positive length")
        return target, length
    size = memoryview(target).nbytes
    length = size if length is None else length
    if not 0 < length <= size:
        raise ValueError(f"length {length} not in 1..{size} (the buffer's size)")
    try:
        # SAFETY: from_buffer exports the buffer only to read its address; the export is
        # dropped before returning, and the caller keeps `target` mapped while it is locked.
        anchor = ctypes.c_char.from_buffer(target)
    except TypeError:
        raise ValueError("lock_memory/dont_dump need a writable buffer or an address") from None
    address = ctypes.addressof(anchor)
    del anchor
    return address, length


def lock_memory(target, length: int | None = None, *, on_fault: bool = False) -> None:
    """mlock(2) `length` bytes of `target` (a writable mmap/buffer, or an int address).

    With `on_fault`, mlock2(MLOCK_ONFAULT): pages are locked as they are first
    touched instead of all being populated now (large guest RAM).
    """
    address, length = _range_of(target, length)
    if disabled("mlock"):
        return
    if on_fault:
        # SAFETY: mlock2 only changes page residency; the kernel rejects unmapped ranges.
        r, err = raw_syscall(number("mlock2"), address, length, MLOCK_ONFAULT)
        if r == 0:
            return
    else:
        # SAFETY: mlock only changes page residency; the kernel rejects ranges that are not mapped.
        if _mlock(ctypes.c_void_p(address), ctypes.c_size_t(length)) == 0:
            return
        err = last_errno()
    what = f"mlock of {length} bytes at {address:#x} failed"
    if err == errno.ENOMEM:
        raise SandboxError(err, f"{what}: over the locked-memory limit ({memlock_limit_text()}) "
                                f"or the range is not mapped; {HOW_TO_RAISE}")
    if err == errno.EPERM:
        raise SandboxError(err, f"{what}: not permitted ({memlock_limit_text()}, "
                                f"no CAP_IPC_LOCK); {HOW_TO_RAISE}")
    if err == errno.EAGAIN:
        raise SandboxError(err, f"{what}: some pages could not be locked (kernel out of memory?)")
    raise SandboxError(err, f"{what}: errno {err}")


def lock_all_memory(*, future: bool = True, on_fault: bool = False) -> None:
    """mlockall(MCL_CURRENT[|MCL_FUTURE][|MCL_ONFAULT]).

    With MCL_FUTURE every later mapping is locked too, including each new
    thread's 8 MiB stack: the limit must cover them or thread creation fails.
    """
    flags = MCL_CURRENT | (MCL_FUTURE if future else 0) | (MCL_ONFAULT if on_fault else 0)
    if disabled("mlock"):
        return
    # SAFETY: mlockall takes only flags; it touches no memory of ours.
    if _mlockall(ctypes.c_int(flags)) == 0:
        return
    err = last_errno()
    if err in (errno.ENOMEM, errno.EPERM, errno.EAGAIN):
        raise SandboxError(err, f"mlockall({flags:#x}) failed: the process's mappings exceed the "
                                f"locked-memory limit ({memlock_limit_text()}); {HOW_TO_RAISE}")
    raise SandboxError(err, f"mlockall({flags:#x}) failed: errno {err}")


def dont_dump(target, length: int | None = None) -> None:
    """madvise(MADV_DONTDUMP) over `target` (start rounded down to its page)."""
    address, length = _range_of(target, length)
    if disabled("dont_dump"):
        return
    start = address & ~(PAGE_SIZE - 1)
    length += address - start
    # SAFETY: MADV_DONTDUMP only sets a VMA flag; the kernel rejects unmapped ranges (ENOMEM).
    if _madvise(ctypes.c_void_p(start), ctypes.c_size_t(length),
                ctypes.c_int(MADV_DONTDUMP)) == 0:
        return
    err = last_errno()
    why = "range not mapped" if err == errno.ENOMEM else os.strerror(err)
    raise SandboxError(err, f"madvise(MADV_DONTDUMP) of {length} bytes at {start:#x} failed: "
                            f"{why}")

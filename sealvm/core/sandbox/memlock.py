"""Keeping secrets out of swap and core dumps: mlock and MADV_DONTDUMP.

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

from .libc import SandboxError, raw_syscall
from .switches import disabled

SYS_MLOCK2 = 325
MLOCK_ONFAULT = 1
MADV_DONTDUMP = 16
PAGE_SIZE = mmap.PAGESIZE

# SAFETY: prototypes as in <sys/mman.h>: mlock(void*, size_t), madvise(void*, size_t, int).
_libc = ctypes.CDLL(None, use_errno=True)
_mlock = _libc.mlock
_mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

HOW_TO_RAISE = ("raise it: the launcher sets it (as root) for each core; by hand `ulimit -l "
                "KIB` (root), LimitMEMLOCK= in a systemd unit, or /etc/security/limits.conf")


def memlock_limit_text() -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    return (f"RLIMIT_MEMLOCK is {'unlimited' if soft == inf else f'{soft} bytes'} "
            f"(hard {'unlimited' if hard == inf else f'{hard} bytes'})")


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
        r, err = raw_syscall(SYS_MLOCK2, address, length, MLOCK_ONFAULT)
    else:
        # SAFETY: mlock only changes page residency; the kernel rejects ranges that are not mapped.
        r = _mlock(ctypes.c_void_p(address), ctypes.c_size_t(length))
        err = ctypes.get_errno()
    if r == 0:
        return
    what = f"mlock of {length} bytes at {address:#x} failed"
    if err in (errno.ENOMEM, errno.EPERM):
        raise SandboxError(err, f"{what}: over the locked-memory limit or not permitted "
                                f"({memlock_limit_text()}), or the range is not mapped; "
                                f"{HOW_TO_RAISE}")
    raise SandboxError(err, f"{what}: {os.strerror(err)}")


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
    err = ctypes.get_errno()
    why = "range not mapped" if err == errno.ENOMEM else os.strerror(err)
    raise SandboxError(err, f"madvise(MADV_DONTDUMP) of {length} bytes at {start:#x} failed: "
                            f"{why}")

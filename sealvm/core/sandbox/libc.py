"""The few libc entry points the sandbox needs, called through ctypes.

Everything here is a thin, checked wrapper: `prctl`, raw `syscall`, and
`SandboxError`, the one exception the sandbox raises.  A failing call becomes a
`SandboxError` whose message names the call, the errno and what to do about it.
"""
from __future__ import annotations

import ctypes
import os

# prctl(2) options (linux/prctl.h).
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39

# SAFETY: CDLL(None) is this process's own libc; use_errno gives a thread-local errno copy.
_libc = ctypes.CDLL(None, use_errno=True)
# SAFETY: prctl returns int, syscall returns long, as declared in <sys/prctl.h>/<unistd.h>.
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class SandboxError(OSError):
    """A defence could not be put in place; the message says why and how to fix it.

    Raised instead of running on unprotected: the core must refuse to start a
    guest it cannot lock down (unless the operator chose `--insecure-dev`).
    """


def prctl(option: int, arg2: int = 0) -> int:
    """prctl(2); returns its result, raises SandboxError on -1."""
    # SAFETY: every prctl option used here takes integer arguments only, passed as unsigned longs.
    r = _prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    if r == -1:
        err = ctypes.get_errno()
        raise SandboxError(err, f"prctl({option:#x}) failed: {os.strerror(err)}")
    return r


def raw_syscall(nr: int, *args: int | ctypes.c_void_p) -> tuple[int, int]:
    """syscall(nr, args...) -> (result, errno); never raises (callers word the error).

    Integer arguments are passed as C longs, ctypes pointers as they are.
    """
    # SAFETY: plain integers become C longs (what the kernel's syscall ABI takes per register).
    cargs = [a if isinstance(a, ctypes.c_void_p) else ctypes.c_long(a) for a in args]
    ctypes.set_errno(0)
    # SAFETY: callers pass the argument count and types the syscall `nr` expects; pointers
    # they pass refer to live ctypes objects that outlive this call.
    r = _syscall(ctypes.c_long(nr), *cargs)
    return r, (ctypes.get_errno() if r == -1 else 0)

"""Calling KVM ioctls through libc, and the errors they raise.

All KVM ioctls go through `libc.ioctl` via ctypes: a `ctypes.CDLL` call
releases the GIL, so vCPU threads run guest code in parallel with the rest of
the monitor, and it does not retry on EINTR (`fcntl.ioctl` does in newer
Pythons), so a signal can kick a vCPU out of KVM_RUN.

Failures raise `KvmError(op, errno)` naming the ioctl.  A KVM_RUN interrupted
by a signal or by `immediate_exit` raises `VcpuInterrupted` instead, which is
deliberately *not* a `KvmError`: it is the normal way a vCPU is stopped.
"""
from __future__ import annotations

import ctypes
import errno as _errno
import os

from .ioctls import ioctl_name


class KvmError(OSError):
    """A KVM ioctl (or a check on its result) failed.

    `op` names the operation (e.g. "KVM_SET_SREGS"); `errno` is the errno
    (0 when the failure is a check of ours, described by `detail`).
    """

    def __init__(self, op: str, err: int, detail: str | None = None):
        text = detail or (os.strerror(err) if err else "failed")
        super().__init__(err, text)
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.op}: [Errno {self.errno}] {self.strerror}" if self.errno else \
            f"{self.op}: {self.strerror}"

    def __reduce__(self):
        return (type(self), (self.op, self.errno, self.detail))


class VcpuInterrupted(Exception):
    """KVM_RUN returned EINTR: a kick (signal or immediate_exit), not a guest exit.

    The caller clears `run_struct.immediate_exit` before running again.
    """


# SAFETY: CDLL(None) is this process's own libc; use_errno gives a thread-local errno copy.
_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int
_c_int, _c_ulong = ctypes.c_int, ctypes.c_ulong


def _ioc_size(request: int) -> int:
    return (request >> 16) & 0x3FFF


def _arg(request: int, arg):
    """The C argument for `arg`, refusing anything the kernel could read or write past."""
    size = _ioc_size(request)
    if arg is None:  # no argument, or a NULL pointer (KVM_SET_SIGNAL_MASK: clear the mask)
        return _c_ulong(0)
    if isinstance(arg, int):
        if size:
            raise ValueError(f"{ioctl_name(request)} takes a {size}-byte buffer, not a value")
        return _c_ulong(arg)
    if ctypes.sizeof(arg) < size:
        raise ValueError(f"{ioctl_name(request)} needs {size} bytes, "
                         f"got a {ctypes.sizeof(arg)}-byte {type(arg).__name__}")
    # SAFETY: `arg` is a live ctypes object at least as large as the size the request encodes.
    return ctypes.byref(arg)


def ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(fd, request, arg) -> non-negative result; raises KvmError on -1.

    `arg` is None (0 / NULL), an int (passed by value; only for requests that
    encode no size) or a ctypes object passed by pointer, at least the size the request
    encodes.  Requests with a flexible array tail (kvm_msrs, kvm_cpuid2, ...)
    need their count field to match the object, which structs.py's builders do.
    """
    a = _arg(request, arg)
    # SAFETY: `a` is a plain value or a pointer to a buffer checked against the request size.
    r = _ioctl(_c_int(fd), _c_ulong(request), a)
    if r < 0:
        raise KvmError(ioctl_name(request), ctypes.get_errno())
    return r


def ioctl_errno(fd: int, request: int, arg) -> tuple[int, int]:
    """Like `ioctl` but returns (result, errno) instead of raising (for probing E2BIG)."""
    a = _arg(request, arg)
    # SAFETY: as in `ioctl`: `a` is a value or a pointer to a buffer checked against the request.
    r = _ioctl(_c_int(fd), _c_ulong(request), a)
    return (r, ctypes.get_errno() if r < 0 else 0)


class RunCall:
    """A prepared KVM_RUN call for one vCPU fd (the hot path: no per-call conversions)."""

    __slots__ = ("_args",)

    def __init__(self, fd: int, request: int):
        self._args = (_c_int(fd), _c_ulong(request), _c_ulong(0))

    def __call__(self) -> None:
        # SAFETY: KVM_RUN takes no argument; KVM writes only into the vCPU's own mmapped kvm_run.
        if _ioctl(*self._args) < 0:
            err = ctypes.get_errno()
            if err == _errno.EINTR:
                raise VcpuInterrupted()
            raise KvmError("KVM_RUN", err)


"""The KVM API sealvm's monitor uses: the system, VM and vCPU fds.

    kvm = Kvm()                       # /dev/kvm, API version 12 checked
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, gpa, size, host_addr)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    reason = vcpu.run()               # or VcpuInterrupted after a kick

All ioctls go through `libc.ioctl` via ctypes: a `ctypes.CDLL` call releases
the GIL, so vCPU threads run guest code in parallel with the rest of the
monitor, and it does not retry on EINTR (`fcntl.ioctl` does in newer
Pythons), so a signal can kick a vCPU out of KVM_RUN.  Failures raise
`KvmError(op, errno)` naming the ioctl.  A KVM_RUN interrupted by a signal or
by `immediate_exit` raises `VcpuInterrupted` instead, which is deliberately
*not* a `KvmError`: it is the normal way a vCPU is stopped.

Kick protocol, from any thread: set `vcpu.run_struct.immediate_exit = 1`
(covers a vCPU thread just about to enter KVM_RUN), then
`signal.pthread_kill(thread, SIG)` for a signal whose handler is installed.
The vCPU thread catches `VcpuInterrupted`, clears `immediate_exit` and
carries on.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import ioctls as K
from . import structs as S

_IOEVENTFD_LENGTHS = (0, 1, 2, 4, 8)


class KvmError(OSError):
    """A KVM ioctl (or a check on its result) failed.

    `op` names the operation (e.g. "KVM_SET_SREGS"); `errno` is the errno
    (0 when the failure is a check of ours, described by `detail`).
    """

    def __init__(self, op: str, err: int, detail: str | None = None):
        super().__init__(err, detail or (os.strerror(err) if err else "failed"))
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        errno_text = f"[Errno {self.errno}] " if self.errno else ""
        return f"{self.op}: {errno_text}{self.strerror}"

    def __reduce__(self):
        return (type(self), (self.op, self.errno, self.detail))


class VcpuInterrupted(Exception):
    """KVM_RUN returned EINTR: a kick (signal or immediate_exit), not a guest exit."""


def exit_name(reason: int) -> str:
    if 0 <= reason < len(K.EXIT_NAMES):
        return f"KVM_EXIT_{K.EXIT_NAMES[reason]}"
    return f"KVM_EXIT_{reason} (unknown)"


# SAFETY: CDLL(None) is this process's own libc; use_errno gives a thread-local errno copy.
_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg=None) -> int:
    """ioctl(fd, request, arg) -> non-negative result; raises KvmError on -1.

    `arg` is None (0), an int (passed by value; only for requests that encode
    no size) or a ctypes object passed by pointer, at least the size the
    request encodes; anything the kernel could read or write past is refused.
    """
    name = K.IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    size = (request >> 16) & 0x3FFF
    if arg is None or isinstance(arg, int):
        if size:
            raise ValueError(f"{name} takes a {size}-byte buffer, not a value")
        c_arg = ctypes.c_ulong(arg or 0)
    elif ctypes.sizeof(arg) < size:
        raise ValueError(f"{name} needs {size} bytes, got a {ctypes.sizeof(arg)}-byte "
                         f"{type(arg).__name__}")
    else:
        # SAFETY: `arg` is a live ctypes object at least as large as the size the request encodes.
        c_arg = ctypes.byref(arg)
    # SAFETY: `c_arg` is a plain value or a pointer to a buffer checked against the request size.
    r = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), c_arg)
    if r < 0:
        raise KvmError(name, ctypes.get_errno())
    return r


class _Fd:
    """An fd this object owns: closed by close() or `with`; EBADF after that."""

    fd = -1

    def _ioctl(self, request: int, arg=None) -> int:
        if self.fd < 0:
            raise KvmError(type(self).__name__, errno.EBADF, "the fd is closed")
        return ioctl(self.fd, request, arg)

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Kvm(_Fd):
    """The KVM system fd.  Opens /dev/kvm (O_RDWR|O_CLOEXEC) unless given an fd,
    which it then owns (closes on close() or when the checks fail).

    Raises OSError (with `strerror`) when the device cannot be opened, and
    KvmError when the kernel speaks another KVM API version than 12.
    """

    def __init__(self, fd: int | None = None, path: str = "/dev/kvm"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd
        try:
            version = self._ioctl(K.KVM_GET_API_VERSION)
            if version != K.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", 0,
                               f"kernel KVM API version {version}, expected {K.KVM_API_VERSION}")
            # Size in bytes of the kvm_run mapping of every vCPU fd.
            self.vcpu_mmap_size = self._ioctl(K.KVM_GET_VCPU_MMAP_SIZE)
            if self.vcpu_mmap_size < ctypes.sizeof(S.kvm_run):
                raise KvmError("KVM_GET_VCPU_MMAP_SIZE", 0, f"kvm_run mapping of "
                               f"{self.vcpu_mmap_size} bytes is smaller than kvm_run")
        except BaseException:
            self.close()
            raise

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a `kvm_cpuid2` (the kernel sets `nent`)."""
        buf = S.kvm_cpuid2_n(K.MAX_CPUID_ENTRIES)(nent=K.MAX_CPUID_ENTRIES)
        # SAFETY: buf holds exactly nent entries; the kernel writes at most nent and lowers it.
        self._ioctl(K.KVM_GET_SUPPORTED_CPUID, buf)
        return buf

    def create_vm(self) -> "VmFd":
        return VmFd(self._ioctl(K.KVM_CREATE_VM, 0), self.vcpu_mmap_size)


class VmFd(_Fd):
    """A VM fd from `Kvm.create_vm()`."""

    def __init__(self, fd: int, vcpu_mmap_size: int):
        self.fd = fd
        self.vcpu_mmap_size = vcpu_mmap_size

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """Map [userspace_addr, +memory_size) of this process at guest_phys_addr.

        memory_size 0 deletes the slot.  The caller keeps the host mapping alive
        for as long as the slot exists (KVM holds only the address).
        """
        r = S.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=guest_phys_addr,
                                          memory_size=memory_size, userspace_addr=userspace_addr)
        try:
            # SAFETY: KVM records the address only; the caller keeps the range mapped (above).
            self._ioctl(K.KVM_SET_USER_MEMORY_REGION, r)
        except KvmError as e:
            raise KvmError(e.op, e.errno, f"{os.strerror(e.errno)} (slot {slot}, flags {flags:#x}, "
                           f"gpa {guest_phys_addr:#x}, size {memory_size:#x})") from None

    def set_tss_addr(self, gpa: int) -> None:
        """Three pages at `gpa` (outside guest RAM) for the TSS that VMX's real-mode emulation uses."""
        self._ioctl(K.KVM_SET_TSS_ADDR, gpa)

    def set_identity_map_addr(self, gpa: int) -> None:
        """One page at `gpa` (outside guest RAM) for VMX's identity page table."""
        # SAFETY: a whole u64; the kernel reads it.
        self._ioctl(K.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(gpa))

    def create_vcpu(self, vcpu_id: int) -> "VcpuFd":
        fd = self._ioctl(K.KVM_CREATE_VCPU, vcpu_id)
        try:
            return VcpuFd(fd, self.vcpu_mmap_size, vcpu_id)
        except BaseException:
            os.close(fd)
            raise

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        """Make a guest write of `length` bytes to `addr` signal eventfd `fd` (no exit).

        With `datamatch`, only writes of that value do.  `pio` selects port I/O
        space.  Deassign with the same arguments and deassign=True.
        """
        if length not in _IOEVENTFD_LENGTHS:
            raise ValueError(f"ioeventfd length must be one of {_IOEVENTFD_LENGTHS}, not {length}")
        if datamatch is not None and length == 0:
            raise ValueError("ioeventfd datamatch needs a non-zero length")
        flags = ((K.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
                 | (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
                 | (K.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0))
        e = S.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        self._ioctl(K.KVM_IOEVENTFD, e)


class VcpuFd(_Fd):
    """A vCPU fd from `VmFd.create_vcpu()`.

    `run_struct` is the `kvm_run` structure laid over the shared mapping and
    `run_buffer` a writable memoryview of the whole mapping (PIO data lives at
    `run_struct.io.data_offset` inside it).
    """

    def __init__(self, fd: int, mmap_size: int, vcpu_id: int = 0):
        self.fd = fd
        self.vcpu_id = vcpu_id
        # SAFETY: KVM backs `mmap_size` (KVM_GET_VCPU_MMAP_SIZE) bytes of the vCPU fd at offset 0.
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # SAFETY: Kvm checked mmap_size >= sizeof(kvm_run), so the struct lies inside the map.
        self.run_struct = S.kvm_run.from_buffer(self._map)
        self.run_buffer = memoryview(self._map)
        # The hot path: KVM_RUN's arguments converted once.
        self._run_args = (ctypes.c_int(fd), ctypes.c_ulong(K.KVM_RUN), ctypes.c_ulong(0))

    def run(self) -> int:
        """Enter the guest; return kvm_run.exit_reason.  Raises VcpuInterrupted on EINTR/EAGAIN."""
        if self.fd < 0:
            raise KvmError("VcpuFd", errno.EBADF, "the fd is closed")
        # SAFETY: KVM_RUN takes no argument; KVM writes only into the vCPU's own mmapped kvm_run.
        if _ioctl(*self._run_args) < 0:
            err = ctypes.get_errno()
            # EAGAIN: a secondary vCPU left its wait for INIT/SIPI; run it again.
            if err in (errno.EINTR, errno.EAGAIN):
                raise VcpuInterrupted()
            raise KvmError("KVM_RUN", err)
        return self.run_struct.exit_reason

    def get_regs(self) -> S.kvm_regs:
        regs = S.kvm_regs()
        self._ioctl(K.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: S.kvm_regs) -> None:
        self._ioctl(K.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        sregs = S.kvm_sregs()
        self._ioctl(K.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        self._ioctl(K.KVM_SET_SREGS, sregs)

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a kvm_cpuid2 (e.g. Kvm.supported_cpuid()).  Needed on
        kvm_pvm before the guest may write EFER."""
        need = ctypes.sizeof(S.kvm_cpuid2) + cpuid.nent * ctypes.sizeof(S.kvm_cpuid_entry2)
        if ctypes.sizeof(cpuid) < need:
            raise ValueError(f"kvm_cpuid2 says {cpuid.nent} entries but holds fewer")
        # SAFETY: the kernel reads nent entries, which we just checked fit in `cpuid`.
        self._ioctl(K.KVM_SET_CPUID2, cpuid)

    def close(self) -> None:
        """Close the fd and unmap kvm_run (unless a caller still holds a view of it)."""
        if self.fd < 0:
            return
        try:
            self.run_buffer.release()
        except BufferError:
            pass  # a slice of it is still in use; the mapping stays until that goes
        self.run_struct = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds run_struct; the mapping goes when that reference does
        super().close()

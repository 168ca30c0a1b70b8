"""`Kvm`: the /dev/kvm system fd (API version, capabilities, CPUID, MSR list, VMs)."""
from __future__ import annotations

import ctypes
import errno
import os

from . import ioctls as K
from . import structs as S
from .raw import KvmError, ioctl, ioctl_errno


class Kvm:
    """The KVM system fd.  Opens /dev/kvm (O_RDWR|O_CLOEXEC) unless given an fd,
    which it then owns (closes on close() or when the version check fails).

    Raises OSError (with `strerror`) when the device cannot be opened, and
    KvmError when the kernel speaks another KVM API version than 12.
    """

    def __init__(self, fd: int | None = None, path: str = "/dev/kvm"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC) if fd is None else fd
        try:
            version = self.api_version()
            if version != K.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", 0,
                               f"kernel KVM API version {version}, expected {K.KVM_API_VERSION}")
            self._mmap_size: int | None = None
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    # ---- queries ---------------------------------------------------------
    def api_version(self) -> int:
        return ioctl(self._fd(), K.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """0 if `cap` is absent, else its value (1 or a capability-specific number)."""
        return ioctl(self._fd(), K.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        """Size in bytes of the kvm_run mapping of every vCPU fd."""
        if self._mmap_size is None:
            size = ioctl(self._fd(), K.KVM_GET_VCPU_MMAP_SIZE)
            if size < ctypes.sizeof(S.kvm_run):
                raise KvmError("KVM_GET_VCPU_MMAP_SIZE", 0,
                               f"kvm_run mapping of {size} bytes is smaller than kvm_run")
            self._mmap_size = size
        return self._mmap_size

    def supported_cpuid(self, max_entries: int = K.MAX_CPUID_ENTRIES):
        """KVM_GET_SUPPORTED_CPUID as a `kvm_cpuid2` holding exactly `nent` entries."""
        n = max_entries
        while True:
            buf = S.kvm_cpuid2_n(n)()
            buf.nent = n
            # SAFETY: buf holds exactly nent = n entries; the kernel writes at most nent.
            r, err = ioctl_errno(self._fd(), K.KVM_GET_SUPPORTED_CPUID, buf)
            if r >= 0:
                break
            if err != errno.E2BIG or n >= 4096:
                raise KvmError("KVM_GET_SUPPORTED_CPUID", err)
            n *= 2
        if buf.nent > n:
            raise KvmError("KVM_GET_SUPPORTED_CPUID", 0, f"kernel reported {buf.nent} > {n} entries")
        return S.make_cpuid2(buf.entries[:buf.nent])

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        probe = S.kvm_msr_list_n(0)()
        # SAFETY: nmsrs = 0: the kernel writes only the header, then fails with E2BIG.
        r, err = ioctl_errno(self._fd(), K.KVM_GET_MSR_INDEX_LIST, probe)
        if r >= 0:
            return []
        if err != errno.E2BIG:
            raise KvmError("KVM_GET_MSR_INDEX_LIST", err)
        n = probe.nmsrs
        buf = S.kvm_msr_list_n(n)()
        buf.nmsrs = n
        # SAFETY: buf holds exactly nmsrs = n indices; the kernel writes at most nmsrs.
        ioctl(self._fd(), K.KVM_GET_MSR_INDEX_LIST, buf)
        if buf.nmsrs > n:
            raise KvmError("KVM_GET_MSR_INDEX_LIST", 0, f"kernel reported {buf.nmsrs} > {n} MSRs")
        return list(buf.indices[:buf.nmsrs])

    # ---- VMs -------------------------------------------------------------
    def create_vm(self, vm_type: int = 0) -> "VmFd":
        from .vm import VmFd
        fd = ioctl(self._fd(), K.KVM_CREATE_VM, vm_type)
        return VmFd(fd, self.vcpu_mmap_size())

    # ---- lifetime --------------------------------------------------------
    def _fd(self) -> int:
        if self.fd < 0:
            raise KvmError("/dev/kvm", errno.EBADF, "the KVM system fd is closed")
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def __enter__(self) -> "Kvm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


"""`VcpuFd`: one vCPU fd, its mmapped kvm_run area, KVM_RUN and the state ioctls.

`run()` is the hot path: a prepared libc.ioctl call (GIL released, no EINTR
retry) that returns the exit reason or raises `VcpuInterrupted` when a kick
(signal and/or `immediate_exit`) made KVM_RUN return EINTR.

Kick protocol, from any thread: `vcpu.kick_prepare()` (sets immediate_exit=1,
which covers a vCPU thread that is just about to enter KVM_RUN), then
`signal.pthread_kill(vcpu_thread_ident, SIG)` for a signal whose handler is
installed (a no-op Python handler is enough).  The vCPU thread catches
`VcpuInterrupted`, sets `run_struct.immediate_exit = 0` and carries on.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal

from . import ioctls as K
from . import structs as S
from .raw import KvmError, RunCall, ioctl


class VcpuFd:
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
        # SAFETY: system.py checked mmap_size >= sizeof(kvm_run), so the struct lies inside the map.
        self.run_struct = S.kvm_run.from_buffer(self._map)
        self.run_buffer = memoryview(self._map)
        self._run = RunCall(fd, K.KVM_RUN)

    # ---- running -----------------------------------------------------------------
    def run(self) -> int:
        """Enter the guest; return kvm_run.exit_reason.  Raises VcpuInterrupted on EINTR."""
        self._run()
        return self.run_struct.exit_reason

    def kick_prepare(self) -> None:
        """Make the current or next KVM_RUN return EINTR at once (then signal the thread)."""
        self.run_struct.immediate_exit = 1

    def kick(self, thread_ident: int, signum: int = signal.SIGUSR1) -> None:
        """kick_prepare() and send `signum` to the vCPU thread (its handler must be installed)."""
        self.kick_prepare()
        signal.pthread_kill(thread_ident, signum)

    def set_signal_mask(self, signals) -> None:
        """KVM_SET_SIGNAL_MASK: signals blocked while in the guest (None: clear the mask)."""
        if signals is None:
            ioctl(self._fd(), K.KVM_SET_SIGNAL_MASK, None)
            return
        m = S.kvm_signal_mask_n(8)(len=8)  # the kernel's sigset_t on x86-64 is 64 bits
        bits = 0
        for s in signals:
            bits |= 1 << (int(s) - 1)
        for i in range(8):
            m.sigset[i] = (bits >> (8 * i)) & 0xFF
        # SAFETY: len = 8 and sigset holds 8 bytes; the kernel reads len bytes.
        ioctl(self._fd(), K.KVM_SET_SIGNAL_MASK, m)

    # ---- registers ---------------------------------------------------------------
    def get_regs(self) -> S.kvm_regs:
        return self._get(K.KVM_GET_REGS, S.kvm_regs)

    def set_regs(self, regs: S.kvm_regs) -> None:
        ioctl(self._fd(), K.KVM_SET_REGS, regs)

    def get_sregs(self) -> S.kvm_sregs:
        return self._get(K.KVM_GET_SREGS, S.kvm_sregs)

    def set_sregs(self, sregs: S.kvm_sregs) -> None:
        ioctl(self._fd(), K.KVM_SET_SREGS, sregs)

    def get_fpu(self) -> S.kvm_fpu:
        return self._get(K.KVM_GET_FPU, S.kvm_fpu)

    def set_fpu(self, fpu: S.kvm_fpu) -> None:
        ioctl(self._fd(), K.KVM_SET_FPU, fpu)

    def get_msrs(self, indices) -> dict[int, int]:
        """Read the given MSRs; raises KvmError naming the first one KVM refused."""
        indices = list(indices)
        m = S.make_msrs(indices)
        # SAFETY: make_msrs sizes the entries array to exactly nmsrs; the kernel uses nmsrs.
        n = ioctl(self._fd(), K.KVM_GET_MSRS, m)
        if n != len(indices):
            raise KvmError("KVM_GET_MSRS", 0, f"MSR {indices[n]:#x} cannot be read "
                           f"({n} of {len(indices)} read)")
        return {e.index: e.data for e in m.entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Write MSRs (index -> value); raises KvmError naming the first one KVM refused."""
        m = S.make_msrs(values)
        # SAFETY: make_msrs sizes the entries array to exactly nmsrs; the kernel uses nmsrs.
        n = ioctl(self._fd(), K.KVM_SET_MSRS, m)
        if n != len(values):
            index = list(values)[n]
            raise KvmError("KVM_SET_MSRS", 0, f"MSR {index:#x} cannot be set to "
                           f"{values[index]:#x} ({n} of {len(values)} set)")

    def get_debugregs(self) -> S.kvm_debugregs:
        return self._get(K.KVM_GET_DEBUGREGS, S.kvm_debugregs)

    def set_debugregs(self, d: S.kvm_debugregs) -> None:
        ioctl(self._fd(), K.KVM_SET_DEBUGREGS, d)

    def get_xsave(self) -> S.kvm_xsave:
        return self._get(K.KVM_GET_XSAVE, S.kvm_xsave)

    def set_xsave(self, x: S.kvm_xsave) -> None:
        ioctl(self._fd(), K.KVM_SET_XSAVE, x)

    def get_xcrs(self) -> S.kvm_xcrs:
        return self._get(K.KVM_GET_XCRS, S.kvm_xcrs)

    def set_xcrs(self, x: S.kvm_xcrs) -> None:
        ioctl(self._fd(), K.KVM_SET_XCRS, x)

    # ---- CPU model, interrupts, events ---------------------------------------------
    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2 with a kvm_cpuid2 (e.g. Kvm.supported_cpuid()).  Needed on
        kvm_pvm before the guest may write EFER."""
        need = ctypes.sizeof(S.kvm_cpuid2) + cpuid.nent * ctypes.sizeof(S.kvm_cpuid_entry2)
        if ctypes.sizeof(cpuid) < need:
            raise ValueError(f"kvm_cpuid2 says {cpuid.nent} entries but holds fewer")
        # SAFETY: the kernel reads nent entries, which we just checked fit in `cpuid`.
        ioctl(self._fd(), K.KVM_SET_CPUID2, cpuid)

    def get_lapic(self) -> S.kvm_lapic_state:
        return self._get(K.KVM_GET_LAPIC, S.kvm_lapic_state)

    def set_lapic(self, lapic: S.kvm_lapic_state) -> None:
        ioctl(self._fd(), K.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> int:
        return self._get(K.KVM_GET_MP_STATE, S.kvm_mp_state).mp_state

    def set_mp_state(self, state: int) -> None:
        ioctl(self._fd(), K.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state=state))

    def get_vcpu_events(self) -> S.kvm_vcpu_events:
        return self._get(K.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events)

    def set_vcpu_events(self, events: S.kvm_vcpu_events) -> None:
        ioctl(self._fd(), K.KVM_SET_VCPU_EVENTS, events)

    def nmi(self) -> None:
        ioctl(self._fd(), K.KVM_NMI)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        if len(args) > 4:
            raise ValueError("KVM_ENABLE_CAP takes at most 4 arguments")
        c = S.kvm_enable_cap(cap=cap, flags=flags)
        for i, a in enumerate(args):
            c.args[i] = a
        ioctl(self._fd(), K.KVM_ENABLE_CAP, c)

    def get_tsc_khz(self) -> int:
        return ioctl(self._fd(), K.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self._fd(), K.KVM_SET_TSC_KHZ, khz)

    # ---- helpers / lifetime --------------------------------------------------------
    def _get(self, request: int, cls):
        obj = cls()
        ioctl(self._fd(), request, obj)
        return obj

    def _fd(self) -> int:
        if self.fd < 0:
            raise KvmError(f"vCPU {self.vcpu_id}", errno.EBADF, "the vCPU fd is closed")
        return self.fd

    def close(self) -> None:
        """Close the fd and unmap kvm_run (if nobody else still holds `run_struct`)."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        try:
            self.run_buffer.release()
        except BufferError:
            pass  # a slice of it is still in use; the mapping stays until that goes
        self.run_struct = None  # type: ignore[assignment]
        self._run = None  # type: ignore[assignment]
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds run_struct; the mapping goes when that reference does
        os.close(fd)

    def __enter__(self) -> "VcpuFd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

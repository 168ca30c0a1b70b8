"""Put a loader-computed `CpuState` into a vCPU (regs and sregs)."""
from __future__ import annotations

import ctypes

from .boot.cpu_state import CpuState, Segment
from .kvm import structs as S
from .kvm.api import VcpuFd

_SEG_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g",
               "avl", "unusable")


def _segment(dst: S.kvm_segment, src: Segment) -> None:
    for name in _SEG_FIELDS:
        setattr(dst, name, getattr(src, name))


def apply_cpu_state(vcpu: VcpuFd, state: CpuState) -> None:
    sregs = vcpu.get_sregs()
    for name, seg in state.segments.items():
        _segment(getattr(sregs, name), seg)
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4 = state.cr0, state.cr2, state.cr3, state.cr4
    sregs.efer = state.efer
    vcpu.set_sregs(sregs)
    regs = S.kvm_regs()
    for name, value in state.regs.items():
        setattr(regs, name, value)
    vcpu.set_regs(regs)


def linux_cpuid(supported, index: int, count: int, tsc_deadline: bool = False):
    """KVM_GET_SUPPORTED_CPUID as vCPU `index` of `count` shows it to Linux: the
    hypervisor bit set (so the kernel finds kvm-clock), this vCPU's APIC ID, and
    the TSC-deadline timer when the in-kernel LAPIC has it (KVM reports that as a
    capability, not in the supported CPUID): Linux then needs no LAPIC timer
    calibration, which fails when the guest runs slowly."""
    out = S.kvm_cpuid2_n(supported.nent)(nent=supported.nent)
    for i in range(supported.nent):
        e = out.entries[i]
        ctypes.memmove(ctypes.addressof(e), ctypes.addressof(supported.entries[i]), ctypes.sizeof(e))
        if e.function == 1:
            e.ecx |= 1 << 31 | (1 << 24 if tsc_deadline else 0)
            e.ebx = (e.ebx & 0xFFFF) | min(count, 255) << 16 | index << 24
        elif e.function in (0xB, 0x1F):
            e.edx = index
    return out

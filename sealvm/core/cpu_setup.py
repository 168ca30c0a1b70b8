"""Put a loader-computed `CpuState` into a vCPU (regs and sregs)."""
from __future__ import annotations

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

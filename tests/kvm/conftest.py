"""Fixtures for tests that need /dev/kvm: a `kvm` system fd and tiny long-mode guests."""
from __future__ import annotations

import os
import struct

import pytest

from sealvm.core.kvm.api import Kvm
from sealvm.core.memory import GuestMemory

MiB = 1 << 20
RAM_SIZE = 4 * MiB
CODE_GPA = 0x1000
STACK_TOP = 0x8000
PML4_GPA = 0x9000         # PML4, then one PDPT, then four page directories (0xB000-0xEFFF)
PAGE_PRESENT_RW_USER = 0x7
PAGE_2M = 0x80

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


@pytest.fixture
def kvm():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("no /dev/kvm")
    k = Kvm()
    yield k
    k.close()


def identity_map_4g(mem: GuestMemory) -> None:
    """Identity-map the first 4 GiB with 2 MiB pages (U/S set, so CPL3 may use it too)."""
    pdpt, pd = PML4_GPA + 0x1000, PML4_GPA + 0x2000
    mem.write_u64(PML4_GPA, pdpt | PAGE_PRESENT_RW_USER)
    mem.write(pdpt, struct.pack("<4Q", *((pd + i * 0x1000) | PAGE_PRESENT_RW_USER for i in range(4))))
    mem.write(pd, struct.pack("<2048Q", *((i << 21) | PAGE_2M | PAGE_PRESENT_RW_USER
                                          for i in range(2048))))


def enter_long_mode(vcpu, cpl: int = 0) -> None:
    """Flat 64-bit segments at `cpl`, paging on with identity_map_4g, RIP=CODE_GPA."""
    sregs = vcpu.get_sregs()
    code = sregs.cs
    code.base, code.limit, code.type, code.present = 0, 0xFFFFFFFF, 0xB, 1
    code.dpl, code.db, code.s, code.l, code.g = cpl, 0, 1, 1, 1
    code.selector = 0x23 if cpl == 3 else 0x08
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base, seg.limit, seg.type, seg.present = 0, 0xFFFFFFFF, 0x3, 1
        seg.dpl, seg.db, seg.s, seg.l, seg.g = cpl, 1, 1, 0, 1
        seg.selector = 0x1B if cpl == 3 else 0x10
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = PML4_GPA
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = CODE_GPA, STACK_TOP, 0x2
    vcpu.set_regs(regs)


class Guest:
    """One VM with a memfd RAM slot at GPA 0, one vCPU in long mode, `code` at CODE_GPA.

    `irqchip=True` creates the in-kernel irqchip first; `dirty_log=True` sets the
    slot with KVM_MEM_LOG_DIRTY_PAGES through `self.dirty_log` (a state.DirtyLog).
    Both use sealvm.core.kvm.state, imported only then.
    """

    def __init__(self, kvm: Kvm, code: bytes, *, cpl: int = 0, irqchip: bool = False,
                 dirty_log: bool = False):
        self.kvm = kvm
        self.vm = kvm.create_vm()
        self.mem = GuestMemory.create(RAM_SIZE, "sealvm-test-ram")
        self.vcpu = None
        self.dirty_log = None
        try:
            if irqchip or dirty_log:
                from sealvm.core.kvm import state
                from sealvm.core.kvm import state_structs as SS
                if irqchip:
                    state.create_irqchip(self.vm)
                if dirty_log:
                    self.dirty_log = state.DirtyLog(self.vm)
                    self.dirty_log.set_user_memory_region(0, SS.KVM_MEM_LOG_DIRTY_PAGES, 0,
                                                          RAM_SIZE, self.mem.host_address())
            if self.dirty_log is None:
                self.vm.set_user_memory_region(0, 0, 0, RAM_SIZE, self.mem.host_address())
            identity_map_4g(self.mem)
            self.mem.write(CODE_GPA, code)
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(kvm.supported_cpuid())
            enter_long_mode(self.vcpu, cpl)
        except BaseException:
            self.close()
            raise

    @property
    def run(self):
        return self.vcpu.run_struct

    def close(self) -> None:
        if self.vcpu is not None:
            self.vcpu.close()
        self.vm.close()
        self.mem.close()


@pytest.fixture
def guest(kvm):
    """Factory: guest(code, cpl=0, irqchip=False, dirty_log=False) -> Guest (closed after)."""
    made: list[Guest] = []

    def make(code: bytes, **kw) -> Guest:
        g = Guest(kvm, code, **kw)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()

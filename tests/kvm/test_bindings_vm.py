"""KVM bindings against the real /dev/kvm: eventfds, irqchip, dirty log, vCPU state."""
from __future__ import annotations

import errno
import os
import time

import pytest

from sealvm.core.kvm import ioctls as K
from sealvm.core.kvm import structs as S
from sealvm.core.kvm.api import KvmError, dirty_pages, decode_exit

pytestmark = pytest.mark.kvm

MSR_IA32_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS = 0x10, 0x1B, 0x174
MSR_EFER, MSR_STAR, MSR_LSTAR = 0xC0000080, 0xC0000081, 0xC0000082

# mov $0xd0001000,%ebx ; mov $7,%eax ; mov %eax,(%rbx)        -> ioeventfd A (datamatch 7)
# mov $0xd0002000,%ecx ; mov %eax,(%rcx)                      -> ioeventfd B (any value)
# mov $0x510,%dx ; out %ax,(%dx)                              -> ioeventfd C (port, 2 bytes)
# mov $8,%eax ; mov %eax,(%rbx)                               -> MMIO exit (8 != 7)
# mov $0xf4,%dx ; out %al,(%dx) ; jmp .                       -> PIO exit
IOEVENTFD_BLOB = bytes.fromhex("bb001000d0" "b807000000" "8903" "b90020" "00d0" "8901"
                               "66ba1005" "66ef" "b808000000" "8903" "66baf400" "ee" "ebfe")
# mov $0x200000,%ebx ; movl $0xdeadbeef,(%rbx) ; mov $0xf4,%dx ; out %al,(%dx) ; jmp .
DIRTY_BLOB = bytes.fromhex("bb00002000" "c703efbeadde" "66baf400" "ee" "ebfe")
DIRTY_PAGE = 0x200000 >> 12
SPIN = bytes.fromhex("ebfe")


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_system_queries(kvm):
    assert kvm.api_version() == K.KVM_API_VERSION
    assert kvm.check_extension(K.KVM_CAP_USER_MEMORY) == 1
    assert kvm.vcpu_mmap_size() >= 2 * 4096
    cpuid = kvm.supported_cpuid()
    assert 0 < cpuid.nent <= K.MAX_CPUID_ENTRIES
    assert any(e.function == 0x80000001 for e in cpuid.entries)
    assert MSR_STAR in kvm.msr_index_list()  # (EFER travels in sregs, not in this list)


def test_ioeventfd_signals_without_exit(guest):
    g = guest(IOEVENTFD_BLOB)
    a, b, c = eventfd(), eventfd(), eventfd()
    try:
        g.vm.ioeventfd(a, 0xD0001000, 4, datamatch=7)
        g.vm.ioeventfd(b, 0xD0002000, 4)
        g.vm.ioeventfd(c, 0x510, 2, pio=True)
        reason = g.vcpu.run()
        e = decode_exit(g.run, g.vcpu.run_buffer)
        assert reason == K.KVM_EXIT_MMIO, K.EXIT_REASON_NAMES.get(reason)
        assert (e.phys_addr, e.data, e.is_write) == (0xD0001000, (8).to_bytes(4, "little"), True)
        assert (eventfd_count(a), eventfd_count(b), eventfd_count(c)) == (1, 1, 1)
        assert g.vcpu.run() == K.KVM_EXIT_IO and g.run.io.port == 0xF4
        g.vm.ioeventfd(b, 0xD0002000, 4, deassign=True)
        with pytest.raises(KvmError) as ei:  # not registered any more
            g.vm.ioeventfd(b, 0xD0002000, 4, deassign=True)
        assert ei.value.op == "KVM_IOEVENTFD" and ei.value.errno == errno.ENOENT
        with pytest.raises(ValueError):
            g.vm.ioeventfd(a, 0xD0003000, 3)
    finally:
        for fd in (a, b, c):
            os.close(fd)


def test_irqfd_and_irqchip(kvm):
    vm = kvm.create_vm()
    efd, efd2, rfd = eventfd(), eventfd(), eventfd()
    try:
        vm.create_irqchip()
        vm.create_pit2()
        vcpu = vm.create_vcpu(0)
        vm.irqfd(efd, 5)
        vm.irqfd(efd2, 10, resamplefd=rfd)
        assert vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << 5) == 0
        os.eventfd_write(efd, 1)  # an edge on GSI 5 reaches the in-kernel PIC (asynchronously)
        deadline = time.monotonic() + 2
        while not vm.get_irqchip(K.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << 5):
            assert time.monotonic() < deadline, "irqfd write never reached the PIC"
            time.sleep(0.001)
        vm.irqfd(efd, 5, deassign=True)
        vm.irqfd(efd2, 10, resamplefd=rfd, deassign=True)
        for chip in (K.KVM_IRQCHIP_PIC_MASTER, K.KVM_IRQCHIP_PIC_SLAVE, K.KVM_IRQCHIP_IOAPIC):
            vm.set_irqchip(vm.get_irqchip(chip))
        vm.set_pit2(vm.get_pit2())
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
        assert vm.signal_msi(0xFEE00000, 0x30) >= 0
        routes = []
        for gsi in range(16):
            e = S.kvm_irq_routing_entry(gsi=gsi, type=K.KVM_IRQ_ROUTING_IRQCHIP)
            e.u.irqchip.irqchip, e.u.irqchip.pin = gsi // 8, gsi % 8
            routes.append(e)
        vm.set_gsi_routing(routes)
        vcpu.set_lapic(vcpu.get_lapic())
        vcpu.close()
    finally:
        for fd in (efd, efd2, rfd):
            os.close(fd)
        vm.close()


def test_irqfd_needs_irqchip(kvm):
    vm = kvm.create_vm()
    efd = eventfd()
    try:
        with pytest.raises(KvmError) as ei:
            vm.irqfd(efd, 5)
        assert "KVM_IRQFD" in str(ei.value)
    finally:
        os.close(efd)
        vm.close()


def test_dirty_log_shows_guest_write(guest):
    g = guest(DIRTY_BLOB, dirty_log=True)
    npages = g.mem.size // 4096
    assert len(g.vm.get_dirty_log(0, npages)) == npages // 8
    assert g.vcpu.run() == K.KVM_EXIT_IO
    assert g.mem.read_u32(0x200000) == 0xDEADBEEF
    dirty = dirty_pages(g.vm.get_dirty_log(0))
    assert DIRTY_PAGE in dirty
    assert (0x300000 >> 12) not in dirty
    assert DIRTY_PAGE not in dirty_pages(g.vm.get_dirty_log(0))  # reading reset it
    with pytest.raises(ValueError):
        g.vm.get_dirty_log(0, npages // 2)  # would let the kernel overrun our bitmap


def test_manual_dirty_log_clear(guest):
    g = guest(DIRTY_BLOB, dirty_log=True)
    g.vm.enable_cap(K.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, K.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    assert g.vcpu.run() == K.KVM_EXIT_IO
    bitmap = g.vm.get_dirty_log(0)
    assert DIRTY_PAGE in dirty_pages(bitmap)
    assert DIRTY_PAGE in dirty_pages(g.vm.get_dirty_log(0))  # manual mode: still set
    g.vm.clear_dirty_log(0, 0, g.mem.size // 4096, bitmap)
    assert DIRTY_PAGE not in dirty_pages(g.vm.get_dirty_log(0))


def test_vm_address_setup_and_clock(kvm):
    vm = kvm.create_vm()
    try:
        vm.set_tss_addr(0xFFFBD000)
        vm.set_identity_map_addr(0xFFFBC000)
        c = vm.get_clock()
        vm.set_clock(c.clock)
        assert vm.get_clock().clock >= c.clock
    finally:
        vm.close()


def test_vcpu_state_round_trips(guest):
    g = guest(SPIN)
    v = g.vcpu
    regs = v.get_regs()
    regs.rax = 0x1122334455667788
    v.set_regs(regs)
    assert v.get_regs().rax == 0x1122334455667788
    sregs = v.get_sregs()
    v.set_sregs(sregs)
    assert v.get_sregs().efer & 0x500 == 0x500 and v.get_sregs().cr3 == sregs.cr3
    v.set_fpu(v.get_fpu())
    msrs = v.get_msrs([MSR_IA32_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS, MSR_EFER, MSR_STAR, MSR_LSTAR])
    assert msrs[MSR_EFER] & 0x500 == 0x500
    v.set_msrs({MSR_LSTAR: 0xFFFFFFFF81000000, MSR_SYSENTER_CS: 0x10})
    assert v.get_msrs([MSR_LSTAR, MSR_SYSENTER_CS]) == {MSR_LSTAR: 0xFFFFFFFF81000000,
                                                        MSR_SYSENTER_CS: 0x10}
    with pytest.raises(KvmError) as ei:
        v.get_msrs([MSR_STAR, 0xDEAD0000])
    assert "0xdead0000" in str(ei.value)
    assert v.get_mp_state() == K.KVM_MP_STATE_RUNNABLE
    v.set_mp_state(K.KVM_MP_STATE_RUNNABLE)
    v.set_vcpu_events(v.get_vcpu_events())
    v.set_xsave(v.get_xsave())
    xcrs = v.get_xcrs()
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].xcr == 0 and xcrs.xcrs[0].value & 1
    v.set_xcrs(xcrs)
    v.set_debugregs(v.get_debugregs())
    khz = v.get_tsc_khz()
    assert khz > 0
    v.set_tsc_khz(khz)
    v.set_signal_mask([])
    v.set_signal_mask(None)
    v.kick_prepare()  # the state survives a (kicked) KVM_RUN
    with pytest.raises(Exception):
        v.run()
    g.run.immediate_exit = 0
    assert v.get_regs().rax == 0x1122334455667788


def test_nmi_is_queued(guest):
    g = guest(SPIN)
    g.vcpu.nmi()
    ev = g.vcpu.get_vcpu_events()
    assert ev.nmi.pending or ev.nmi.injected

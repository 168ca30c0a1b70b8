"""The state bindings (sealvm.core.kvm.state) against the real /dev/kvm.

irqfd and the in-kernel irqchip, the dirty log (also in manual-protect mode),
and get/set round trips of every piece of vCPU and VM state a snapshot needs.
Guests are hand-assembled long-mode code from conftest (emulated under kvm_pvm).
"""
from __future__ import annotations

import ctypes
import errno
import os
import time

import pytest

from sealvm.core.kvm import ioctls as K
from sealvm.core.kvm import state
from sealvm.core.kvm import state_structs as SS
from sealvm.core.kvm.api import KvmError
from tests.conftest import needs_kvm

from tests.kvm.conftest import RAM_SIZE

pytestmark = pytest.mark.kvm

MSR_IA32_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS = 0x10, 0x1B, 0x174
MSR_EFER, MSR_STAR, MSR_LSTAR = 0xC0000080, 0xC0000081, 0xC0000082
UNKNOWN_MSR = 0xDEAD0000

# mov $0x200000,%ebx ; movl $0xdeadbeef,(%rbx) ; mov $0xf4,%dx ; out %al,(%dx) ; jmp .
DIRTY_BLOB = bytes.fromhex("bb00002000" "c703efbeadde" "66baf400" "ee" "ebfe")
DIRTY_PAGE = 0x200000 >> 12
SPIN = bytes.fromhex("ebfe")
PIC_CHIPS = (SS.KVM_IRQCHIP_PIC_MASTER, SS.KVM_IRQCHIP_PIC_SLAVE)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def wait_for(predicate, what: str, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def pic_irr(vm, chip: int = SS.KVM_IRQCHIP_PIC_MASTER) -> int:
    return state.get_irqchip(vm, chip).chip.pic.irr


# ---- system and capabilities ------------------------------------------------------------
def test_msr_index_list_and_extensions(kvm):
    msrs = state.msr_index_list(kvm)
    assert MSR_STAR in msrs and MSR_LSTAR in msrs  # (EFER travels in sregs, not in this list)
    assert len(set(msrs)) == len(msrs)
    for cap in (SS.KVM_CAP_IRQCHIP, SS.KVM_CAP_IRQFD, SS.KVM_CAP_MP_STATE, SS.KVM_CAP_VCPU_EVENTS,
                SS.KVM_CAP_XSAVE, SS.KVM_CAP_XCRS, SS.KVM_CAP_DEBUGREGS, SS.KVM_CAP_PIT_STATE2):
        assert state.check_extension(kvm, cap) > 0, cap
    with kvm.create_vm() as vm:
        assert state.check_extension(vm, SS.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) \
            & SS.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        with pytest.raises(KvmError) as ei:
            state.enable_cap(vm, 0xFFFF)
        assert ei.value.op == "KVM_ENABLE_CAP" and ei.value.errno == errno.EINVAL
        with pytest.raises(ValueError):
            state.enable_cap(vm, SS.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 1, 2, 3, 4, 5)


# ---- irqfd, irqchip, PIT, interrupts -----------------------------------------------------
def test_irqfd_raises_the_pic_request_register(guest):
    g = guest(SPIN, irqchip=True)
    efd, efd2, rfd = eventfd(), eventfd(), eventfd()
    try:
        state.irqfd(g.vm, efd, 5)
        state.irqfd(g.vm, efd2, 10, resamplefd=rfd)
        assert pic_irr(g.vm) & (1 << 5) == 0
        os.eventfd_write(efd, 1)  # an edge on GSI 5 reaches the in-kernel PIC (asynchronously)
        wait_for(lambda: pic_irr(g.vm) & (1 << 5), "the irqfd write never reached the PIC")
        state.irqfd(g.vm, efd, 5, deassign=True)
        state.irqfd(g.vm, efd2, 10, resamplefd=rfd, deassign=True)
        with pytest.raises(ValueError):
            state.irqfd(g.vm, -1, 5)
    finally:
        for fd in (efd, efd2, rfd):
            os.close(fd)


def test_irqfd_without_irqchip_fails_clearly(kvm):
    efd = eventfd()
    try:
        with kvm.create_vm() as vm:
            with pytest.raises(KvmError) as ei:
                state.irqfd(vm, efd, 5)
            assert ei.value.op == "KVM_IRQFD" and ei.value.errno
            assert str(ei.value).startswith("KVM_IRQFD: [Errno ")
    finally:
        os.close(efd)


def test_irq_line_and_msi(guest):
    g = guest(SPIN, irqchip=True)
    state.irq_line(g.vm, 4, 1)
    assert pic_irr(g.vm) & (1 << 4)
    state.irq_line(g.vm, 4, 0)
    assert state.signal_msi(g.vm, 0xFEE00000, 0x30) >= 0
    with pytest.raises(ValueError):
        state.irq_line(g.vm, 4, 2)
    with pytest.raises(ValueError):
        state.signal_msi(g.vm, 1 << 64, 0)


def test_irqchip_round_trips(guest):
    g = guest(SPIN, irqchip=True)
    for chip in PIC_CHIPS + (SS.KVM_IRQCHIP_IOAPIC,):
        c = state.get_irqchip(g.vm, chip)
        assert c.chip_id == chip
        state.set_irqchip(g.vm, c)
        assert bytes(state.get_irqchip(g.vm, chip)) == bytes(c)
    pic = state.get_irqchip(g.vm, SS.KVM_IRQCHIP_PIC_MASTER)
    pic.chip.pic.imr = 0xFB
    state.set_irqchip(g.vm, pic)
    assert state.get_irqchip(g.vm, SS.KVM_IRQCHIP_PIC_MASTER).chip.pic.imr == 0xFB
    ioapic = state.get_irqchip(g.vm, SS.KVM_IRQCHIP_IOAPIC)
    assert ioapic.chip.ioapic.base_address == 0xFEC00000
    ioapic.chip.ioapic.redirtbl[3] = (1 << 16) | 0x33   # masked, vector 0x33
    state.set_irqchip(g.vm, ioapic)
    assert state.get_irqchip(g.vm, SS.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[3] \
        == (1 << 16) | 0x33
    with pytest.raises(KvmError) as ei:
        state.get_irqchip(g.vm, SS.KVM_NR_IRQCHIPS)
    assert ei.value.op == "KVM_GET_IRQCHIP"


def test_irqchip_needs_create_irqchip(kvm):
    with kvm.create_vm() as vm:
        with pytest.raises(KvmError) as ei:
            state.get_irqchip(vm, SS.KVM_IRQCHIP_PIC_MASTER)
        assert ei.value.op == "KVM_GET_IRQCHIP"


def test_pit2_round_trips(guest):
    g = guest(SPIN, irqchip=True)
    state.create_pit2(g.vm, SS.KVM_PIT_SPEAKER_DUMMY)
    pit = state.get_pit2(g.vm)
    state.set_pit2(g.vm, pit)
    again = state.get_pit2(g.vm)
    for a, b in zip(pit.channels, again.channels):
        assert (a.count, a.mode, a.rw_mode, a.gate) == (b.count, b.mode, b.rw_mode, b.gate)
    pit.channels[2].gate = 0
    pit.channels[0].mode = 2
    state.set_pit2(g.vm, pit)
    again = state.get_pit2(g.vm)
    assert (again.channels[2].gate, again.channels[0].mode) == (0, 2)
    with pytest.raises(KvmError) as ei:  # only one PIT per VM
        state.create_pit2(g.vm)
    assert ei.value.op == "KVM_CREATE_PIT2"


def test_clock_round_trips(kvm):
    with kvm.create_vm() as vm:
        c = state.get_clock(vm)
        state.set_clock(vm, c)  # flags as read (REALTIME: advance by the time since)
        assert state.get_clock(vm).clock >= c.clock
        later = c.clock + 10**12
        state.set_clock(vm, later)
        assert later <= state.get_clock(vm).clock < later + 10**10
        with pytest.raises(TypeError):
            state.set_clock(vm, SS.kvm_pit_state2())


# ---- dirty log ---------------------------------------------------------------------------
def test_dirty_log_shows_a_guest_write_and_reading_resets_it(guest):
    g = guest(DIRTY_BLOB, dirty_log=True)
    log = g.dirty_log
    npages = RAM_SIZE // 4096
    assert log.slot_pages(0) == npages
    assert len(log.get_dirty_log(0, npages)) == npages // 8
    assert g.vcpu.run() == K.KVM_EXIT_IO
    assert g.mem.read_u32(0x200000) == 0xDEADBEEF
    dirty = state.dirty_pages(log.get_dirty_log(0))
    assert DIRTY_PAGE in dirty
    assert (0x300000 >> 12) not in dirty
    assert DIRTY_PAGE not in state.dirty_pages(log.get_dirty_log(0))  # reading reset it
    with pytest.raises(ValueError):
        log.get_dirty_log(0, npages // 2)  # would let the kernel overrun a bitmap sized for it
    with pytest.raises(ValueError):
        log.get_dirty_log(1)  # a slot it never set


def test_manual_protect_dirty_log_is_cleared_explicitly(guest):
    g = guest(DIRTY_BLOB, dirty_log=True)
    log, npages = g.dirty_log, RAM_SIZE // 4096
    state.enable_cap(g.vm, SS.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                     SS.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    assert g.vcpu.run() == K.KVM_EXIT_IO
    bitmap = log.get_dirty_log(0)
    assert DIRTY_PAGE in state.dirty_pages(bitmap)
    assert DIRTY_PAGE in state.dirty_pages(log.get_dirty_log(0))  # manual mode: still set
    with pytest.raises(ValueError):
        log.clear_dirty_log(0, 0, npages, bitmap[:8])  # too short for npages
    with pytest.raises(ValueError):
        log.clear_dirty_log(0, 64, npages, bitmap)  # runs past the slot
    with pytest.raises(KvmError) as ei:  # first_page must be a multiple of 64
        log.clear_dirty_log(0, 1, 63, bitmap)
    assert ei.value.errno == errno.EINVAL
    # Clear only the 64-page group holding DIRTY_PAGE, by an offset bitmap.
    first = DIRTY_PAGE // 64 * 64
    group = bitmap[first // 8:first // 8 + 8]
    assert DIRTY_PAGE in state.dirty_pages(group, first)
    log.clear_dirty_log(0, first, 64, group)
    assert DIRTY_PAGE not in state.dirty_pages(log.get_dirty_log(0))


def test_dirty_log_of_a_slot_changed_behind_its_back_faults(guest):
    """A stale (too small) slot size makes the kernel hit the guard page: EFAULT, no overrun."""
    g = guest(SPIN)
    extra = g.mem.host_address() + RAM_SIZE // 2
    log = state.DirtyLog(g.vm)
    log.set_user_memory_region(1, SS.KVM_MEM_LOG_DIRTY_PAGES, 1 << 32, 64 * 1024, extra)
    assert len(log.get_dirty_log(1)) == 8
    g.vm.set_user_memory_region(1, 0, 1 << 32, 0, extra)  # deleted and re-made larger, directly
    g.vm.set_user_memory_region(1, SS.KVM_MEM_LOG_DIRTY_PAGES, 1 << 32, RAM_SIZE // 2, extra)
    with pytest.raises(KvmError) as ei:
        log.get_dirty_log(1)
    assert ei.value.op == "KVM_GET_DIRTY_LOG" and ei.value.errno == errno.EFAULT
    log.set_user_memory_region(1, SS.KVM_MEM_LOG_DIRTY_PAGES, 1 << 32, RAM_SIZE // 2, extra)
    assert len(log.get_dirty_log(1)) == RAM_SIZE // 2 // 4096 // 8
    log.set_user_memory_region(1, 0, 1 << 32, 0, extra)
    with pytest.raises(ValueError):
        log.slot_pages(1)


def test_dirty_pages():
    assert state.dirty_pages(b"") == []
    assert state.dirty_pages(b"\x05\x80") == [0, 2, 15]
    assert state.dirty_pages(b"\x00\x01", first_page=64) == [72]


# ---- vCPU state round trips ---------------------------------------------------------------
def test_fpu_round_trips(guest):
    v = guest(SPIN).vcpu
    fpu = state.get_fpu(v)
    fpu.fcw = 0x27F
    fpu.xmm[3][0:4] = [1, 2, 3, 4]
    state.set_fpu(v, fpu)
    back = state.get_fpu(v)
    assert (back.fcw, list(back.xmm[3][0:4])) == (0x27F, [1, 2, 3, 4])
    assert bytes(back) == bytes(fpu)
    with pytest.raises(TypeError):
        state.set_fpu(v, SS.kvm_debugregs())


def test_msrs_round_trip_and_name_the_refused_one(kvm, guest):
    v = guest(SPIN).vcpu
    msrs = state.get_msrs(v, [MSR_IA32_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS, MSR_EFER, MSR_STAR,
                              MSR_LSTAR])
    assert list(msrs) == [MSR_IA32_TSC, MSR_APIC_BASE, MSR_SYSENTER_CS, MSR_EFER, MSR_STAR,
                          MSR_LSTAR]
    assert msrs[MSR_EFER] & 0x500 == 0x500
    state.set_msrs(v, {MSR_LSTAR: 0xFFFFFFFF81000000, MSR_SYSENTER_CS: 0x10})
    assert state.get_msrs(v, [MSR_LSTAR, MSR_SYSENTER_CS]) == {MSR_LSTAR: 0xFFFFFFFF81000000,
                                                               MSR_SYSENTER_CS: 0x10}
    assert state.get_msrs(v, []) == {}
    with pytest.raises(KvmError) as ei:
        state.get_msrs(v, [MSR_STAR, UNKNOWN_MSR])
    assert ei.value.op == "KVM_GET_MSRS" and "MSR 0xdead0000" in str(ei.value)
    assert "1 of 2" in str(ei.value)
    with pytest.raises(KvmError) as ei:
        state.set_msrs(v, {MSR_LSTAR: 0, UNKNOWN_MSR: 5, MSR_STAR: 0})
    assert ei.value.op == "KVM_SET_MSRS" and "MSR 0xdead0000 cannot be set to 0x5" in str(ei.value)
    with pytest.raises(ValueError):  # ctypes would truncate these silently
        state.set_msrs(v, {MSR_LSTAR: 1 << 64})
    with pytest.raises(ValueError):
        state.get_msrs(v, [1 << 32])
    listed = state.msr_index_list(kvm)
    saved = state.get_msrs(v, listed)  # every MSR KVM lists reads back
    assert list(saved) == listed
    # (Writing them all back is the snapshot's business: KVM refuses PV MSRs such as
    # MSR_KVM_ASYNC_PF_INT whose feature the guest's CPUID does not enable.)
    core = {i: saved[i] for i in (MSR_STAR, MSR_LSTAR, 0xC0000083, 0xC0000084, 0xC0000102,
                                  MSR_SYSENTER_CS, 0x175, 0x176, 0x277) if i in saved}
    assert len(core) >= 5
    state.set_msrs(v, core)
    assert state.get_msrs(v, core) == core


def test_lapic_round_trips(guest):
    v = guest(SPIN, irqchip=True).vcpu
    lapic = state.get_lapic(v)
    version = int.from_bytes(bytes(lapic.regs[0x30:0x34]), "little")
    assert version & 0xFF in (0x14, 0x15)  # an integrated APIC
    lapic.regs[0x80] = 0x20  # TPR
    state.set_lapic(v, lapic)
    back = state.get_lapic(v)
    assert (back.regs[0x80], back.regs[0xA0]) == (0x20, 0x20)  # TPR, and PPR follows it
    state.set_lapic(v, back)
    assert bytes(state.get_lapic(v)) == bytes(back)


def test_lapic_needs_irqchip(guest):
    v = guest(SPIN).vcpu
    with pytest.raises(KvmError) as ei:
        state.get_lapic(v)
    assert ei.value.op == "KVM_GET_LAPIC"


def test_mp_state_round_trips(guest):
    v = guest(SPIN, irqchip=True).vcpu
    assert state.get_mp_state(v) == SS.KVM_MP_STATE_RUNNABLE
    state.set_mp_state(v, SS.KVM_MP_STATE_HALTED)
    assert state.get_mp_state(v) == SS.KVM_MP_STATE_HALTED
    state.set_mp_state(v, SS.KVM_MP_STATE_RUNNABLE)
    assert state.get_mp_state(v) == SS.KVM_MP_STATE_RUNNABLE
    plain = guest(SPIN).vcpu  # without an in-kernel LAPIC only RUNNABLE is allowed
    with pytest.raises(KvmError) as ei:
        state.set_mp_state(plain, SS.KVM_MP_STATE_HALTED)
    assert ei.value.op == "KVM_SET_MP_STATE"


def test_vcpu_events_round_trip(guest):
    v = guest(SPIN).vcpu
    ev = state.get_vcpu_events(v)
    state.set_vcpu_events(v, ev)
    assert not ev.nmi.pending and not ev.nmi.injected
    ev.nmi.pending = 1
    ev.flags = SS.KVM_VCPUEVENT_VALID_NMI_PENDING
    state.set_vcpu_events(v, ev)
    back = state.get_vcpu_events(v)
    assert back.nmi.pending or back.nmi.injected


def test_xsave_and_xcrs_round_trip(guest):
    v = guest(SPIN).vcpu
    xsave = state.get_xsave(v)
    state.set_xsave(v, xsave)
    assert bytes(state.get_xsave(v)) == bytes(xsave)
    xsave.region[6] = 0x1F80 | (1 << 15)  # MXCSR (bytes 24..27 of the legacy area), FZ set
    xsave.region[128] |= 1 << 1           # XSTATE_BV.SSE, or KVM takes SSE state as init
    state.set_xsave(v, xsave)
    assert state.get_xsave(v).region[6] == 0x9F80
    xcrs = state.get_xcrs(v)
    assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].xcr == 0 and xcrs.xcrs[0].value & 1  # XCR0.x87
    state.set_xcrs(v, xcrs)
    assert state.get_xcrs(v).xcrs[0].value == xcrs.xcrs[0].value


def test_debugregs_round_trip(guest):
    v = guest(SPIN).vcpu
    d = state.get_debugregs(v)
    d.db[0], d.db[3] = 0x401000, 0x7FFF0000
    state.set_debugregs(v, d)
    back = state.get_debugregs(v)
    assert (back.db[0], back.db[3], back.dr7 & 0xFF) == (0x401000, 0x7FFF0000, d.dr7 & 0xFF)


def test_state_survives_a_kicked_run(guest):
    g = guest(SPIN)
    v = g.vcpu
    state.set_msrs(v, {MSR_LSTAR: 0xFFFFFFFF81234000})
    g.run.immediate_exit = 1
    with pytest.raises(Exception):
        v.run()
    g.run.immediate_exit = 0
    assert state.get_msrs(v, [MSR_LSTAR]) == {MSR_LSTAR: 0xFFFFFFFF81234000}


def test_closed_fds_raise_ebadf(guest):
    g = guest(SPIN)
    g.vcpu.close()
    with pytest.raises(KvmError) as ei:
        state.get_fpu(g.vcpu)
    assert ei.value.errno == errno.EBADF
    g.vm.close()
    with pytest.raises(KvmError) as ei:
        state.get_clock(g.vm)
    assert ei.value.errno == errno.EBADF


def test_struct_sizes_match_the_ioctls():
    # api.ioctl refuses a smaller buffer than a request encodes; each setter gets a whole struct.
    for request, cls in ((SS.KVM_SET_FPU, SS.kvm_fpu), (SS.KVM_SET_XSAVE, SS.kvm_xsave),
                         (SS.KVM_SET_IRQCHIP, SS.kvm_irqchip),
                         (SS.KVM_SET_PIT2, SS.kvm_pit_state2)):
        assert (request >> 16) & 0x3FFF == ctypes.sizeof(cls)


# ---- the running core does not load any of this ------------------------------------------
@needs_kvm
def test_a_running_core_does_not_load_the_state_bindings():
    from sealvm.tools import tcb
    names = tcb.running_core_modules()
    assert any(n.startswith("sealvm.core.kvm.api") for n in names), "no core measured"
    assert not [n for n in names if n.startswith("sealvm.core.kvm.state")], names


# ---- the platform a snapshot of a Linux guest carries -----------------------------------
def test_platform_state_moves_to_a_new_vm(guest):
    """PIC masks, an IOAPIC route, the PIT's mode and a LAPIC register set on one VM are
    captured by vmstate, checked, and restored into a fresh VM with its own irqchip."""
    from sealvm.core import vmstate
    a, b = guest(SPIN, irqchip=True), guest(SPIN, irqchip=True)
    for g in (a, b):
        state.create_pit2(g.vm, SS.KVM_PIT_SPEAKER_DUMMY)
    pic = state.get_irqchip(a.vm, SS.KVM_IRQCHIP_PIC_MASTER)
    pic.chip.pic.imr = 0xA5
    state.set_irqchip(a.vm, pic)
    ioapic = state.get_irqchip(a.vm, SS.KVM_IRQCHIP_IOAPIC)
    ioapic.chip.ioapic.redirtbl[5] = 0x0000_0000_0000_0035
    state.set_irqchip(a.vm, ioapic)
    pit = state.get_pit2(a.vm)
    pit.channels[0].mode, pit.channels[2].gate = 2, 0
    state.set_pit2(a.vm, pit)
    lapic = state.get_lapic(a.vcpu)
    lapic.regs[0x80] = 0x30                               # task priority
    state.set_lapic(a.vcpu, lapic)

    plat = vmstate.capture_platform(a.vm)
    vmstate.check_platform(plat)
    rec = vmstate.capture_vcpu(a.vcpu, (), lapic=True)
    vmstate.restore_platform(b.vm, plat)
    state.set_lapic(b.vcpu, SS.kvm_lapic_state.from_buffer_copy(bytes.fromhex(rec["lapic"])))
    assert state.get_irqchip(b.vm, SS.KVM_IRQCHIP_PIC_MASTER).chip.pic.imr == 0xA5
    assert state.get_irqchip(b.vm, SS.KVM_IRQCHIP_IOAPIC).chip.ioapic.redirtbl[5] == 0x35
    got = state.get_pit2(b.vm)
    assert (got.channels[0].mode, got.channels[2].gate) == (2, 0)
    assert state.get_lapic(b.vcpu).regs[0x80] == 0x30
    assert vmstate.capture_platform(b.vm)["irqchip"][2] == plat["irqchip"][2]


def test_platform_state_is_checked(guest):
    from sealvm.core import vmstate
    a = guest(SPIN, irqchip=True)
    state.create_pit2(a.vm)
    plat = vmstate.capture_platform(a.vm)
    swapped = dict(plat, irqchip=[plat["irqchip"][1], plat["irqchip"][0], plat["irqchip"][2]])
    for bad, why in ((dict(plat, irqchip=plat["irqchip"][:2]), "list of 3"),
                     (swapped, "names another chip"),
                     (dict(plat, pit=plat["pit"][:-2]), "bytes of hex"),
                     (dict(plat, pit="zz" * (len(plat["pit"]) // 2)), "bytes of hex")):
        with pytest.raises(vmstate.VmStateError, match=why):
            vmstate.check_platform(bad)

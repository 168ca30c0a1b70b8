"""KVM state ioctls: vCPU and VM state, irqchip/PIT, irqfd, MSIs, clock, dirty log.

NOT loaded by a running core today: nothing the core imports imports this
module (or `state_structs.py`, its layouts and numbers); the running core
needs only `api.py`.  Snapshot and migration will load it, and the runtime
TCB grows by both modules then (count them with `python -m sealvm.tools.tcb`).

Plain functions over the fd objects of `api.py` (which they never change):

    from sealvm.core.kvm import state, state_structs as S
    fpu = state.get_fpu(vcpu); state.set_fpu(vcpu, fpu)
    msrs = state.get_msrs(vcpu, [0x10, 0xC0000082])   # {index: value}
    state.create_irqchip(vm)                          # before creating vCPUs
    state.irqfd(vm, efd, gsi=5)
    log = state.DirtyLog(vm)                          # knows each slot's size
    log.set_user_memory_region(0, S.KVM_MEM_LOG_DIRTY_PAGES, gpa, size, addr)
    pages = state.dirty_pages(log.get_dirty_log(0))

Failures raise `KvmError` named after the ioctl ("KVM_SET_MSRS: ..."), or
ValueError for an argument that does not fit its C field (ctypes would
silently truncate it).  The dirty bitmap the kernel writes is placed right
before a PROT_NONE page, so even a slot size that is wrong (changed behind
`DirtyLog`'s back) gives EFAULT, never a write past the buffer.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os

from . import state_structs as S
from .api import Kvm, KvmError, VcpuFd, VmFd, ioctl

_PAGE = 4096              # KVM's dirty-log page (x86 TARGET_PAGE_SIZE)
_HOST_PAGE = mmap.PAGESIZE
_PROT_NONE = 0             # <sys/mman.h>; the mmap module has no PROT_NONE before 3.13

# SAFETY: this process's own libc; prototype as in <sys/mman.h>: mprotect(void *, size_t, int).
_mprotect = ctypes.CDLL(None, use_errno=True).mprotect
_mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_mprotect.restype = ctypes.c_int


def _call(owner: Kvm | VmFd | VcpuFd, request: int, arg=None) -> int:
    """api.ioctl on `owner`'s fd, with errors named after the state ioctl."""
    if owner.fd < 0:
        raise KvmError(type(owner).__name__, errno.EBADF, "the fd is closed")
    try:
        # SAFETY: api.ioctl refuses a buffer smaller than the size `request` encodes.
        return ioctl(owner.fd, request, arg)
    except KvmError as e:
        raise KvmError(S.IOCTL_NAMES.get(request, e.op), e.errno, e.detail) from None


def _uint(what: str, value: int, bits: int) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{what} {value!r} does not fit in {bits} unsigned bits")
    return value


def _get(owner: VmFd | VcpuFd, request: int, obj):
    # SAFETY: `obj` is a whole instance of the structure `request` encodes; the kernel fills it.
    _call(owner, request, obj)
    return obj


def _set(owner: VmFd | VcpuFd, request: int, obj, cls) -> None:
    if not isinstance(obj, cls):
        raise TypeError(f"{S.IOCTL_NAMES[request]} takes a {cls.__name__}, "
                        f"not {type(obj).__name__}")
    # SAFETY: `obj` is a whole `cls`, the structure `request` encodes; the kernel reads it.
    _call(owner, request, obj)


# ---- capabilities -------------------------------------------------------------------
def check_extension(owner: Kvm | VmFd, cap: int) -> int:
    """KVM_CHECK_EXTENSION on the system or a VM fd: 0 if absent, else its value."""
    # SAFETY: takes its argument by value; no memory is passed.
    return _call(owner, S.KVM_CHECK_EXTENSION, _uint("capability", cap, 32))


def enable_cap(owner: VmFd | VcpuFd, cap: int, *args: int, flags: int = 0) -> None:
    """KVM_ENABLE_CAP on a VM or vCPU fd with up to 4 arguments."""
    if len(args) > 4:
        raise ValueError(f"KVM_ENABLE_CAP takes at most 4 arguments, not {len(args)}")
    c = S.kvm_enable_cap(cap=_uint("capability", cap, 32), flags=_uint("flags", flags, 32))
    for i, a in enumerate(args):
        c.args[i] = _uint(f"argument {i}", a, 64)
    # SAFETY: a whole kvm_enable_cap; the kernel reads it.
    _call(owner, S.KVM_ENABLE_CAP, c)


# ---- vCPU registers and state ----------------------------------------------------------
def get_fpu(vcpu: VcpuFd) -> S.kvm_fpu:
    """x87 and XMM registers.  KVM leaves `mxcsr` 0 here and KVM_SET_FPU ignores it:
    MXCSR travels in the XSAVE area (get_xsave)."""
    return _get(vcpu, S.KVM_GET_FPU, S.kvm_fpu())


def set_fpu(vcpu: VcpuFd, fpu: S.kvm_fpu) -> None:
    _set(vcpu, S.KVM_SET_FPU, fpu, S.kvm_fpu)


def make_msrs(items: dict[int, int] | list[int]):
    """A filled `kvm_msrs`: from a list of indices (data 0) or a dict index -> value."""
    pairs = list(items.items()) if isinstance(items, dict) else [(i, 0) for i in items]
    m = S.kvm_msrs_n(len(pairs))(nmsrs=len(pairs))
    for e, (index, value) in zip(m.entries, pairs):
        e.index, e.data = _uint("MSR index", index, 32), _uint(f"MSR {index:#x} value", value, 64)
    return m


def get_msrs(vcpu: VcpuFd, indices) -> dict[int, int]:
    """Read MSRs -> {index: value}; KvmError names the first one KVM refused."""
    indices = list(indices)
    m = make_msrs(indices)
    # SAFETY: make_msrs sized `entries` to exactly nmsrs; the kernel reads and writes nmsrs.
    n = _call(vcpu, S.KVM_GET_MSRS, m)
    if n != len(indices):
        refused = f"MSR {indices[n]:#x}" if 0 <= n < len(indices) else "an MSR"
        raise KvmError("KVM_GET_MSRS", 0, f"{refused} cannot be read ({n} of {len(indices)} read)")
    return {e.index: e.data for e in m.entries}


def set_msrs(vcpu: VcpuFd, values: dict[int, int]) -> None:
    """Write MSRs (index -> value); KvmError names the first one KVM refused."""
    m = make_msrs(values)
    # SAFETY: make_msrs sized `entries` to exactly nmsrs; the kernel reads nmsrs.
    n = _call(vcpu, S.KVM_SET_MSRS, m)
    if n != len(values):
        index = list(values)[n] if 0 <= n < len(values) else None
        refused = f"MSR {index:#x} cannot be set to {values[index]:#x}" if index is not None \
            else "an MSR cannot be set"
        raise KvmError("KVM_SET_MSRS", 0, f"{refused} ({n} of {len(values)} set)")


def msr_index_list(kvm: Kvm) -> list[int]:
    """KVM_GET_MSR_INDEX_LIST (system fd): the MSRs KVM saves and restores for a vCPU."""
    probe = S.kvm_msr_list_n(0)(nmsrs=0)
    try:
        # SAFETY: nmsrs = 0: the kernel writes only the header (the count), then fails E2BIG.
        _call(kvm, S.KVM_GET_MSR_INDEX_LIST, probe)
        return []
    except KvmError as e:
        if e.errno != errno.E2BIG:
            raise
    n = probe.nmsrs
    buf = S.kvm_msr_list_n(n)(nmsrs=n)
    # SAFETY: buf holds exactly nmsrs = n indices; the kernel writes at most nmsrs.
    _call(kvm, S.KVM_GET_MSR_INDEX_LIST, buf)
    if buf.nmsrs > n:
        raise KvmError("KVM_GET_MSR_INDEX_LIST", 0, f"the kernel reported {buf.nmsrs} > {n} MSRs")
    return list(buf.indices[:buf.nmsrs])


def get_lapic(vcpu: VcpuFd) -> S.kvm_lapic_state:
    """The in-kernel local APIC's registers (needs create_irqchip)."""
    return _get(vcpu, S.KVM_GET_LAPIC, S.kvm_lapic_state())


def set_lapic(vcpu: VcpuFd, lapic: S.kvm_lapic_state) -> None:
    _set(vcpu, S.KVM_SET_LAPIC, lapic, S.kvm_lapic_state)


def get_mp_state(vcpu: VcpuFd) -> int:
    """KVM_MP_STATE_* of the vCPU."""
    return _get(vcpu, S.KVM_GET_MP_STATE, S.kvm_mp_state()).mp_state


def set_mp_state(vcpu: VcpuFd, mp_state: int) -> None:
    _set(vcpu, S.KVM_SET_MP_STATE, S.kvm_mp_state(mp_state=_uint("mp_state", mp_state, 32)),
         S.kvm_mp_state)


def get_vcpu_events(vcpu: VcpuFd) -> S.kvm_vcpu_events:
    """Pending/injected exception, interrupt, NMI, SMI state (flags: KVM_VCPUEVENT_VALID_*)."""
    return _get(vcpu, S.KVM_GET_VCPU_EVENTS, S.kvm_vcpu_events())


def set_vcpu_events(vcpu: VcpuFd, events: S.kvm_vcpu_events) -> None:
    _set(vcpu, S.KVM_SET_VCPU_EVENTS, events, S.kvm_vcpu_events)


def get_xsave(vcpu: VcpuFd) -> S.kvm_xsave:
    """The 4096-byte XSAVE area (EINVAL if this process enabled larger, AMX, guest state)."""
    return _get(vcpu, S.KVM_GET_XSAVE, S.kvm_xsave())


def set_xsave(vcpu: VcpuFd, xsave: S.kvm_xsave) -> None:
    _set(vcpu, S.KVM_SET_XSAVE, xsave, S.kvm_xsave)


def get_xcrs(vcpu: VcpuFd) -> S.kvm_xcrs:
    return _get(vcpu, S.KVM_GET_XCRS, S.kvm_xcrs())


def set_xcrs(vcpu: VcpuFd, xcrs: S.kvm_xcrs) -> None:
    _set(vcpu, S.KVM_SET_XCRS, xcrs, S.kvm_xcrs)


def get_debugregs(vcpu: VcpuFd) -> S.kvm_debugregs:
    return _get(vcpu, S.KVM_GET_DEBUGREGS, S.kvm_debugregs())


def set_debugregs(vcpu: VcpuFd, debugregs: S.kvm_debugregs) -> None:
    _set(vcpu, S.KVM_SET_DEBUGREGS, debugregs, S.kvm_debugregs)


# ---- in-kernel irqchip, PIT, interrupts ---------------------------------------------------
def create_irqchip(vm: VmFd) -> None:
    """In-kernel PIC, IOAPIC and local APICs.  Call before creating vCPUs."""
    # SAFETY: takes no argument.
    _call(vm, S.KVM_CREATE_IRQCHIP)


def create_pit2(vm: VmFd, flags: int = 0) -> None:
    """In-kernel i8254 PIT (after create_irqchip); flags: KVM_PIT_SPEAKER_DUMMY."""
    # SAFETY: a whole kvm_pit_config; the kernel reads it.
    _call(vm, S.KVM_CREATE_PIT2, S.kvm_pit_config(flags=_uint("PIT flags", flags, 32)))


def get_irqchip(vm: VmFd, chip_id: int) -> S.kvm_irqchip:
    """State of KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC."""
    return _get(vm, S.KVM_GET_IRQCHIP, S.kvm_irqchip(chip_id=_uint("chip id", chip_id, 32)))


def set_irqchip(vm: VmFd, chip: S.kvm_irqchip) -> None:
    _set(vm, S.KVM_SET_IRQCHIP, chip, S.kvm_irqchip)


def get_pit2(vm: VmFd) -> S.kvm_pit_state2:
    return _get(vm, S.KVM_GET_PIT2, S.kvm_pit_state2())


def set_pit2(vm: VmFd, pit: S.kvm_pit_state2) -> None:
    _set(vm, S.KVM_SET_PIT2, pit, S.kvm_pit_state2)


def irq_line(vm: VmFd, irq: int, level: int) -> None:
    """Set in-kernel irqchip input `irq` (a GSI) to `level` (0 or 1)."""
    lv = S.kvm_irq_level(irq=_uint("irq", irq, 32), level=_uint("level", level, 1))
    # SAFETY: a whole kvm_irq_level; the kernel reads it.
    _call(vm, S.KVM_IRQ_LINE, lv)


def signal_msi(vm: VmFd, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
    """Inject an MSI; returns >0 if delivered, 0 if the guest blocked it."""
    _uint("MSI address", address, 64)
    m = S.kvm_msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32,
                  data=_uint("MSI data", data, 32), flags=_uint("MSI flags", flags, 32),
                  devid=_uint("devid", devid, 32))
    # SAFETY: a whole kvm_msi; the kernel reads it.
    return _call(vm, S.KVM_SIGNAL_MSI, m)


def irqfd(vm: VmFd, fd: int, gsi: int, resamplefd: int | None = None,
          deassign: bool = False) -> None:
    """Make a write to eventfd `fd` raise `gsi` on the in-kernel irqchip (no exit).

    With `resamplefd`, the line is level-triggered and KVM signals `resamplefd`
    when the guest EOIs it.  Deassign with the same fd and gsi and deassign=True.
    """
    flags = ((S.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0)
             | (S.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0))
    i = S.kvm_irqfd(fd=_uint("fd", fd, 31), gsi=_uint("gsi", gsi, 32), flags=flags,
                    resamplefd=_uint("resamplefd", resamplefd or 0, 31))
    # SAFETY: a whole kvm_irqfd; the kernel reads it and takes its own references to the fds.
    _call(vm, S.KVM_IRQFD, i)


# ---- clock ---------------------------------------------------------------------------------
def get_clock(vm: VmFd) -> S.kvm_clock_data:
    """kvmclock in ns (`clock`); with KVM_CLOCK_REALTIME/HOST_TSC in `flags`, their readings."""
    return _get(vm, S.KVM_GET_CLOCK, S.kvm_clock_data())


def set_clock(vm: VmFd, clock: S.kvm_clock_data | int) -> None:
    """Set kvmclock from get_clock()'s result (REALTIME flag: advance by the time since) or ns."""
    if isinstance(clock, int):
        clock = S.kvm_clock_data(clock=_uint("clock", clock, 64))
    _set(vm, S.KVM_SET_CLOCK, clock, S.kvm_clock_data)


# ---- dirty log ------------------------------------------------------------------------------
def dirty_pages(bitmap: bytes, first_page: int = 0) -> list[int]:
    """Page numbers whose bits are set in a dirty bitmap (bit i, LSB first -> first_page + i)."""
    pages = []
    for byte_index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            pages.append(first_page + byte_index * 8 + low.bit_length() - 1)
            byte ^= low
    return pages


class DirtyLog:
    """The dirty log of a VmFd's memory slots; set the slots through this object so
    it knows their sizes (a bitmap holds one bit per 4 KiB page of its slot)."""

    def __init__(self, vm: VmFd):
        self.vm = vm
        self._slot_sizes: dict[int, int] = {}

    def set_user_memory_region(self, slot: int, flags: int, guest_phys_addr: int,
                               memory_size: int, userspace_addr: int) -> None:
        """VmFd.set_user_memory_region, recording the slot's size (0 deletes it).

        Flags KVM_MEM_LOG_DIRTY_PAGES turns logging on (also on an existing slot,
        same address and size, which is how a live migration starts)."""
        self.vm.set_user_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        if memory_size:
            self._slot_sizes[slot] = memory_size
        else:
            self._slot_sizes.pop(slot, None)

    def slot_pages(self, slot: int) -> int:
        size = self._slot_sizes.get(slot)
        if size is None:
            raise ValueError(f"slot {slot} was not set through this DirtyLog")
        return (size + _PAGE - 1) // _PAGE

    def get_dirty_log(self, slot: int, npages: int | None = None) -> bytes:
        """KVM_GET_DIRTY_LOG: ceil(pages/64)*8 bytes, bit i = page i of the slot.

        `npages`, if given, must be the slot's page count.  Reading resets the
        log unless KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is enabled (then use
        clear_dirty_log)."""
        pages = self.slot_pages(slot)
        if npages is not None and npages != pages:
            raise ValueError(f"slot {slot} has {pages} pages, not {npages}")
        nbytes = (pages + 63) // 64 * 8
        span = -(-nbytes // _HOST_PAGE) * _HOST_PAGE
        area = mmap.mmap(-1, span + _HOST_PAGE, mmap.MAP_PRIVATE)
        try:
            # SAFETY: a view over our own mapping, dropped (del) before the mapping is closed.
            view = (ctypes.c_char * len(area)).from_buffer(area)
            base = ctypes.addressof(view)
            del view
            # SAFETY: the last page of our own page-aligned mapping becomes PROT_NONE.
            if _mprotect(base + span, _HOST_PAGE, _PROT_NONE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mprotect of the dirty bitmap's guard page: {os.strerror(err)}")
            d = S.kvm_dirty_log(slot=_uint("slot", slot, 32), dirty_bitmap=base + span - nbytes)
            # SAFETY: the kernel writes the slot's `nbytes`, ending at the guard page (more: EFAULT).
            _call(self.vm, S.KVM_GET_DIRTY_LOG, d)
            return area[span - nbytes:span]
        finally:
            area.close()

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG (manual-protect mode): re-protect the pages whose bits
        are set in `bitmap` (bit i = page first_page + i).  first_page is a multiple
        of 64; num_pages too unless the range reaches the slot's end."""
        pages = self.slot_pages(slot)
        _uint("first_page", first_page, 64)
        _uint("num_pages", num_pages, 32)
        if first_page + num_pages > pages:
            raise ValueError(f"pages {first_page}+{num_pages} lie outside slot {slot} "
                             f"({pages} pages)")
        need = (num_pages + 63) // 64 * 8
        if len(bitmap) < need:
            raise ValueError(f"a bitmap of {len(bitmap)} bytes is short of {need} for "
                             f"{num_pages} pages")
        buf = ctypes.create_string_buffer(bytes(bitmap[:need]), max(need, 1))
        # SAFETY: the address of `buf`, which stays alive (a local) until the ioctl returns.
        c = S.kvm_clear_dirty_log(slot=_uint("slot", slot, 32), num_pages=num_pages,
                                  first_page=first_page, dirty_bitmap=ctypes.addressof(buf))
        # SAFETY: the kernel reads ALIGN(num_pages, 64)/8 = `need` bytes from `buf`, all in it.
        _call(self.vm, S.KVM_CLEAR_DIRTY_LOG, c)

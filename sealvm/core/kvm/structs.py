"""ctypes layouts of the KVM structures sealvm passes to ioctls (x86-64).

Names and field names are the kernel's.  C anonymous unions become ctypes
`_anonymous_` members so `run.io.port` reads as in C.  Structures ending in a
flexible array (`kvm_msrs`, `kvm_cpuid2`, `kvm_msr_list`, `kvm_irq_routing`,
`kvm_signal_mask`) are declared with an empty array (their C `sizeof`, used in
the ioctl number) and built at the needed length with the `*_n(count)`
helpers.  `tests/unit/test_kvm_structs.py` checks every size and offset here
against the installed C header.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32, s64 = ctypes.c_int32, ctypes.c_int64


class _S(ctypes.Structure):
    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, *_ in self._fields_)})"


class _U(ctypes.Union):
    pass


# ---- registers ---------------------------------------------------------------
class kvm_regs(_S):
    _fields_ = [(n, u64) for n in (
        "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags").split()]


class kvm_segment(_S):
    _fields_ = [("base", u64), ("limit", u32), ("selector", u16), ("type", u8),
                ("present", u8), ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8),
                ("avl", u8), ("unusable", u8), ("padding", u8)]


class kvm_dtable(_S):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(_S):
    _fields_ = ([(n, kvm_segment) for n in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64))])


class kvm_fpu(_S):
    _fields_ = [("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
                ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64),
                ("xmm", (u8 * 16) * 16), ("mxcsr", u32), ("pad2", u32)]


class kvm_msr_entry(_S):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(_S):
    _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(_S):
    _fields_ = [("nmsrs", u32), ("indices", u32 * 0)]


class kvm_lapic_state(_S):
    _fields_ = [("regs", u8 * 0x400)]


class kvm_cpuid_entry2(_S):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_S):
    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_mp_state(_S):
    _fields_ = [("mp_state", u32)]


class _ve_exception(_S):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8),
                ("error_code", u32)]


class _ve_interrupt(_S):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _ve_nmi(_S):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _ve_smi(_S):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class _ve_triple_fault(_S):
    _fields_ = [("pending", u8)]


class kvm_vcpu_events(_S):
    _fields_ = [("exception", _ve_exception), ("interrupt", _ve_interrupt), ("nmi", _ve_nmi),
                ("sipi_vector", u32), ("flags", u32), ("smi", _ve_smi),
                ("triple_fault", _ve_triple_fault), ("reserved", u8 * 26),
                ("exception_has_payload", u8), ("exception_payload", u64)]


class kvm_xsave(_S):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(_S):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_S):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_debugregs(_S):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_signal_mask(_S):
    _fields_ = [("len", u32), ("sigset", u8 * 0)]


# ---- VM-level ------------------------------------------------------------------
class kvm_userspace_memory_region(_S):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_ioeventfd(_S):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", s32), ("flags", u32),
                ("pad", u8 * 36)]


class kvm_irqfd(_S):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class _bitmap_ptr(_U):
    _fields_ = [("dirty_bitmap", u64), ("padding2", u64)]  # void * on x86-64


class kvm_dirty_log(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("slot", u32), ("padding1", u32), ("_u", _bitmap_ptr)]


class kvm_clear_dirty_log(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("_u", _bitmap_ptr)]


class kvm_enable_cap(_S):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_clock_data(_S):
    _fields_ = [("clock", u64), ("flags", u32), ("pad0", u32), ("realtime", u64),
                ("host_tsc", u64), ("pad", u32 * 4)]


class kvm_pic_state(_S):
    _fields_ = [(n, u8) for n in (
        "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
        "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
        "elcr_mask").split()]


class kvm_ioapic_state(_S):
    # redirtbl entries are bound by their `bits` view (the C bitfield view is not bound).
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32), ("pad", u32),
                ("redirtbl", u64 * 24)]


class _irqchip_u(_U):
    _fields_ = [("dummy", u8 * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(_S):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_u)]


class kvm_pit_config(_S):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_pit_channel_state(_S):
    _fields_ = [("count", u32), ("latched_count", u16), ("count_latched", u8),
                ("status_latched", u8), ("status", u8), ("read_state", u8), ("write_state", u8),
                ("write_latch", u8), ("rw_mode", u8), ("mode", u8), ("bcd", u8), ("gate", u8),
                ("count_load_time", s64)]


class kvm_pit_state2(_S):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


class _irq_or_status(_U):
    _fields_ = [("irq", u32), ("status", s32)]


class kvm_irq_level(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("_u", _irq_or_status), ("level", u32)]


class kvm_msi(_S):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("flags", u32),
                ("devid", u32), ("pad", u8 * 12)]


class kvm_irq_routing_irqchip(_S):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(_S):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _routing_u(_U):
    _fields_ = [("irqchip", kvm_irq_routing_irqchip), ("msi", kvm_irq_routing_msi),
                ("pad", u32 * 8)]


class kvm_irq_routing_entry(_S):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _routing_u)]


class kvm_irq_routing(_S):
    _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * 0)]


# ---- kvm_run (the shared page of KVM_RUN) -----------------------------------------
class _run_hw(_S):
    _fields_ = [("hardware_exit_reason", u64)]


class _run_fail_entry(_S):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(_S):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_io(_S):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class kvm_debug_exit_arch(_S):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _run_debug(_S):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class _run_mmio(_S):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_internal(_S):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _flags_or_data(_U):
    _fields_ = [("flags", u64), ("data", u64 * 16)]


class _run_system_event(_S):
    _anonymous_ = ("_u",)
    _fields_ = [("type", u32), ("ndata", u32), ("_u", _flags_or_data)]


class _run_msr(_S):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class _run_exit(_U):
    _fields_ = [("hw", _run_hw), ("fail_entry", _run_fail_entry), ("ex", _run_ex),
                ("io", _run_io), ("debug", _run_debug), ("mmio", _run_mmio),
                ("internal", _run_internal), ("system_event", _run_system_event),
                ("msr", _run_msr), ("padding", u8 * 256)]


class kvm_sync_regs(_S):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class _run_sync(_U):
    _fields_ = [("regs", kvm_sync_regs), ("padding", u8 * 2048)]


class kvm_run(_S):
    _anonymous_ = ("_exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("_exit", _run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", _run_sync)]


# ---- variable-length builders ------------------------------------------------------
def _flex(base, field: str, elem, n: int):
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    fields = [f if f[0] != field else (field, elem * n) for f in base._fields_]
    return type(f"{base.__name__}_{n}", (_S,), {"_fields_": fields})


@lru_cache(maxsize=64)
def kvm_msrs_n(n: int):
    """`struct kvm_msrs` with room for `n` entries."""
    return _flex(kvm_msrs, "entries", kvm_msr_entry, n)


@lru_cache(maxsize=16)
def kvm_msr_list_n(n: int):
    return _flex(kvm_msr_list, "indices", u32, n)


@lru_cache(maxsize=16)
def kvm_cpuid2_n(n: int):
    """`struct kvm_cpuid2` with room for `n` entries."""
    return _flex(kvm_cpuid2, "entries", kvm_cpuid_entry2, n)


@lru_cache(maxsize=16)
def kvm_irq_routing_n(n: int):
    return _flex(kvm_irq_routing, "entries", kvm_irq_routing_entry, n)


@lru_cache(maxsize=4)
def kvm_signal_mask_n(n: int):
    return _flex(kvm_signal_mask, "sigset", u8, n)


def make_msrs(items: dict[int, int] | list[int]):
    """A filled `kvm_msrs`: from a list of indices (data 0) or a dict index -> value."""
    pairs = list(items.items()) if isinstance(items, dict) else [(i, 0) for i in items]
    m = kvm_msrs_n(len(pairs))()
    m.nmsrs = len(pairs)
    for e, (index, value) in zip(m.entries, pairs):
        e.index, e.data = index, value
    return m


def make_cpuid2(entries) -> "ctypes.Structure":
    """A `kvm_cpuid2` holding copies of `entries` (kvm_cpuid_entry2 objects)."""
    entries = list(entries)
    c = kvm_cpuid2_n(len(entries))()
    c.nent = len(entries)
    for i, e in enumerate(entries):
        c.entries[i] = e
    return c


# Top-level structures named `struct <name>` in the C headers (checked by the unit test).
C_STRUCTS = (
    kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu, kvm_msr_entry, kvm_msrs, kvm_msr_list,
    kvm_lapic_state, kvm_cpuid_entry2, kvm_cpuid2, kvm_mp_state, kvm_vcpu_events, kvm_xsave,
    kvm_xcr, kvm_xcrs, kvm_debugregs, kvm_signal_mask, kvm_userspace_memory_region, kvm_ioeventfd,
    kvm_irqfd, kvm_dirty_log, kvm_clear_dirty_log, kvm_enable_cap, kvm_clock_data, kvm_pic_state,
    kvm_ioapic_state, kvm_irqchip, kvm_pit_config, kvm_pit_channel_state, kvm_pit_state2,
    kvm_irq_level, kvm_msi, kvm_irq_routing_irqchip, kvm_irq_routing_msi, kvm_irq_routing_entry,
    kvm_irq_routing, kvm_debug_exit_arch, kvm_sync_regs, kvm_run,
)

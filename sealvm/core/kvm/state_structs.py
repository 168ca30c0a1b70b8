"""ctypes layouts, ioctl numbers and constants for the KVM state ioctls (x86-64).

NOT loaded by a running core today: nothing the core imports imports this
module or `state.py`.  Snapshot and migration will load it, and the runtime
TCB grows by both modules then (count them with `python -m sealvm.tools.tcb`).

The same rules as `structs.py` / `ioctls.py`: names and field names are the
kernel's, C anonymous unions become ctypes `_anonymous_` members, structures
ending in a flexible array are declared with an empty one (their C `sizeof`,
used in the ioctl number) and built at the needed length with the `*_n(count)`
helpers, and every request number is computed with `_IOC` from the size of the
ctypes structure it carries.  `tests/unit/test_kvm_structs.py` checks every
structure, field offset and size, and constant here against <linux/kvm.h>.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

from . import ioctls as K
from .structs import _S

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64
s32, s64 = ctypes.c_int32, ctypes.c_int64


class _U(ctypes.Union):
    pass


# ---- vCPU state ----------------------------------------------------------------
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
    _fields_ = [("regs", u8 * 0x400)]   # KVM_APIC_REG_SIZE


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
    # The legacy 4096-byte layout that KVM_GET_XSAVE / KVM_SET_XSAVE move; `extra`
    # is only used by KVM_GET_XSAVE2 (not bound) after arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM).
    _fields_ = [("region", u32 * 1024), ("extra", u32 * 0)]


class kvm_xcr(_S):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(_S):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_debugregs(_S):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


# ---- VM state: eventfds, dirty log, capabilities, clock --------------------------
class kvm_irqfd(_S):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class _bitmap_ptr(_U):
    _fields_ = [("dirty_bitmap", u64), ("padding2", u64)]   # C: void *, 8 bytes on x86-64


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


# ---- in-kernel irqchip and PIT -------------------------------------------------------
class kvm_pic_state(_S):
    _fields_ = [(n, u8) for n in (
        "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
        "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
        "elcr_mask").split()]


class kvm_ioapic_state(_S):
    # Each redirtbl entry is bound by the `bits` view of its C union (not the bitfields).
    _fields_ = [("base_address", u64), ("ioregsel", u32), ("id", u32), ("irr", u32), ("pad", u32),
                ("redirtbl", u64 * 24)]   # KVM_IOAPIC_NUM_PINS


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


# ---- variable-length builders ------------------------------------------------------
def _flex(base, field: str, elem, n: int):
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    fields = [f if f[0] != field else (field, elem * n) for f in base._fields_]
    return type(f"{base.__name__}_{n}", (_S,), {"_fields_": fields})


@lru_cache(maxsize=32)
def kvm_msrs_n(n: int):
    """`struct kvm_msrs` with room for `n` entries."""
    return _flex(kvm_msrs, "entries", kvm_msr_entry, n)


@lru_cache(maxsize=4)
def kvm_msr_list_n(n: int):
    """`struct kvm_msr_list` with room for `n` indices."""
    return _flex(kvm_msr_list, "indices", u32, n)


# Top-level structures named `struct <name>` in the C headers (checked by the unit test).
C_STRUCTS = (
    kvm_fpu, kvm_msr_entry, kvm_msrs, kvm_msr_list, kvm_lapic_state, kvm_mp_state,
    kvm_vcpu_events, kvm_xsave, kvm_xcr, kvm_xcrs, kvm_debugregs, kvm_irqfd, kvm_dirty_log,
    kvm_clear_dirty_log, kvm_enable_cap, kvm_clock_data, kvm_pic_state, kvm_ioapic_state,
    kvm_irqchip, kvm_pit_config, kvm_pit_channel_state, kvm_pit_state2, kvm_irq_level, kvm_msi,
)

# ---- ioctl numbers (KVMIO and the _IOC encoding come from ioctls.py) ------------------
_IO, _IOR, _IOW, _IOWR, _T = K._IO, K._IOR, K._IOW, K._IOWR, K.KVMIO

KVM_GET_MSR_INDEX_LIST = _IOWR(_T, 0x02, kvm_msr_list)      # system fd
KVM_CHECK_EXTENSION = _IO(_T, 0x03)                         # system and VM fd
KVM_GET_DIRTY_LOG = _IOW(_T, 0x42, kvm_dirty_log)           # VM fd from here ...
KVM_CREATE_IRQCHIP = _IO(_T, 0x60)
KVM_IRQ_LINE = _IOW(_T, 0x61, kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(_T, 0x62, kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(_T, 0x63, kvm_irqchip)               # sic: _IOR in the kernel header
KVM_IRQFD = _IOW(_T, 0x76, kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(_T, 0x77, kvm_pit_config)
KVM_SET_CLOCK = _IOW(_T, 0x7B, kvm_clock_data)
KVM_GET_CLOCK = _IOR(_T, 0x7C, kvm_clock_data)
KVM_GET_PIT2 = _IOR(_T, 0x9F, kvm_pit_state2)
KVM_SET_PIT2 = _IOW(_T, 0xA0, kvm_pit_state2)
KVM_ENABLE_CAP = _IOW(_T, 0xA3, kvm_enable_cap)             # VM and vCPU fd
KVM_SIGNAL_MSI = _IOW(_T, 0xA5, kvm_msi)
KVM_CLEAR_DIRTY_LOG = _IOWR(_T, 0xC0, kvm_clear_dirty_log)  # ... to here
KVM_GET_MSRS = _IOWR(_T, 0x88, kvm_msrs)                    # vCPU fd from here on
KVM_SET_MSRS = _IOW(_T, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(_T, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(_T, 0x8D, kvm_fpu)
KVM_GET_LAPIC = _IOR(_T, 0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _IOW(_T, 0x8F, kvm_lapic_state)
KVM_GET_MP_STATE = _IOR(_T, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(_T, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(_T, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(_T, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(_T, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(_T, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(_T, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(_T, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(_T, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(_T, 0xA7, kvm_xcrs)

# request number -> name, for error messages (an ioctl's type byte is KVMIO; no constant's is).
IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items())
    if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == K.KVMIO
}

# ---- capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP) ------------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_MP_STATE = 14
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_IRQFD_RESAMPLE = 82
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_XSAVE2 = 208

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# ---- flags and numbers carried in the structures above -------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0     # kvm_userspace_memory_region.flags

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_MSI_VALID_DEVID = 1 << 0

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_NR_IRQCHIPS = 3
KVM_IOAPIC_NUM_PINS = 24

KVM_PIT_SPEAKER_DUMMY = 1            # kvm_pit_config.flags
KVM_PIT_FLAGS_HPET_LEGACY = 1        # kvm_pit_state2.flags

KVM_CLOCK_TSC_STABLE = 2             # kvm_clock_data.flags
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x01
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x02
KVM_VCPUEVENT_VALID_SHADOW = 0x04
KVM_VCPUEVENT_VALID_SMM = 0x08
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16

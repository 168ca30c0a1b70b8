"""KVM ioctl numbers and constants, as in <linux/kvm.h> and <asm/kvm.h> (x86-64).

Every request number is computed with the kernel's own `_IOC` encoding from
the size of the ctypes structure it carries, so a wrong structure size gives a
wrong number, which `tests/unit/test_kvm_structs.py` catches against the C
header.  Names are exactly the kernel's so the header is the documentation.

`IOCTL_NAMES` maps each request number back to its name for error messages.
Constants that newer kernels define but the installed 6.1 header does not are
listed in `NEWER_THAN_HEADER` (the header test skips them with that reason).
"""
from __future__ import annotations

import ctypes

from . import structs as S

# ---- the _IOC encoding (include/uapi/asm-generic/ioctl.h) -----------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return ((direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT)
            | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT))


def _size(t) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_READ, typ, nr, _size(t))


def _IOW(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_WRITE, typ, nr, _size(t))


def _IOWR(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, _size(t))


KVMIO = 0xAE
KVM_API_VERSION = 12

# ---- system ioctls (on the /dev/kvm fd) -----------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, S.kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, S.kvm_cpuid2)

# ---- VM ioctls -------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, S.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, S.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, S.kvm_irq_level)
KVM_GET_IRQCHIP = _IOWR(KVMIO, 0x62, S.kvm_irqchip)
KVM_SET_IRQCHIP = _IOR(KVMIO, 0x63, S.kvm_irqchip)  # sic: _IOR in the kernel header
KVM_SET_GSI_ROUTING = _IOW(KVMIO, 0x6A, S.kvm_irq_routing)
KVM_IRQFD = _IOW(KVMIO, 0x76, S.kvm_irqfd)
KVM_CREATE_PIT2 = _IOW(KVMIO, 0x77, S.kvm_pit_config)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, S.kvm_ioeventfd)
KVM_SET_CLOCK = _IOW(KVMIO, 0x7B, S.kvm_clock_data)
KVM_GET_CLOCK = _IOR(KVMIO, 0x7C, S.kvm_clock_data)
KVM_GET_PIT2 = _IOR(KVMIO, 0x9F, S.kvm_pit_state2)
KVM_SET_PIT2 = _IOW(KVMIO, 0xA0, S.kvm_pit_state2)
KVM_SIGNAL_MSI = _IOW(KVMIO, 0xA5, S.kvm_msi)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, S.kvm_enable_cap)  # VM and vCPU
KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xC0, S.kvm_clear_dirty_log)

# ---- vCPU ioctls -----------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, S.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, S.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, S.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, S.kvm_sregs)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, S.kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, S.kvm_msrs)
KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8B, S.kvm_signal_mask)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, S.kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, S.kvm_fpu)
KVM_GET_LAPIC = _IOR(KVMIO, 0x8E, S.kvm_lapic_state)
KVM_SET_LAPIC = _IOW(KVMIO, 0x8F, S.kvm_lapic_state)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, S.kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, S.kvm_cpuid2)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, S.kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, S.kvm_mp_state)
KVM_NMI = _IO(KVMIO, 0x9A)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, S.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, S.kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, S.kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, S.kvm_debugregs)
KVM_SET_TSC_KHZ = _IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = _IO(KVMIO, 0xA3)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, S.kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, S.kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, S.kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, S.kvm_xcrs)

# ---- capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP) ------------------
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_USER_NMI = 22
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQ_INJECT_STATUS = 26
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_PIT_STATE2 = 35
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_DEBUGREGS = 50
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_TSC_DEADLINE_TIMER = 72
KVM_CAP_SYNC_REGS = 74
KVM_CAP_KVMCLOCK_CTRL = 76
KVM_CAP_SIGNAL_MSI = 77
KVM_CAP_READONLY_MEM = 81
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IOEVENTFD_ANY_LENGTH = 122
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_XSAVE2 = 208
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 argument bits
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# ---- exit reasons (kvm_run.exit_reason) ------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40

EXIT_REASON_NAMES: dict[int, str] = {
    v: k for k, v in sorted(globals().items())
    if k.startswith("KVM_EXIT_") and isinstance(v, int)
}

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6

# kvm_run.flags
KVM_RUN_X86_SMM = 1 << 0
KVM_RUN_X86_BUS_LOCK = 1 << 1

# offset (in pages) of the PIO data page inside the kvm_run mapping
KVM_PIO_PAGE_OFFSET = 1
KVM_COALESCED_MMIO_PAGE_OFFSET = 2

# ---- memory regions, ioeventfd, irqfd --------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQFD_FLAG_RESAMPLE = 1 << 1

KVM_MSI_VALID_DEVID = 1 << 0

KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2

KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_IOAPIC_NUM_PINS = 24

KVM_PIT_SPEAKER_DUMMY = 1

# kvm_clock_data.flags
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3

# ---- vCPU state -------------------------------------------------------------
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

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0  # sic: the kernel's spelling

MAX_CPUID_ENTRIES = 256  # the kernel's KVM_MAX_CPUID_ENTRIES (not in the uapi header)
KVM_MAX_XCRS = 16
KVM_APIC_REG_SIZE = 0x400

# Defined by newer kernels than the installed 6.1 uapi header.
NEWER_THAN_HEADER = frozenset({
    "KVM_CAP_USER_MEMORY2", "KVM_CAP_MEMORY_ATTRIBUTES", "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_VM_TYPES", "KVM_EXIT_LOONGARCH_IOCSR", "KVM_EXIT_MEMORY_FAULT", "KVM_EXIT_TDX",
})

_IOCTL_NAMES = (
    "KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_MSR_INDEX_LIST KVM_CHECK_EXTENSION "
    "KVM_GET_VCPU_MMAP_SIZE KVM_GET_SUPPORTED_CPUID KVM_CREATE_VCPU KVM_GET_DIRTY_LOG "
    "KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP "
    "KVM_IRQ_LINE KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_SET_GSI_ROUTING KVM_IRQFD KVM_CREATE_PIT2 "
    "KVM_IOEVENTFD KVM_SET_CLOCK KVM_GET_CLOCK KVM_GET_PIT2 KVM_SET_PIT2 KVM_SIGNAL_MSI "
    "KVM_ENABLE_CAP KVM_CLEAR_DIRTY_LOG KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS "
    "KVM_SET_SREGS KVM_GET_MSRS KVM_SET_MSRS KVM_SET_SIGNAL_MASK KVM_GET_FPU KVM_SET_FPU "
    "KVM_GET_LAPIC KVM_SET_LAPIC KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_MP_STATE KVM_SET_MP_STATE "
    "KVM_NMI KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS "
    "KVM_SET_TSC_KHZ KVM_GET_TSC_KHZ KVM_GET_XSAVE KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS"
).split()

# request number -> name, for error messages (the numbers are all distinct).
IOCTL_NAMES: dict[int, str] = {globals()[n]: n for n in _IOCTL_NAMES}


def ioctl_name(request: int) -> str:
    return IOCTL_NAMES.get(request, f"ioctl {request:#x}")

"""KVM ioctl numbers and constants, as in <linux/kvm.h> and <asm/kvm.h> (x86-64).

Only what the monitor uses.  Every request number is computed with the
kernel's own `_IOC` encoding from the size of the ctypes structure it carries,
so a wrong structure size gives a wrong number, which
`tests/unit/test_kvm_structs.py` catches against the C header.  Names are
exactly the kernel's so the header is the documentation.
"""
from __future__ import annotations

import ctypes

from . import structs as S

# ---- the _IOC encoding (include/uapi/asm-generic/ioctl.h) -----------------
_IOC_SIZEBITS = 14
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(t))


def _IOW(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(t))


def _IOWR(typ: int, nr: int, t) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(t))


KVMIO = 0xAE
KVM_API_VERSION = 12

# ---- system ioctls (on the /dev/kvm fd) -----------------------------------
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, S.kvm_cpuid2)

# ---- VM ioctls -------------------------------------------------------------
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, S.kvm_userspace_memory_region)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, S.kvm_ioeventfd)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, ctypes.c_uint64)

# ---- vCPU ioctls -----------------------------------------------------------
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, S.kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, S.kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, S.kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, S.kvm_sregs)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, S.kvm_cpuid2)

# request number -> name, for error messages (an ioctl's type byte is KVMIO; no constant's is).
IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in list(globals().items())
    if k.startswith("KVM_") and isinstance(v, int) and (v >> 8) & 0xFF == KVMIO
}

# ---- exit reasons (kvm_run.exit_reason) that the run loop handles ----------
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

# Every exit reason's name, by number (KVM_EXIT_<name>), for stop messages.
EXIT_NAMES = """UNKNOWN EXCEPTION IO HYPERCALL DEBUG HLT MMIO IRQ_WINDOW_OPEN SHUTDOWN FAIL_ENTRY
    INTR SET_TPR TPR_ACCESS S390_SIEIC S390_RESET DCR NMI INTERNAL_ERROR OSI PAPR_HCALL
    S390_UCONTROL WATCHDOG S390_TSCH EPR SYSTEM_EVENT S390_STSI IOAPIC_EOI HYPERV ARM_NISV
    X86_RDMSR X86_WRMSR DIRTY_RING_FULL AP_RESET_HOLD X86_BUS_LOCK XEN RISCV_SBI RISCV_CSR
    NOTIFY LOONGARCH_IOCSR MEMORY_FAULT TDX""".split()

# kvm_run.io.direction
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# kvm_ioeventfd.flags
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2

MAX_CPUID_ENTRIES = 256  # the kernel's KVM_MAX_CPUID_ENTRIES (not in the uapi header)

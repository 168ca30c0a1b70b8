"""ctypes layouts of the KVM structures sealvm passes to ioctls (x86-64).

Names and field names are the kernel's.  C anonymous unions become ctypes
`_anonymous_` members so `run.io.port` reads as in C.  `kvm_cpuid2` ends in a
flexible array: it is declared with an empty one (its C `sizeof`, used in the
ioctl number) and built at the needed length with `kvm_cpuid2_n(count)`.
Parts of `kvm_run` the monitor never reads are left as the kernel's padding.
`tests/unit/test_kvm_structs.py` checks every size and offset here against
the installed C header.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64


class _S(ctypes.Structure):
    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n, *_ in self._fields_)})"


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


class kvm_sregs(_S):
    _fields_ = ([(n, kvm_segment) for n in "cs ds es fs gs ss tr ldt".split()]
                + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
                + [(n, u64) for n in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()]
                + [("interrupt_bitmap", u64 * 4)])   # KVM_NR_INTERRUPTS (256) bits


class kvm_cpuid_entry2(_S):
    _fields_ = [("function", u32), ("index", u32), ("flags", u32), ("eax", u32), ("ebx", u32),
                ("ecx", u32), ("edx", u32), ("padding", u32 * 3)]


class kvm_cpuid2(_S):
    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * 0)]


@lru_cache(maxsize=4)
def kvm_cpuid2_n(n: int):
    """`struct kvm_cpuid2` with room for `n` entries."""
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    fields = kvm_cpuid2._fields_[:-1] + [("entries", kvm_cpuid_entry2 * n)]
    return type(f"kvm_cpuid2_{n}", (_S,), {"_fields_": fields})


# ---- VM-level ------------------------------------------------------------------
class kvm_userspace_memory_region(_S):
    _fields_ = [("slot", u32), ("flags", u32), ("guest_phys_addr", u64), ("memory_size", u64),
                ("userspace_addr", u64)]


class kvm_ioeventfd(_S):
    _fields_ = [("datamatch", u64), ("addr", u64), ("len", u32), ("fd", ctypes.c_int32),
                ("flags", u32), ("pad", u8 * 36)]


# ---- kvm_run (the shared page of KVM_RUN) -----------------------------------------
class _run_fail_entry(_S):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_io(_S):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32),
                ("data_offset", u64)]


class _run_mmio(_S):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_internal(_S):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_system_event(_S):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]   # C: union {flags, data}


class _run_exit(ctypes.Union):
    _fields_ = [("fail_entry", _run_fail_entry), ("io", _run_io), ("mmio", _run_mmio),
                ("internal", _run_internal), ("system_event", _run_system_event),
                ("padding", u8 * 256)]


class kvm_run(_S):
    _anonymous_ = ("_exit",)
    _fields_ = [("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
                ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
                ("flags", u16), ("cr8", u64), ("apic_base", u64), ("_exit", _run_exit),
                ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64), ("s", u8 * 2048)]


# Top-level structures named `struct <name>` in the C headers (checked by the unit test).
C_STRUCTS = (kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_cpuid_entry2, kvm_cpuid2,
             kvm_userspace_memory_region, kvm_ioeventfd, kvm_run)

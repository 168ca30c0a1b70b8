"""Initial vCPU state for the two boot entries, as plain data (no KVM here).

The functions return `CpuState` dataclasses; the KVM layer maps them onto
`kvm_regs` / `kvm_sregs` (a `Segment` has exactly the fields of
`kvm_segment`).  Three states exist:

* PVH 32-bit entry (Xen's PVH ABI, as QEMU starts it): flat protected mode,
  paging off, CS 0x08 32-bit code, data 0x10, CR0 = PE|ET, EBX = start_info.
* Direct long-mode entry: CPL0 64-bit with the loader's identity map of the
  first 4 GiB (2 MiB pages, P|RW|US|PS) at BOOT_PAGETABLE_GPA, RIP = e_entry.
* Secondary vCPUs: the same long mode, RIP = `ap_entry64`, RDI = vCPU index.

Hidden segment state matches the GDT the loader writes, so a guest that
reloads a selector before its own `lgdt` gets the same segment.  Two GDTs live
in the loader's GDT page: the 64-bit one at BOOT_GDT_GPA (long-mode BSP and
APs) and the 32-bit one 0x100 above it (PVH BSP), because both put their code
segment at selector 0x08.  TR and LDT get the values KVM accepts and QEMU
uses after reset (TR: busy 32-bit TSS, base 0, limit 0x67 as the PVH ABI
asks; LDT: type 2, present, selector 0); neither is ever loaded by the guest
from our GDT.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..addr import BOOT_GDT_GPA, BOOT_PAGETABLE_END, BOOT_PAGETABLE_GPA, GPA, PAGE_SIZE
from ..memory import GuestMemory

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1

PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7
LARGE_PAGE = 2 << 20
IDENTITY_GIB = 4

PML4_GPA = BOOT_PAGETABLE_GPA
PDPT_GPA = GPA(int(BOOT_PAGETABLE_GPA) + PAGE_SIZE)
PD_GPA = GPA(int(BOOT_PAGETABLE_GPA) + 2 * PAGE_SIZE)          # IDENTITY_GIB consecutive PDs
PAGETABLE_END = GPA(int(PD_GPA) + IDENTITY_GIB * PAGE_SIZE)
LONG_GDT_GPA = BOOT_GDT_GPA
PVH_GDT_GPA = GPA(int(BOOT_GDT_GPA) + 0x100)

if PAGETABLE_END > BOOT_PAGETABLE_END or PVH_GDT_GPA + 0x100 > BOOT_PAGETABLE_GPA:
    raise RuntimeError("addr.py layout: boot page tables or GDTs do not fit their area")

CODE_SEL, DATA_SEL = 0x08, 0x10
GP_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
           "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


@dataclass(frozen=True)
class Segment:
    """One segment register's hidden state (the fields of `kvm_segment`)."""

    base: int
    limit: int          # byte-granular limit, as KVM wants it (0xffffffff for flat)
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the name KVM uses
    g: int
    avl: int
    unusable: int = 0


@dataclass(frozen=True)
class Dtable:
    base: int
    limit: int


@dataclass
class CpuState:
    regs: dict[str, int]             # rax..r15, rip, rflags
    segments: dict[str, Segment]     # cs ds es fs gs ss tr ldt
    gdt: Dtable
    idt: Dtable
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cr2: int = field(default=0)


def _flat(selector: int, type_: int, db: int, l: int) -> Segment:  # noqa: E741
    return Segment(base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0,
                   db=db, s=1, l=l, g=1, avl=0)


CODE32 = _flat(CODE_SEL, 0xB, db=1, l=0)       # execute/read, accessed
CODE64 = _flat(CODE_SEL, 0xB, db=0, l=1)
DATA = _flat(DATA_SEL, 0x3, db=1, l=0)          # read/write, accessed
TR = Segment(base=0, limit=0x67, selector=0, type=0xB, present=1, dpl=0, db=0, s=0, l=0, g=0, avl=0)
LDT = Segment(base=0, limit=0xFFFF, selector=0, type=0x2, present=1, dpl=0, db=0, s=0, l=0, g=0, avl=0)


def descriptor(seg: Segment) -> int:
    """The 8-byte GDT descriptor for a code/data segment (e.g. CODE64 -> 0x00af9b000000ffff)."""
    if seg.g:
        if seg.limit & 0xFFF != 0xFFF:
            raise ValueError(f"limit {seg.limit:#x} is not page-granular")
        raw_limit = seg.limit >> 12
    else:
        raw_limit = seg.limit
    if raw_limit >> 20 or seg.base >> 32:
        raise ValueError(f"segment base {seg.base:#x} / limit {seg.limit:#x} does not fit a descriptor")
    access = seg.type | seg.s << 4 | seg.dpl << 5 | seg.present << 7
    flags = seg.avl | seg.l << 1 | seg.db << 2 | seg.g << 3
    return ((raw_limit & 0xFFFF) | (seg.base & 0xFFFFFF) << 16 | access << 40
            | (raw_limit >> 16) << 48 | flags << 52 | (seg.base >> 24) << 56)


def gdt_bytes(code: Segment) -> bytes:
    """null, `code` at 0x08, DATA at 0x10."""
    return struct.pack("<3Q", 0, descriptor(code), descriptor(DATA))


def _regs(rip: int, **values: int) -> dict[str, int]:
    regs = {name: 0 for name in GP_REGS}
    regs.update(values)
    regs["rip"] = rip
    regs["rflags"] = RFLAGS_RESERVED
    return regs


def _segments(code: Segment) -> dict[str, Segment]:
    segs = {name: DATA for name in ("ds", "es", "fs", "gs", "ss")}
    segs.update(cs=code, tr=TR, ldt=LDT)
    return segs


PVH_GDT = Dtable(int(PVH_GDT_GPA), 3 * 8 - 1)
LONG_GDT = Dtable(int(LONG_GDT_GPA), 3 * 8 - 1)
NO_IDT = Dtable(0, 0)


def pvh_entry_state(entry: int, start_info: int, gdt: Dtable = PVH_GDT) -> CpuState:
    """PVH 32-bit entry: flat protected mode, paging off, EBX = start_info."""
    return CpuState(regs=_regs(entry, rbx=int(start_info)), segments=_segments(CODE32),
                    gdt=gdt, idt=NO_IDT, cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0)


def long_mode_state(rip: int, start_info: int, *, rdi: int = 0, cr3: int = int(PML4_GPA),
                    gdt: Dtable = LONG_GDT) -> CpuState:
    """CPL0 64-bit mode on the loader's identity map, RBX = start_info."""
    return CpuState(regs=_regs(rip, rbx=int(start_info), rdi=rdi), segments=_segments(CODE64),
                    gdt=gdt, idt=NO_IDT, cr0=CR0_PG | CR0_ET | CR0_PE, cr3=cr3, cr4=CR4_PAE,
                    efer=EFER_LME | EFER_LMA)


def ap_state(ap_entry: int, cpu_index: int, start_info: int) -> CpuState:
    """Secondary vCPU `cpu_index` (1..N-1): long mode at `ap_entry`, RDI = index."""
    if cpu_index < 1:
        raise ValueError(f"secondary vCPU index must be >= 1, not {cpu_index}")
    return long_mode_state(ap_entry, start_info, rdi=cpu_index)


def identity_pagetables() -> dict[GPA, bytes]:
    """Page-sized blobs of the identity map: PML4 -> PDPT -> 4 PDs of 2 MiB pages."""
    table = PTE_P | PTE_RW | PTE_US
    pml4 = struct.pack("<Q", int(PDPT_GPA) | table).ljust(PAGE_SIZE, b"\0")
    pdpt = struct.pack(f"<{IDENTITY_GIB}Q", *(int(PD_GPA) + i * PAGE_SIZE | table
                                              for i in range(IDENTITY_GIB))).ljust(PAGE_SIZE, b"\0")
    blobs = {PML4_GPA: pml4, PDPT_GPA: pdpt}
    for i in range(IDENTITY_GIB):
        blobs[GPA(int(PD_GPA) + i * PAGE_SIZE)] = struct.pack(
            "<512Q", *(((i * 512 + j) * LARGE_PAGE) | table | PTE_PS for j in range(512)))
    return blobs


def write_pvh_gdt(memory: GuestMemory) -> Dtable:
    memory.write(PVH_GDT_GPA, gdt_bytes(CODE32))
    return PVH_GDT


def write_long_mode_tables(memory: GuestMemory) -> tuple[int, Dtable]:
    """Write the identity page tables and the 64-bit GDT; return (cr3, gdt)."""
    for gpa, blob in identity_pagetables().items():
        memory.write(gpa, blob)
    memory.write(LONG_GDT_GPA, gdt_bytes(CODE64))
    return int(PML4_GPA), LONG_GDT

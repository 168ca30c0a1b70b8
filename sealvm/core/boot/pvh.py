"""Write the PVH boot information (`hvm_start_info`, memory map, command line).

Layout follows Xen's public `hvm_start_info` (arch-x86/hvm/start_info.h),
version 1, as QEMU fills it for `-kernel` PVH images:

    +0  u32 magic (0x336ec578)   +4  u32 version (1)   +8 u32 flags   +12 u32 nr_modules
    +16 u64 modlist_paddr        +24 u64 cmdline_paddr  +32 u64 rsdp_paddr
    +40 u64 memmap_paddr         +48 u32 memmap_entries +52 u32 reserved       (56 bytes)

and each memory map entry is {u64 addr, u64 size, u32 type, u32 reserved}, each
module list entry {u64 paddr, u64 size, u64 cmdline_paddr, u64 reserved}.

The memory map.  QEMU microvm (through its qboot firmware) lists RAM as type 1
and does not list the MMIO hole or the virtio-mmio windows at all; its only
reserved entries cover firmware-owned low memory (EBDA, ACPI, the F segment
where qboot keeps start_info).  sealvm does the same: RAM regions as type 1,
no entry for the MMIO hole, and one reserved (type 2) entry for the loader's
own area 0x6000-0x10000 (start_info, memmap, cmdline, GDTs and the identity
page tables a long-mode guest is still running on), which is the counterpart
of qboot's reserved F segment.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..addr import CMDLINE_GPA, CMDLINE_MAX, GPA, MEMMAP_GPA, START_INFO_GPA
from ..memory import GuestMemory
from .elf import LOADER_AREA_END, LOADER_AREA_START
from .errors import BootConfigError, CmdlineError

START_INFO_MAGIC = 0x336EC578
START_INFO_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")   # 56 bytes
MEMMAP_ENTRY = struct.Struct("<QQII")       # 24 bytes
E820_RAM = 1
E820_RESERVED = 2
MEMMAP_MAX_ENTRIES = (int(CMDLINE_GPA) - int(MEMMAP_GPA)) // MEMMAP_ENTRY.size
MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved (32 bytes)
MODLIST_GPA = GPA(int(START_INFO_GPA) + 0x40)   # between start_info and the memory map
MODLIST_MAX = (int(MEMMAP_GPA) - int(MODLIST_GPA)) // MODLIST_ENTRY.size

if int(START_INFO_GPA) + START_INFO.size > int(MODLIST_GPA):
    raise RuntimeError("addr.py layout: start_info overlaps the module list")


@dataclass(frozen=True)
class MemmapEntry:
    addr: GPA
    size: int
    type: int


def encode_cmdline(cmdline: str) -> bytes:
    """The command line as the bytes the guest will see (without the NUL).  Raises CmdlineError."""
    if not isinstance(cmdline, str):
        raise CmdlineError(f"the guest command line must be text, not {type(cmdline).__name__}")
    if "\0" in cmdline:
        raise CmdlineError("the guest command line contains a NUL character")
    raw = cmdline.encode("utf-8")
    if len(raw) > CMDLINE_MAX:
        raise CmdlineError(f"the guest command line is {len(raw)} bytes; the limit is {CMDLINE_MAX} bytes")
    return raw


def _minus(start: int, end: int, hole_start: int, hole_end: int) -> list[tuple[int, int]]:
    """[start, end) with [hole_start, hole_end) removed."""
    pieces = []
    if start < min(end, hole_start):
        pieces.append((start, min(end, hole_start)))
    if max(start, hole_end) < end:
        pieces.append((max(start, hole_end), end))
    return pieces


def build_memmap(memory: GuestMemory) -> list[MemmapEntry]:
    """The guest's memory map, sorted by address (see the module docstring)."""
    entries: list[MemmapEntry] = []
    lo, hi = int(LOADER_AREA_START), int(LOADER_AREA_END)
    if not memory.contains(LOADER_AREA_START, hi - lo):
        raise BootConfigError(f"guest RAM does not cover the loader area {lo:#x}-{hi:#x}")
    for region in memory.regions:
        for start, end in _minus(int(region.gpa), int(region.end), lo, hi):
            entries.append(MemmapEntry(GPA(start), end - start, E820_RAM))
    entries.append(MemmapEntry(GPA(lo), hi - lo, E820_RESERVED))
    entries.sort(key=lambda e: e.addr)
    if len(entries) > MEMMAP_MAX_ENTRIES:
        raise BootConfigError(f"memory map has {len(entries)} entries; at most {MEMMAP_MAX_ENTRIES} fit")
    return entries


def write_start_info(memory: GuestMemory, cmdline: str, *, memmap: list[tuple[int, int, int]] | None = None,
                     modules: list[tuple[int, int]] = (), rsdp: int = 0) -> GPA:
    """Write command line, memory map, module list and hvm_start_info; return the start_info GPA.

    `memmap` ((addr, size, type) rows) replaces the default map of build_memmap;
    `modules` are (gpa, size) pairs (a Linux guest takes module 0 as its
    initrd); `rsdp` is the ACPI RSDP's GPA (0: none).  Everything is validated
    before anything is written.  Raises CmdlineError or BootConfigError.
    """
    raw = encode_cmdline(cmdline)
    if memmap is None:
        memmap = [(int(e.addr), e.size, e.type) for e in build_memmap(memory)]
    if len(memmap) > MEMMAP_MAX_ENTRIES or len(modules) > MODLIST_MAX:
        raise BootConfigError(f"{len(memmap)} memory map entries and {len(modules)} modules; "
                              f"at most {MEMMAP_MAX_ENTRIES} and {MODLIST_MAX} fit")

    memory.fill(CMDLINE_GPA, CMDLINE_MAX + 1, 0)
    memory.write(CMDLINE_GPA, raw + b"\0")

    table = b"".join(MEMMAP_ENTRY.pack(int(a), size, kind, 0) for a, size, kind in memmap)
    memory.fill(MEMMAP_GPA, int(CMDLINE_GPA) - int(MEMMAP_GPA), 0)
    memory.write(MEMMAP_GPA, table)

    info = START_INFO.pack(START_INFO_MAGIC, START_INFO_VERSION, 0, len(modules),  # ..., nr_modules
                           int(MODLIST_GPA) if modules else 0, int(CMDLINE_GPA), int(rsdp),
                           int(MEMMAP_GPA), len(memmap), 0)                # memmap, entries, reserved
    memory.fill(START_INFO_GPA, int(MEMMAP_GPA) - int(START_INFO_GPA), 0)
    memory.write(START_INFO_GPA, info)
    if modules:
        memory.write(MODLIST_GPA, b"".join(MODLIST_ENTRY.pack(int(g), n, 0, 0) for g, n in modules))
    return START_INFO_GPA

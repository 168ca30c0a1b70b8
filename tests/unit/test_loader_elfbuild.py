"""A tiny ELF64 writer for the loader tests (no toolchain needed).

Not a test module itself; `test_loader.py` and `tests/property/test_elf_fuzz.py`
import it.  Layout of what it writes: ELF header at 0, program headers at
PHOFF (PT_LOADs in order, then the PT_NOTE if any), note data, segment data,
then .strtab/.symtab and the section header table.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")
PHOFF = 64
PT_LOAD, PT_NOTE = 1, 4
SHT_SYMTAB, SHT_STRTAB, SHT_NOTE = 2, 3, 7

# Header field offsets, for tests that corrupt a good image.
E_MACHINE, E_ENTRY, E_PHOFF, E_SHOFF, E_PHENTSIZE, E_PHNUM = 18, 24, 32, 40, 54, 56
P_OFFSET, P_VADDR, P_PADDR, P_FILESZ, P_MEMSZ = 8, 16, 24, 32, 40

LOAD_ADDR = 0x100000
ENTRY64 = 0x100000
ENTRY32 = 0x100010
AP_ENTRY64 = 0x100020
PROGRESS = 0x101000


@dataclass
class Seg:
    paddr: int
    data: bytes = b""
    memsz: Optional[int] = None
    vaddr: Optional[int] = None
    flags: int = 7


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name) + 1, len(desc), ntype) + pad(name + b"\0") + pad(desc)


def pvh_note(entry: int, size: int = 8) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def phdr_offset(i: int) -> int:
    return PHOFF + i * PHDR.size


@dataclass
class Elf:
    segments: list[Seg]
    entry: int = ENTRY64
    notes: bytes = b""
    note_phdr: bool = True          # put `notes` in a PT_NOTE
    note_section: bool = False      # and/or in an SHT_NOTE section
    symbols: dict[str, int] = field(default_factory=dict)
    machine: int = 62
    e_type: int = 2

    def build(self) -> bytes:
        nph = len(self.segments) + (1 if self.notes and self.note_phdr else 0)
        body = bytearray(PHOFF + nph * PHDR.size)
        note_off = len(body)
        body += self.notes
        phdrs = []
        for s in self.segments:
            body += b"\0" * (-len(body) % 16)
            off = len(body)
            body += s.data
            memsz = len(s.data) if s.memsz is None else s.memsz
            vaddr = s.paddr if s.vaddr is None else s.vaddr
            phdrs.append(PHDR.pack(PT_LOAD, s.flags, off, vaddr, s.paddr, len(s.data), memsz, 16))
        if self.notes and self.note_phdr:
            phdrs.append(PHDR.pack(PT_NOTE, 4, note_off, 0, 0, len(self.notes), len(self.notes), 4))
        body[PHOFF:PHOFF + len(phdrs) * PHDR.size] = b"".join(phdrs)

        sections = [b"\0" * SHDR.size]
        if self.notes and self.note_section:
            sections.append(SHDR.pack(0, SHT_NOTE, 2, 0, note_off, len(self.notes), 0, 0, 4, 0))
        if self.symbols:
            strtab = bytearray(b"\0")
            syms = [b"\0" * SYM.size]
            for name, value in self.symbols.items():
                syms.append(SYM.pack(len(strtab), 0x12, 0, 1, value, 0))   # GLOBAL FUNC, shndx 1
                strtab += name.encode() + b"\0"
            body += b"\0" * (-len(body) % 8)
            str_off = len(body)
            body += strtab
            body += b"\0" * (-len(body) % 8)
            sym_off = len(body)
            body += b"".join(syms)
            str_idx = len(sections) + 1
            sections.append(SHDR.pack(0, SHT_SYMTAB, 0, 0, sym_off, len(syms) * SYM.size,
                                      str_idx, 1, 8, SYM.size))
            sections.append(SHDR.pack(0, SHT_STRTAB, 0, 0, str_off, len(strtab), 0, 0, 1, 0))
        shoff = shnum = 0
        if len(sections) > 1:
            body += b"\0" * (-len(body) % 8)
            shoff, shnum = len(body), len(sections)
            body += b"".join(sections)
        ident = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
        body[:EHDR.size] = EHDR.pack(ident, self.e_type, self.machine, 1, self.entry, PHOFF, shoff, 0,
                                     EHDR.size, PHDR.size, nph, SHDR.size, shnum, 0)
        return bytes(body)


CODE = bytes(range(256)) * 2          # 0x200 recognisable bytes
BSS_SIZE = 0x2000


def good_elf(desc_size: int = 8, **kw) -> Elf:
    """The standard good image: code at 1 MiB with bss, PVH note, symbols."""
    args = dict(segments=[Seg(LOAD_ADDR, CODE, memsz=len(CODE) + BSS_SIZE)],
                notes=pvh_note(ENTRY32, desc_size),
                symbols={"entry64": ENTRY64, "entry32": ENTRY32, "ap_entry64": AP_ENTRY64,
                         "progress": PROGRESS})
    args.update(kw)
    return Elf(**args)


def good_bytes(**kw) -> bytes:
    return good_elf(**kw).build()

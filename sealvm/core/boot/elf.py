"""Parse a guest's ELF64 image and copy its segments into guest RAM.

The image is untrusted input.  `parse_elf` reads only through bounds-checked
slices: every offset and size taken from the file is checked against the file
length before it is used, so a hostile or truncated file ends in a
`BadImageError` with a readable message, never in an IndexError or a read past
the data.  Python integers do not wrap, so `offset + size` cannot overflow; sums
are still compared against 2**64 where the guest address space would wrap.

`load_elf` then checks every PT_LOAD segment against guest RAM, the MMIO hole
and the loader's own area below 1 MiB *before* writing a single byte, copies the
file bytes to `p_paddr` (as QEMU does for PVH images) and zeroes the bss tail.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional

from ..addr import BOOT_PAGETABLE_END, GPA, MMIO_HOLE_END, MMIO_HOLE_START, START_INFO_GPA, GiB, MiB
from ..memory import GuestMemory
from .errors import BadImageError

MAX_IMAGE_SIZE = 512 * MiB
MAX_NOTE_BYTES = 1 * MiB        # all note data together; real images have a few hundred bytes
MAX_SYMBOLS = 1_000_000         # a large vmlinux has ~150k

# Guest-physical range the loader itself writes (start_info, memmap, cmdline,
# GDTs, identity page tables).  No segment may touch it.
LOADER_AREA_START = START_INFO_GPA
LOADER_AREA_END = BOOT_PAGETABLE_END

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # Elf64_Ehdr, 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")           # Elf64_Phdr, 56 bytes
_SHDR = struct.Struct("<IIQQQQIIQQ")         # Elf64_Shdr, 64 bytes
_SYM = struct.Struct("<IBBHQQ")              # Elf64_Sym, 24 bytes
_NHDR = struct.Struct("<III")                # Elf64_Nhdr, 12 bytes

ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB, ELFDATA2MSB = 1, 2
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD, PT_NOTE = 1, 4
PN_XNUM = 0xFFFF
SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 2, 3, 8
SHN_UNDEF = 0
STB_GLOBAL = 1
STT_SECTION, STT_FILE = 3, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18

_ET_NAMES = {0: "ET_NONE", 1: "ET_REL (object file)", 3: "ET_DYN (shared object or PIE)", 4: "ET_CORE"}
_EM_NAMES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 22: "s390", 40: "ARM",
             183: "AArch64", 243: "RISC-V", 258: "LoongArch"}


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header with memory size > 0."""

    index: int          # program header number, as `readelf -l` counts them (from 0)
    paddr: GPA
    vaddr: int
    filesz: int
    memsz: int
    flags: int
    data: memoryview = field(repr=False)   # the filesz bytes from the file (a view, no copy)

    @property
    def end(self) -> GPA:
        return self.paddr + self.memsz

    def describe(self) -> str:
        return f"segment {self.index} at {int(self.paddr):#x} +{self.memsz:#x}"


@dataclass(frozen=True)
class ElfImage:
    """What the loader needs from a parsed image."""

    entry: int                      # e_entry, as written in the file
    pvh_entry: Optional[GPA]        # XEN_ELFNOTE_PHYS32_ENTRY, if present
    segments: tuple[ElfSegment, ...]
    symbols: dict[str, int]         # .symtab name -> st_value (empty if stripped)
    size: int                       # file length

    def long_mode_address(self, addr: int) -> Optional[GPA]:
        """`addr` as a GPA if the loader's identity map can run code there, else None.

        It must be non-zero, below 4 GiB (the identity map's reach) and inside a
        segment whose virtual and physical addresses agree.
        """
        if addr == 0 or addr >= 4 * GiB:
            return None
        for seg in self.segments:
            if seg.vaddr == seg.paddr and seg.paddr <= addr < seg.end:
                return GPA(addr)
        return None

    @property
    def long_entry(self) -> Optional[GPA]:
        """e_entry, if usable for the direct long-mode entry."""
        return self.long_mode_address(self.entry)


def _truncated(what: str, end: int, size: int) -> BadImageError:
    return BadImageError(f"file truncated: {what} ends at {end:#x} but file has {size:#x} bytes")


def _slice(data: bytes, offset: int, size: int, what: str) -> bytes:
    """data[offset:offset+size], or BadImageError if that range is not all in the file."""
    end = offset + size
    if end > len(data):
        raise _truncated(what, end, len(data))
    return data[offset:end]


def _align_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _check_ident(data: bytes) -> None:
    n = len(data)
    if n < 4 or data[:4] != b"\x7fELF":
        raise BadImageError("not an ELF file (it does not start with \\x7fELF)")
    if n < 6:
        raise _truncated("ELF header", _EHDR.size, n)
    if data[4] == ELFCLASS32:
        raise BadImageError("ELF is 32-bit; sealvm needs ELF64")
    if data[4] != ELFCLASS64:
        raise BadImageError(f"ELF class byte is {data[4]}; sealvm needs ELF64 (class 2)")
    if data[5] == ELFDATA2MSB:
        raise BadImageError("ELF is big-endian; sealvm needs a little-endian x86-64 image")
    if data[5] != ELFDATA2LSB:
        raise BadImageError(f"ELF data encoding byte is {data[5]}; sealvm needs little-endian (1)")
    if n < _EHDR.size:
        raise _truncated("ELF header", _EHDR.size, n)


def _parse_notes(blob: bytes, align: int, where: str) -> list[int]:
    """PVH entry addresses found in one note area (raising on malformed notes)."""
    found: list[int] = []
    pos = 0
    while pos < len(blob):
        if len(blob) - pos < _NHDR.size:
            if any(blob[pos:]):
                raise BadImageError(f"{where}: {len(blob) - pos} stray bytes after the last note")
            break
        namesz, descsz, ntype = _NHDR.unpack_from(blob, pos)
        name_start = pos + _NHDR.size
        desc_start = _align_up(name_start + namesz, align)
        desc_end = desc_start + descsz
        if desc_end > len(blob):
            raise BadImageError(
                f"{where}: note at offset {pos:#x} has name size {namesz:#x} and descriptor size "
                f"{descsz:#x}, which run past the end of the note data ({len(blob):#x} bytes)")
        name = blob[name_start:name_start + namesz]
        if name.rstrip(b"\0") == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
            if descsz not in (4, 8):
                raise BadImageError(
                    f"{where}: PVH entry note (Xen, type 18) has a {descsz}-byte descriptor; "
                    "expected 4 or 8")
            found.append(int.from_bytes(blob[desc_start:desc_end], "little"))
        pos = _align_up(desc_end, align)
    return found


def _read_sections(data: bytes, shoff: int, shentsize: int, shnum: int) -> list[tuple]:
    if shnum == 0:
        if shoff != 0:
            raise BadImageError("ELF uses extended section numbering (65280 or more sections); "
                                "sealvm does not support that")
        return []
    if shentsize != _SHDR.size:
        raise BadImageError(f"section header entry size is {shentsize}; ELF64 needs {_SHDR.size}")
    table = _slice(data, shoff, shnum * _SHDR.size, "section header table")
    return [_SHDR.unpack_from(table, i * _SHDR.size) for i in range(shnum)]


def _section_bytes(data: bytes, sections: list[tuple], idx: int, what: str) -> bytes:
    _n, sh_type, _f, _a, offset, size, *_ = sections[idx]
    if sh_type == SHT_NOBITS:
        return b""
    return _slice(data, offset, size, f"{what} (section {idx})")


def _read_symbols(data: bytes, sections: list[tuple]) -> dict[str, int]:
    symbols: dict[str, int] = {}
    is_global: dict[str, bool] = {}
    for idx, sh in enumerate(sections):
        if sh[1] != SHT_SYMTAB:
            continue
        link, entsize = sh[6], sh[9]
        if entsize != _SYM.size:
            raise BadImageError(f".symtab entry size is {entsize}; ELF64 needs {_SYM.size}")
        if link >= len(sections) or sections[link][1] != SHT_STRTAB:
            raise BadImageError(f".symtab (section {idx}) links to section {link}, "
                                "which is not a string table")
        if sh[5] // _SYM.size > MAX_SYMBOLS:
            raise BadImageError(f".symtab has {sh[5] // _SYM.size} symbols; the limit is {MAX_SYMBOLS}")
        table = _section_bytes(data, sections, idx, ".symtab")
        strtab = _section_bytes(data, sections, link, "symbol string table")
        if len(table) % _SYM.size:
            raise BadImageError(f".symtab size {len(table):#x} is not a multiple of {_SYM.size}")
        for i in range(len(table) // _SYM.size):
            st_name, st_info, _other, st_shndx, st_value, _size = _SYM.unpack_from(table, i * _SYM.size)
            if st_name == 0 or st_shndx == SHN_UNDEF or (st_info & 0xF) in (STT_SECTION, STT_FILE):
                continue
            end = strtab.find(b"\0", st_name) if st_name < len(strtab) else -1
            if end < 0:
                raise BadImageError(f"symbol {i}: name at string table offset {st_name:#x} is past the "
                                    f"end of the string table or not NUL-terminated")
            name = strtab[st_name:end].decode("utf-8", "replace")
            glob = (st_info >> 4) == STB_GLOBAL
            if name not in symbols or (glob and not is_global[name]):
                symbols[name] = st_value
                is_global[name] = glob
        break   # an ELF file has at most one .symtab
    return symbols


def _check_segment(i: int, p_offset: int, vaddr: int, paddr: int, filesz: int, memsz: int,
                   size: int) -> None:
    if filesz and p_offset + filesz > size:
        raise _truncated(f"segment {i} file data (offset {p_offset:#x} +{filesz:#x})",
                         p_offset + filesz, size)
    if filesz > memsz:
        raise BadImageError(f"segment {i}: file size {filesz:#x} is larger than its memory size {memsz:#x}")
    if paddr + memsz > 1 << 64 or vaddr + memsz > 1 << 64:
        raise BadImageError(f"segment {i} at {paddr:#x} +{memsz:#x} wraps past the end of the "
                            "64-bit address space")


def parse_elf(data: bytes, max_size: int = MAX_IMAGE_SIZE, *, need_entry: bool = True) -> ElfImage:
    """Parse and validate an ELF64 x86-64 executable.  Raises BadImageError.

    With `need_entry` False, an image without any usable entry is returned
    (the caller gives its own reason for refusing it)."""
    if len(data) > max_size:
        raise BadImageError(f"image is {len(data)} bytes; the limit is {max_size} bytes")
    data = bytes(data)
    _check_ident(data)
    (_ident, e_type, e_machine, _ver, e_entry, e_phoff, e_shoff, _flags, _ehsize,
     e_phentsize, e_phnum, e_shentsize, e_shnum, _shstrndx) = _EHDR.unpack_from(data, 0)
    if e_machine != EM_X86_64:
        name = _EM_NAMES.get(e_machine, f"machine {e_machine}")
        raise BadImageError(f"ELF is for {name}, not x86-64 (e_machine {e_machine}, expected 62)")
    if e_type != ET_EXEC:
        name = _ET_NAMES.get(e_type, f"type {e_type}")
        raise BadImageError(f"ELF is {name}; sealvm loads only static executables (ET_EXEC)")
    if e_phnum == 0:
        raise BadImageError("ELF has no program headers (zero segments); there is nothing to load")
    if e_phnum == PN_XNUM:
        raise BadImageError("ELF uses extended program header numbering (65535 or more segments); "
                            "sealvm does not support that")
    if e_phentsize != _PHDR.size:
        raise BadImageError(f"program header entry size is {e_phentsize}; ELF64 needs {_PHDR.size}")
    phdrs = _slice(data, e_phoff, e_phnum * _PHDR.size, "program header table")

    view = memoryview(data)
    segments: list[ElfSegment] = []
    pvh: list[int] = []
    note_bytes = 0      # capped, so thousands of huge PT_NOTEs cannot stall the loader
    for i in range(e_phnum):
        p_type, p_flags, p_offset, vaddr, paddr, filesz, memsz, p_align = _PHDR.unpack_from(
            phdrs, i * _PHDR.size)
        if p_type == PT_LOAD:
            _check_segment(i, p_offset, vaddr, paddr, filesz, memsz, len(data))
            if memsz:
                segments.append(ElfSegment(i, GPA(paddr), vaddr, filesz, memsz, p_flags,
                                           view[p_offset:p_offset + filesz]))
        elif p_type == PT_NOTE:
            note_bytes += filesz
            if note_bytes > MAX_NOTE_BYTES:
                raise BadImageError(f"the image's notes total more than {MAX_NOTE_BYTES} bytes; "
                                    "a PVH image needs only a few")
            blob = _slice(data, p_offset, filesz, f"note segment {i}")
            pvh += _parse_notes(blob, 8 if p_align == 8 else 4, f"note segment {i}")
    if not segments:
        raise BadImageError("ELF has no loadable segments (no PT_LOAD program header with a "
                            "non-zero memory size)")
    ordered = sorted(segments, key=lambda s: s.paddr)
    for a, b in zip(ordered, ordered[1:]):
        if b.paddr < a.end:
            raise BadImageError(f"{a.describe()} and {b.describe()} overlap")

    symbols = _read_symbols(data, _read_sections(data, e_shoff, e_shentsize, e_shnum))

    pvh_entry: Optional[GPA] = None
    if pvh:
        if any(v != pvh[0] for v in pvh):
            raise BadImageError("conflicting PVH entry notes: " + ", ".join(f"{v:#x}" for v in pvh))
        if pvh[0] >= 4 * GiB:
            raise BadImageError(f"PVH entry note gives {pvh[0]:#x}; a 32-bit entry must lie below 4 GiB")
        if not any(s.paddr <= pvh[0] < s.end for s in segments):
            raise BadImageError(f"PVH entry {pvh[0]:#x} is not inside any loadable segment")
        pvh_entry = GPA(pvh[0])
    image = ElfImage(e_entry, pvh_entry, tuple(segments), symbols, len(data))
    if need_entry and pvh_entry is None and image.long_entry is None:
        raise BadImageError(f"no PVH entry note and no usable e_entry ({e_entry:#x} is not inside a "
                            "loadable segment with p_vaddr == p_paddr below 4 GiB)")
    return image


def _describe_ram(memory: GuestMemory) -> str:
    return ", ".join(f"{int(r.gpa):#x}-{int(r.end):#x}" for r in memory.regions)


def check_placement(image: ElfImage, memory: GuestMemory) -> None:
    """Raise BadImageError unless every segment lies in RAM, clear of the MMIO hole and loader area."""
    for seg in image.segments:
        start, end = int(seg.paddr), int(seg.end)
        if start < MMIO_HOLE_END and end > MMIO_HOLE_START:
            raise BadImageError(f"{seg.describe()} overlaps the MMIO hole "
                                f"({int(MMIO_HOLE_START):#x}-{int(MMIO_HOLE_END):#x})")
        if start < LOADER_AREA_END and end > LOADER_AREA_START:
            raise BadImageError(f"image overlaps the loader's reserved area below 1 MiB "
                                f"({int(LOADER_AREA_START):#x}-{int(LOADER_AREA_END):#x}): "
                                f"{seg.describe()}")
        if not memory.contains(seg.paddr, seg.memsz):
            raise BadImageError(f"{seg.describe()} lies outside guest RAM ({_describe_ram(memory)}); "
                                "give the guest more memory or link the image lower")


def load_elf(image: ElfImage, memory: GuestMemory) -> list[tuple[GPA, int]]:
    """Copy the PT_LOAD segments to their p_paddr and zero their bss.

    All segments are checked first, so a rejected image leaves RAM untouched.
    Returns the (gpa, size) ranges written.
    """
    check_placement(image, memory)
    loaded: list[tuple[GPA, int]] = []
    for seg in image.segments:
        memory.write(seg.paddr, seg.data)
        if seg.memsz > seg.filesz:
            memory.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, 0)
        loaded.append((seg.paddr, seg.memsz))
    return loaded

"""Guest loader: ELF parsing/loading, hvm_start_info, boot CPU state (no KVM needed)."""
from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_loader_elfbuild import (  # noqa: E402
    AP_ENTRY64, BSS_SIZE, CODE, E_ENTRY, E_MACHINE, E_PHENTSIZE, E_PHNUM, E_PHOFF, E_SHOFF, ENTRY32,
    ENTRY64, LOAD_ADDR, P_FILESZ, P_MEMSZ, P_OFFSET, P_PADDR, PROGRESS, Seg, good_bytes, note, phdr_offset, pvh_note)

from sealvm.core.addr import (  # noqa: E402
    BOOT_GDT_GPA, CMDLINE_GPA, CMDLINE_MAX, GPA, MEMMAP_GPA, START_INFO_GPA, GiB, HostOffset, MiB)
from sealvm.core.boot.cpu_state import (  # noqa: E402
    CODE32, CODE64, DATA, PVH_GDT_GPA, descriptor, long_mode_state, pvh_entry_state,
    write_long_mode_tables)
from sealvm.core.boot.elf import load_elf, parse_elf  # noqa: E402
from sealvm.core.boot.errors import (  # noqa: E402
    BadImageError, BootConfigError, BootError, CmdlineError)
from sealvm.core.boot.loader import load_guest  # noqa: E402
from sealvm.core.boot.pvh import write_start_info  # noqa: E402
from sealvm.core.memory import GuestMemory, RamRegion  # noqa: E402

RAM = 16 * MiB


@pytest.fixture
def mem() -> GuestMemory:
    return GuestMemory.anonymous(RAM)


def patch(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


# ---- good images ----------------------------------------------------------

def test_good_image_loads_bytes_and_zeroes_bss(mem):
    mem.fill(LOAD_ADDR, len(CODE) + BSS_SIZE + 0x100, 0xEE)     # dirty RAM, bss must be cleared
    plan = load_guest(good_bytes(), mem, "hello")
    assert mem.read(LOAD_ADDR, len(CODE)) == CODE
    assert mem.read(LOAD_ADDR + len(CODE), BSS_SIZE) == bytes(BSS_SIZE)
    assert mem.read(LOAD_ADDR + len(CODE) + BSS_SIZE, 0x100) == b"\xee" * 0x100   # past memsz: untouched
    assert plan.loaded == [(GPA(LOAD_ADDR), len(CODE) + BSS_SIZE)]
    assert plan.entry == ENTRY32 and plan.entry_mode == "pvh"
    assert plan.start_info == START_INFO_GPA


@pytest.mark.parametrize("desc_size", [4, 8])
def test_pvh_entry_from_note_desc_sizes(desc_size):
    image = parse_elf(good_bytes(desc_size=desc_size))
    assert image.pvh_entry == ENTRY32
    assert image.entry == ENTRY64 and image.long_entry == ENTRY64


def test_pvh_note_among_other_notes():
    notes = note(b"GNU", 3, b"\x01" * 20) + pvh_note(ENTRY32, 4) + note(b"Xen", 5, b"x")
    assert parse_elf(good_bytes(notes=notes)).pvh_entry == ENTRY32


def test_symbols_found():
    syms = parse_elf(good_bytes()).symbols
    assert syms["ap_entry64"] == AP_ENTRY64 and syms["progress"] == PROGRESS
    assert syms["entry32"] == ENTRY32


def test_stripped_image_has_no_symbols_but_boots_one_vcpu(mem):
    data = good_bytes(symbols={})
    assert parse_elf(data).symbols == {}
    assert len(load_guest(data, mem, "").cpus) == 1
    with pytest.raises(BadImageError, match="no 'ap_entry64' symbol"):
        load_guest(data, GuestMemory.anonymous(RAM), "", vcpus=2)


def test_parse_then_load_elf_directly(mem):
    image = parse_elf(good_bytes(segments=[Seg(LOAD_ADDR, CODE), Seg(0x200000, b"\xab" * 8, memsz=0x20)]))
    assert load_elf(image, mem) == [(LOAD_ADDR, len(CODE)), (0x200000, 0x20)]
    assert mem.read(0x200000, 0x20) == b"\xab" * 8 + bytes(0x18)
    assert [s.index for s in image.segments] == [0, 1]


def test_e_entry_outside_segments_only_matters_for_long_entry(mem):
    data = patch(GOOD, E_ENTRY, "<Q", 0x4000000)
    assert parse_elf(data).long_entry is None
    assert load_guest(data, mem, "").entry == ENTRY32
    with pytest.raises(BadImageError, match="e_entry 0x4000000 cannot be used"):
        load_guest(data, GuestMemory.anonymous(RAM), "", entry="long")


# ---- start_info, memmap, cmdline -------------------------------------------

def test_start_info_fields_at_documented_offsets(mem):
    si = write_start_info(mem, "console=ttyS0 iters=5")
    assert si == START_INFO_GPA
    assert mem.read_u32(si + 0) == 0x336EC578
    assert mem.read_u32(si + 4) == 1           # version
    assert mem.read_u32(si + 8) == 0           # flags
    assert mem.read_u32(si + 12) == 0          # nr_modules
    assert mem.read_u64(si + 16) == 0          # modlist_paddr
    assert mem.read_u64(si + 24) == CMDLINE_GPA
    assert mem.read_u64(si + 32) == 0          # rsdp_paddr
    assert mem.read_u64(si + 40) == MEMMAP_GPA
    assert mem.read_u32(si + 48) == 3          # memmap_entries
    assert mem.read_u32(si + 52) == 0
    expected = (struct.pack("<QQII", 0, 0x6000, 1, 0)
                + struct.pack("<QQII", 0x6000, 0xA000, 2, 0)
                + struct.pack("<QQII", 0x10000, RAM - 0x10000, 1, 0))
    assert mem.read(MEMMAP_GPA, len(expected)) == expected
    assert mem.read(CMDLINE_GPA, 22) == b"console=ttyS0 iters=5\0"


def test_memmap_lists_ram_above_the_hole():
    buf = bytearray(4 * MiB)
    regions = [RamRegion(GPA(0), 2 * MiB, HostOffset(0)),
               RamRegion(GPA(4 * GiB), 2 * MiB, HostOffset(2 * MiB))]
    mem = GuestMemory(buf, regions)
    write_start_info(mem, "")
    n = mem.read_u32(START_INFO_GPA + 48)
    got = [struct.unpack_from("<QQII", mem.read(MEMMAP_GPA + 24 * i, 24)) for i in range(n)]
    assert got == [(0, 0x6000, 1, 0), (0x6000, 0xA000, 2, 0), (0x10000, 2 * MiB - 0x10000, 1, 0),
                   (4 * GiB, 2 * MiB, 1, 0)]


def test_cmdline_limits(mem):
    write_start_info(mem, "a" * CMDLINE_MAX)
    assert mem.read(CMDLINE_GPA + CMDLINE_MAX, 1) == b"\0"
    with pytest.raises(CmdlineError, match=f"is {CMDLINE_MAX + 1} bytes; the limit is {CMDLINE_MAX}"):
        write_start_info(mem, "a" * (CMDLINE_MAX + 1))
    with pytest.raises(CmdlineError, match="NUL"):
        write_start_info(mem, "a\0b")


def test_too_long_cmdline_writes_nothing(mem):
    with pytest.raises(CmdlineError):
        load_guest(good_bytes(), mem, "x" * 5000)
    assert mem.read(LOAD_ADDR, 16) == bytes(16) and mem.read_u32(START_INFO_GPA) == 0


# ---- CPU state -------------------------------------------------------------

def walk(mem: GuestMemory, cr3: int, va: int) -> int:
    """Translate `va` through 4-level tables in guest memory; checks P/RW/US on the way."""
    table = cr3
    for level, shift in enumerate((39, 30, 21)):
        e = mem.read_u64(table + ((va >> shift) & 0x1FF) * 8)
        assert e & 0x7 == 0x7, f"level {level}: entry {e:#x} lacks P|RW|US"
        if level == 2:
            assert e & 0x80, "PD entry is not a 2 MiB page"
            return (e & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)
        assert not e & 0x80
        table = e & ~0xFFF & ((1 << 52) - 1)
    raise AssertionError("unreachable")


def test_long_mode_identity_map_and_state(mem):
    cr3, gdt = write_long_mode_tables(mem)
    state = long_mode_state(ENTRY64, START_INFO_GPA, cr3=cr3, gdt=gdt)
    for va in (0, 0x1234, 0x100000, 0x1234567, 0x3FFFFFFF, 0x40000000, 0xBFFFF000, 0xD0000010,
               0xFFFFFFFF):
        assert walk(mem, state.cr3, va) == va
    assert state.cr3 == 0x9000 and state.cr0 == 0x80000011 and state.cr4 == 0x20 and state.efer == 0x500
    assert state.regs["rip"] == ENTRY64 and state.regs["rbx"] == START_INFO_GPA and state.regs["rflags"] == 2
    cs = state.segments["cs"]
    assert (cs.selector, cs.type, cs.l, cs.db, cs.present, cs.s) == (0x08, 0xB, 1, 0, 1, 1)
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert state.segments[name].selector == 0x10 and state.segments[name].type == 3
    tr, ldt = state.segments["tr"], state.segments["ldt"]
    assert (tr.type, tr.present, tr.limit, tr.selector, tr.s) == (11, 1, 0x67, 0, 0)
    assert (ldt.type, ldt.present) == (2, 1)
    gdt = mem.read(BOOT_GDT_GPA, 24)
    assert struct.unpack("<3Q", gdt) == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    assert state.gdt.base == BOOT_GDT_GPA and state.gdt.limit == 23
    assert mem.read_u64(0xF000) == 0, "page tables must end below 0xf000"


def test_pvh_state(mem):
    plan = load_guest(good_bytes(), mem, "")
    s = plan.cpus[0]
    assert s == pvh_entry_state(ENTRY32, START_INFO_GPA, s.gdt)
    assert s.regs["rip"] == ENTRY32 and s.regs["rbx"] == START_INFO_GPA and s.regs["rflags"] == 2
    assert (s.cr0, s.cr3, s.cr4, s.efer) == (0x11, 0, 0, 0)
    cs = s.segments["cs"]
    assert (cs.base, cs.limit, cs.selector, cs.type, cs.s, cs.present, cs.db, cs.g, cs.l) == \
        (0, 0xFFFFFFFF, 0x08, 0xB, 1, 1, 1, 1, 0)
    assert all(s.segments[n] == DATA for n in ("ds", "es", "fs", "gs", "ss"))
    assert s.gdt.base == PVH_GDT_GPA
    assert struct.unpack("<3Q", mem.read(PVH_GDT_GPA, 24)) == (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)


def test_descriptors():
    assert descriptor(CODE64) == 0x00AF9B000000FFFF
    assert descriptor(CODE32) == 0x00CF9B000000FFFF
    assert descriptor(DATA) == 0x00CF93000000FFFF


@pytest.mark.parametrize("entry", ["pvh", "long"])
def test_secondary_vcpus(mem, entry):
    plan = load_guest(good_bytes(), mem, "", entry=entry, vcpus=4)
    assert len(plan.cpus) == 4
    for i, ap in enumerate(plan.cpus[1:], start=1):
        assert ap.regs["rip"] == AP_ENTRY64 and ap.regs["rdi"] == i and ap.regs["rbx"] == START_INFO_GPA
        assert ap.segments["cs"].l == 1 and ap.efer == 0x500 and ap.cr3 == 0x9000
        assert ap.gdt.base == BOOT_GDT_GPA
    assert walk(mem, 0x9000, AP_ENTRY64) == AP_ENTRY64     # tables written even for a PVH BSP


def test_entry_mode_errors(mem):
    with pytest.raises(BootConfigError, match="unknown entry mode"):
        load_guest(good_bytes(), mem, "", entry="real")
    with pytest.raises(BootConfigError, match="vCPU count"):
        load_guest(good_bytes(), mem, "", vcpus=0)
    with pytest.raises(BadImageError, match="no PVH entry note"):
        load_guest(good_bytes(notes=b""), mem, "")
    with pytest.raises(BadImageError, match="cannot be used for the direct long-mode entry"):
        load_guest(good_bytes(entry=0x5000000), mem, "", entry="long")


# ---- bad images ------------------------------------------------------------

GOOD = good_bytes()
PH0 = phdr_offset(0)

BAD_IMAGES = {
    "not elf": (b"MZ\x90\0" + bytes(200), "not an ELF file"),
    "empty": (b"", "not an ELF file"),
    "32-bit": (GOOD[:4] + b"\x01" + GOOD[5:], "ELF is 32-bit; sealvm needs ELF64"),
    "big-endian": (GOOD[:5] + b"\x02" + GOOD[6:], "big-endian"),
    "wrong machine": (patch(GOOD, E_MACHINE, "<H", 183), "AArch64, not x86-64"),
    "ET_DYN": (good_bytes(e_type=3), "ET_DYN"),
    "truncated header": (GOOD[:40], "file truncated: ELF header ends at 0x40 but file has 0x28 bytes"),
    "phdr table past EOF": (patch(GOOD, E_PHOFF, "<Q", len(GOOD) - 10),
                            f"file truncated: program header table ends at {len(GOOD) - 10 + 112:#x} "
                            f"but file has {len(GOOD):#x} bytes"),
    "phentsize": (patch(GOOD, E_PHENTSIZE, "<H", 32), "program header entry size is 32"),
    "segment data past EOF": (patch(GOOD, PH0 + P_FILESZ, "<Q", len(GOOD)),
                              "file truncated: segment 0 file data"),
    "filesz > memsz": (patch(GOOD, PH0 + P_MEMSZ, "<Q", 0x10),
                       "file size 0x200 is larger than its memory size 0x10"),
    "outside RAM": (good_bytes(segments=[Seg(0x2000000, CODE)], entry=0x2000000, notes=b""),
                    "segment 0 at 0x2000000 +0x200 lies outside guest RAM (0x0-0x1000000)"),
    "straddles RAM end": (good_bytes(segments=[Seg(RAM - 0x100, CODE)], entry=RAM - 0x100, notes=b""),
                          "lies outside guest RAM"),
    "MMIO hole": (good_bytes(segments=[Seg(0xC0000000, CODE)], entry=0xC0000000, notes=b""),
                  "segment 0 at 0xc0000000 +0x200 overlaps the MMIO hole"),
    "reserved area": (good_bytes(segments=[Seg(0x8000, CODE)], entry=0x8000, notes=b""),
                      "image overlaps the loader's reserved area below 1 MiB (0x6000-0x10000)"),
    "zero segments": (patch(GOOD, E_PHNUM, "<H", 0), "zero segments"),
    "only a note": (good_bytes(segments=[]), "no loadable segments"),
    "note sizes": (good_bytes(notes=struct.pack("<III", 4, 0x1000, 18) + b"Xen\0" + bytes(8)),
                   "run past the end of the note data"),
    "note namesz": (good_bytes(notes=struct.pack("<III", 0xFFFFFFF0, 8, 18) + b"Xen\0" + bytes(8)),
                    "run past the end of the note data"),
    "note desc 5": (good_bytes(notes=note(b"Xen", 18, b"\0" * 5)), "5-byte descriptor; expected 4 or 8"),
    "PVH entry outside": (good_bytes(notes=pvh_note(0x9000000)), "PVH entry 0x9000000 is not inside"),
    "PVH entry >4G": (good_bytes(notes=pvh_note(0x1_0010_0000)), "below 4 GiB"),
    "conflicting notes": (good_bytes(notes=pvh_note(ENTRY32) + pvh_note(ENTRY64)),
                          "conflicting PVH entry notes"),
    "no entry at all": (good_bytes(notes=b"", entry=0), "no PVH entry note and no usable e_entry"),
    "overlapping segments": (good_bytes(segments=[Seg(LOAD_ADDR, CODE), Seg(LOAD_ADDR + 0x100, CODE)]),
                             "segment 0 at 0x100000 +0x200 and segment 1 at 0x100100 +0x200 overlap"),
    "phoff ~0": (patch(GOOD, E_PHOFF, "<Q", 2**64 - 1), "file truncated: program header table ends at"),
    "p_offset ~0": (patch(GOOD, PH0 + P_OFFSET, "<Q", 2**64 - 1), "file truncated: segment 0 file data"),
    "filesz ~0": (patch(patch(GOOD, PH0 + P_FILESZ, "<Q", 2**64 - 1), PH0 + P_MEMSZ, "<Q", 2**64 - 1),
                  "file truncated: segment 0"),
    "memsz ~0": (patch(GOOD, PH0 + P_MEMSZ, "<Q", 2**64 - 1),
                 "wraps past the end of the 64-bit address space"),
    "paddr wraps": (patch(GOOD, PH0 + P_PADDR, "<Q", 2**64 - 0x100), "wraps past the end"),
    "paddr huge": (patch(GOOD, PH0 + P_PADDR, "<Q", 0x7FFF_0000_0000), "PVH entry 0x100010 is not inside"),
    "shoff ~0": (patch(GOOD, E_SHOFF, "<Q", 2**64 - 1), "file truncated: section header table ends at"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image(name, mem):
    data, message = BAD_IMAGES[name]
    with pytest.raises(BadImageError) as info:
        load_guest(data, mem, "", entry="pvh" if b"Xen" in data else "long")
    assert message in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)
    assert mem.read(0, 2 * MiB) == bytes(2 * MiB), "a rejected image must not touch RAM"


def test_huge_segment_not_in_ram_rejected_before_any_write(mem):
    data = good_bytes(segments=[Seg(LOAD_ADDR, CODE), Seg(0x800000, CODE, memsz=0x4000000)])
    with pytest.raises(BadImageError, match="segment 1 at 0x800000 \\+0x4000000 lies outside guest RAM"):
        load_guest(data, mem, "")
    assert mem.read(LOAD_ADDR, len(CODE)) == bytes(len(CODE))


def test_symbol_name_past_strtab():
    data = bytearray(GOOD)
    shoff = struct.unpack_from("<Q", data, E_SHOFF)[0]
    symtab = struct.unpack_from("<IIQQQQIIQQ", data, shoff + 64)    # section 1 = .symtab
    struct.pack_into("<I", data, symtab[4] + 24, 0x7FFFFFFF)         # symbol 1's st_name
    with pytest.raises(BadImageError, match="symbol 1: name at string table offset 0x7fffffff"):
        parse_elf(bytes(data))


def test_image_size_cap(tmp_path, mem):
    with pytest.raises(BadImageError, match="the limit is 100 bytes"):
        load_guest(GOOD, mem, "", max_size=100)


def test_boot_errors_are_value_errors():
    for cls in (BadImageError, BootConfigError, CmdlineError):
        assert issubclass(cls, BootError) and issubclass(cls, ValueError)


# ---- a real toolchain-built guest (skipped without gcc/ld) -------------------

BOOT_S = r"""
    .section .note.pvh, "a", @note
    .balign 4
    .long 4, 8, 18
    .asciz "Xen"
    .quad entry32
    .text
    .code32
    .globl entry32
entry32: cli; hlt; jmp entry32
    .code64
    .globl entry64, ap_entry64
entry64: hlt; jmp entry64
ap_entry64: hlt; jmp ap_entry64
    .data
    .globl progress
progress: .quad 0x1122334455667788
    .bss
    .lcomm scratch, 12288
    .section .note.GNU-stack, "", @progbits
"""
GUEST_LD = """
ENTRY(entry64)
PHDRS { text PT_LOAD FLAGS(7); note PT_NOTE FLAGS(4); }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) } :text
  .note.pvh : { *(.note.pvh) } :text :note
  .data : { *(.data) } :text
  .bss : { *(.bss) } :text
  /DISCARD/ : { *(.note.gnu.*) *(.comment) *(.eh_frame*) }
}
"""


@pytest.mark.skipif(not (shutil.which("gcc") and shutil.which("ld")), reason="needs gcc and ld")
def test_gcc_built_guest(tmp_path, mem):
    (tmp_path / "boot.S").write_text(BOOT_S)
    (tmp_path / "guest.ld").write_text(GUEST_LD)
    subprocess.run(["gcc", "-c", "boot.S", "-o", "boot.o"], cwd=tmp_path, check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-nostdlib", "-static", "-z", "max-page-size=4096",
                    "--no-warn-rwx-segments", "-T", "guest.ld", "boot.o", "-o", "guest.elf"],
                   cwd=tmp_path, check=True, capture_output=True)
    path = tmp_path / "guest.elf"
    image = parse_elf(path.read_bytes())
    syms = image.symbols
    assert image.pvh_entry == syms["entry32"] and image.entry == syms["entry64"]
    assert image.segments[0].paddr == 0x100000 and image.segments[0].memsz > image.segments[0].filesz
    plan = load_guest(path.read_bytes(), mem, "iters=1", vcpus=2)
    assert mem.read_u64(syms["progress"]) == 0x1122334455667788
    assert plan.cpus[1].regs["rip"] == syms["ap_entry64"]
    # stripped copy: still boots one vCPU, refuses two
    if shutil.which("strip"):
        subprocess.run(["strip", "-o", "stripped.elf", "guest.elf"], cwd=tmp_path, check=True)
        stripped = (tmp_path / "stripped.elf").read_bytes()
        assert parse_elf(stripped).pvh_entry == syms["entry32"]
        with pytest.raises(BadImageError, match="ap_entry64"):
            load_guest(stripped, GuestMemory.anonymous(RAM), "", vcpus=2)


def test_many_huge_notes_are_capped_not_parsed_forever():
    """65534 PT_NOTEs each covering the whole file must be refused quickly, not parsed."""
    n = 65534
    body = bytearray(64 + n * 56)
    load_off = len(body)
    body += CODE
    struct.pack_into("<IIQQQQQQ", body, 64, 1, 7, load_off, LOAD_ADDR, LOAD_ADDR, len(CODE), len(CODE), 16)
    for i in range(1, n):
        struct.pack_into("<IIQQQQQQ", body, 64 + i * 56, 4, 4, 0, 0, 0, len(body), len(body), 4)
    body[:64] = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, LOAD_ADDR,
                            64, 0, 0, 64, 56, n, 64, 0, 0)
    with pytest.raises(BadImageError, match="notes total more than"):
        parse_elf(bytes(body))

"""Fuzzing the ELF loader: mutated, truncated and random images.

Property: `parse_elf` + `load_guest` either succeed with every segment inside
guest RAM, or raise BadImageError; nothing else escapes, and no byte of RAM
outside the segments' [p_paddr, p_paddr + p_memsz) ranges and the loader's own
area changes.
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_loader_elfbuild import (  # noqa: E402
    EHDR, PHDR, PHOFF, PT_LOAD, PT_NOTE, Elf, Seg, good_bytes, pvh_note)

from sealvm.core.addr import MiB  # noqa: E402
from sealvm.core.boot.elf import parse_elf  # noqa: E402
from sealvm.core.boot.errors import BadImageError  # noqa: E402
from sealvm.core.boot.loader import load_guest  # noqa: E402
from sealvm.core.boot.elf import LOADER_AREA_END, LOADER_AREA_START  # noqa: E402
from sealvm.core.memory import GuestMemory  # noqa: E402

RAM = 2 * MiB
PATTERN = 0x5A
GOOD = good_bytes(segments=[Seg(0x100000, bytes(range(256)) * 4, memsz=0x1800),
                            Seg(0x180000, b"\xcc" * 64, memsz=0x100)])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class TrackingMemory(GuestMemory):
    """GuestMemory that records every range written through write()/fill()."""

    def __init__(self) -> None:
        super().__init__(bytearray([PATTERN]) * RAM, GuestMemory.anonymous(RAM).regions)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa, data) -> None:
        self.writes.append((int(gpa), len(data)))
        super().write(gpa, data)

    def fill(self, gpa, length, byte=0) -> None:
        self.writes.append((int(gpa), length))
        super().fill(gpa, length, byte)


def check(data: bytes, entry: str = "pvh", vcpus: int = 1) -> None:
    mem = TrackingMemory()
    try:
        plan = load_guest(data, mem, "fuzz=1", entry=entry, vcpus=vcpus)
    except BadImageError as e:
        assert str(e), "error without a message"
        assert mem.writes == [], "a rejected image wrote to RAM"
        assert mem.read(0, RAM) == bytes([PATTERN]) * RAM
        return
    allowed = [(int(s.paddr), int(s.end)) for s in plan.image.segments]
    for start, end in allowed:
        assert 0 <= start < end <= RAM
    allowed.append((int(LOADER_AREA_START), int(LOADER_AREA_END)))
    for gpa, size in mem.writes:
        assert any(a <= gpa and gpa + size <= b for a, b in allowed), f"wrote {gpa:#x}+{size:#x}"
    # Independently of the hooks: bytes outside the allowed ranges are unchanged.
    after = bytearray(mem.read(0, RAM))
    for a, b in allowed:
        after[a:b] = bytes([PATTERN]) * (b - a)
    assert after == bytes([PATTERN]) * RAM


def test_good_image_passes_check():
    image = parse_elf(GOOD)
    assert len(image.segments) == 2
    check(GOOD)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.sampled_from(["pvh", "long"]), st.integers(1, 3))
def test_byte_mutations(edits, entry, vcpus):
    data = bytearray(GOOD)
    for pos, value in edits:
        data[pos] = value
    check(bytes(data), entry, vcpus)


# Header and program-header fields that matter most, overwritten with edge values.
FIELDS = [(24, "<Q"), (32, "<Q"), (40, "<Q"), (54, "<H"), (56, "<H"), (58, "<H"), (60, "<H")] + [
    (PHOFF + i * PHDR.size + off, "<Q") for i in range(3) for off in (8, 16, 24, 32, 40)]
EDGE = st.one_of(st.sampled_from([0, 1, 0x40, 0x1000, 0x5FFF, 0x6000, 0xFFFF, 0x100000, 0x1FFFFF, 0x200000,
                                  0xC0000000, 2**32 - 1, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(FIELDS), EDGE), min_size=1, max_size=5))
def test_field_mutations(edits):
    data = bytearray(GOOD)
    for (off, fmt), value in edits:
        struct.pack_into(fmt, data, off, value & ((1 << (8 * struct.calcsize(fmt))) - 1))
    check(bytes(data))


@FUZZ
@given(st.integers(0, len(GOOD)))
def test_truncations(n):
    check(GOOD[:n])


def _header(entry, phoff, phnum, shoff, shnum, phentsize=PHDR.size, shentsize=64):
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    return EHDR.pack(ident, 2, 62, 1, entry, phoff, shoff, 0, 64, phentsize, phnum, shentsize, shnum, 0)


ADDR = st.one_of(st.integers(0, RAM + 0x1000), st.sampled_from([0x6000, 0xC0000000, 2**64 - 1]),
                 st.integers(0, 2**64 - 1))
PHDRS = st.lists(st.tuples(st.sampled_from([PT_LOAD, PT_LOAD, PT_NOTE, 0, 6]), st.integers(0, 0x300),
                           ADDR, st.integers(0, 0x400), st.integers(0, 0x3000)), min_size=0, max_size=4)


@FUZZ
@given(PHDRS, ADDR, st.integers(0, 0x400), st.integers(0, 2**64 - 1), st.integers(0, 8),
       st.binary(max_size=0x300), st.booleans())
def test_random_headers(phdrs, entry, phoff, shoff, shnum, tail, with_note):
    """Fully random headers (with a mostly valid frame so parsing gets deep)."""
    body = bytearray(_header(entry, phoff, len(phdrs), shoff, shnum))
    body = body.ljust(phoff, b"\0")
    for ptype, off, paddr, filesz, memsz in phdrs:
        body += PHDR.pack(ptype, 7, off, paddr, paddr, filesz, memsz, 4)
    if with_note:
        body += pvh_note(entry & 0xFFFFFFFF, 4)
    body += tail
    check(bytes(body))
    check(bytes(body), "long", 2)


@FUZZ
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes(blob):
    check(blob)
    check(b"\x7fELF\x02\x01\x01" + blob)


def test_elf_builder_variants_round_trip():
    """Builder sanity: different note placements parse as QEMU would (keeps the fuzz seeds meaningful).

    Only PT_NOTE program headers are read; a PVH note that is only in an SHT_NOTE section is
    not an entry point (QEMU's PVH loader does not look there either).
    """
    for kw, entry in (({}, 0x100000), ({"note_section": True}, 0x100000),
                      ({"note_phdr": False, "note_section": True}, None)):
        data = Elf([Seg(0x100000, b"\x90" * 32)], entry=0x100000, notes=pvh_note(0x100000), **kw).build()
        assert parse_elf(data).pvh_entry == entry

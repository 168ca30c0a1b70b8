"""PVH boot of a Linux `vmlinux` ELF: hvm_start_info, module list, memory map, refusals
(host-side, no KVM), on crafted images and on the real Debian kernel taken out of its bzImage."""
from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "linux"))
import nested  # noqa: E402
from test_loader_elfbuild import Elf, Seg, note, pvh_note  # noqa: E402

from sealvm.core.addr import CMDLINE_GPA, MEMMAP_GPA, START_INFO_GPA, MiB  # noqa: E402
from sealvm.core.boot import acpi, pvh  # noqa: E402
from sealvm.core.boot import bzimage as B  # noqa: E402
from sealvm.core.boot import vmlinux as V  # noqa: E402
from sealvm.core.boot.cpu_state import CR0_PE, CR0_PG  # noqa: E402
from sealvm.core.boot.errors import BadImageError, BootConfigError, CmdlineError  # noqa: E402
from sealvm.core.memory import GuestMemory  # noqa: E402

RAM = 64 * MiB
KBASE = 0x100_0000                      # where distribution kernels link their first segment
VBASE = 0xFFFF_FFFF_8100_0000
ENTRY = KBASE + 0x850
TEXT = bytes(range(256)) * 16
BSS = 0x30000


def kernel(notes: bytes | None = None, paddr: int = KBASE, **kw) -> bytes:
    """A vmlinux-shaped ELF: text at 16 MiB linked high, a bss tail, the PVH note."""
    return Elf(segments=[Seg(paddr, TEXT, memsz=len(TEXT) + BSS, vaddr=VBASE)],
               entry=paddr, notes=pvh_note(paddr + 0x850) if notes is None else notes, **kw).build()


@pytest.fixture
def mem():
    m = GuestMemory.anonymous(RAM)
    m.fill(0, RAM, 0xEE)                 # dirty RAM: what the loader writes stands out
    yield m
    m.close()


def _digest(m: GuestMemory) -> str:
    return hashlib.sha256(m.read(0, RAM)).hexdigest()


def test_start_info_modlist_memmap_rsdp_and_entry_state(mem):
    initrd = b"initrd!" * 3000
    virtio = [(0xD000_0000, 0x1000, 5)]
    plan = V.load_kernel(kernel(), initrd, mem, "console=ttyS0 quiet", vcpus=2, virtio=virtio)

    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries,
     reserved) = pvh.START_INFO.unpack(mem.read(START_INFO_GPA, pvh.START_INFO.size))
    assert (magic, version, flags, reserved) == (0x336EC578, 1, 0, 0)
    assert (cmdline, memmap) == (int(CMDLINE_GPA), int(MEMMAP_GPA))
    assert mem.read(CMDLINE_GPA, 20) == b"console=ttyS0 quiet\0"

    assert nr_modules == 1 and modlist == int(pvh.MODLIST_GPA)
    paddr, size, mod_cmdline, mod_reserved = pvh.MODLIST_ENTRY.unpack(
        mem.read(pvh.MODLIST_GPA, pvh.MODLIST_ENTRY.size))
    assert (paddr, size, mod_cmdline, mod_reserved) == (int(plan.initrd[0]), len(initrd), 0, 0)
    assert paddr % 4096 == 0 and paddr >= KBASE + len(TEXT) + BSS and paddr + size <= RAM
    assert mem.read(paddr, size) == initrd

    table = [pvh.MEMMAP_ENTRY.unpack_from(mem.read(MEMMAP_GPA, entries * 24), 24 * i)
             for i in range(entries)]
    assert [(a, s, t) for a, s, t, _ in table] == B.e820_map(mem)   # what a bzImage gets too
    assert (0x100000, RAM - 0x100000, 1) in [(a, s, t) for a, s, t, _ in table]
    assert (acpi.ACPI_AREA_START, acpi.ACPI_AREA_END - acpi.ACPI_AREA_START, 2) in \
        [(a, s, t) for a, s, t, _ in table]

    assert rsdp == acpi.RSDP_GPA and mem.read(rsdp, 8) == b"RSD PTR "
    assert b"LNRO0005" in mem.read(acpi.DSDT_GPA, 0x1000)           # the virtio-mmio device

    assert mem.read(KBASE, len(TEXT)) == TEXT
    assert mem.read(KBASE + len(TEXT), BSS) == bytes(BSS)           # bss zeroed

    (bsp,) = plan.cpus                                               # the kernel starts the APs
    assert bsp.regs["rip"] == ENTRY and bsp.regs["rbx"] == int(START_INFO_GPA)
    assert bsp.cr0 & CR0_PE and not bsp.cr0 & CR0_PG and bsp.efer == 0
    assert bsp.segments["cs"].db == 1 and bsp.segments["cs"].l == 0  # 32-bit code


def test_without_initrd_there_are_no_modules(mem):
    V.load_kernel(kernel(), None, mem, "")
    info = pvh.START_INFO.unpack(mem.read(START_INFO_GPA, pvh.START_INFO.size))
    assert info[3] == 0 and info[4] == 0                             # nr_modules, modlist_paddr
    assert mem.read(pvh.MODLIST_GPA, pvh.MODLIST_ENTRY.size) == bytes(pvh.MODLIST_ENTRY.size)


def test_bzimage_and_vmlinux_are_told_apart(mem):
    with pytest.raises(BadImageError, match="not a Linux bzImage"):
        V.check_kernel(b"MZ" + bytes(8190))
    V.check_kernel(kernel())


@pytest.mark.parametrize("image,error,message", [
    (kernel(notes=b""), BadImageError, "no PVH entry note"),
    (kernel(notes=note(b"Xen", 17, b"\0" * 8)), BadImageError, "no PVH entry note"),
    (kernel(machine=183), BadImageError, "not a bootable vmlinux: ELF is for AArch64"),
    (kernel()[:200], BadImageError, "not a bootable vmlinux: file truncated"),
    (kernel(paddr=RAM - 0x1000), BootConfigError, "does not fit this VM"),
    (kernel(paddr=0xBFFF_F000), BootConfigError, "MMIO hole"),
    (kernel(paddr=0xF0000), BadImageError, "overlaps the ACPI tables"),
])
def test_bad_kernels_are_refused_before_ram_is_touched(mem, image, error, message):
    before = _digest(mem)
    with pytest.raises(error, match=message):
        V.load_kernel(image, b"x" * 100, mem, "")
    assert _digest(mem) == before


@pytest.mark.parametrize("cmdline,initrd,error,message", [
    ("x" * 2048, None, CmdlineError, "at most 2047 bytes"),
    ("a\0b", None, CmdlineError, "NUL"),
    ("", b"\1" * (RAM - KBASE), BootConfigError, "initrd .* does not fit"),
])
def test_bad_cmdline_or_initrd_refused_before_ram_is_touched(mem, cmdline, initrd, error, message):
    before = _digest(mem)
    with pytest.raises(error, match=message):
        V.load_kernel(kernel(), initrd, mem, cmdline)
    assert _digest(mem) == before
    V.load_kernel(kernel(), None, mem, "x" * 2047)                   # the limit itself is fine


def test_start_info_refuses_more_modules_or_entries_than_fit(mem):
    with pytest.raises(BootConfigError, match="modules"):
        pvh.write_start_info(mem, "", modules=[(0x200000, 1)] * (pvh.MODLIST_MAX + 1))
    with pytest.raises(BootConfigError, match="memory map entries"):
        pvh.write_start_info(mem, "", memmap=[(0, 4096, 1)] * (pvh.MEMMAP_MAX_ENTRIES + 1))


def test_real_debian_vmlinux_has_a_pvh_entry_and_loads():
    bz = nested.debian_kernel().read_bytes()
    setup_end = (bz[0x1F1] + 1) * 512
    offset, length = struct.unpack_from("<II", bz, 0x248)
    data = nested.debian_vmlinux().read_bytes()
    # Linux appends the uncompressed size to its compressed payload.
    assert len(data) == struct.unpack_from("<I", bz, setup_end + offset + length - 4)[0]
    image = V.parse_vmlinux(data)
    assert image.pvh_entry is not None
    assert min(s.paddr for s in image.segments) == B.parse_bzimage(bz).pref_address
    big = GuestMemory.anonymous(256 * MiB)
    try:
        plan = V.load_kernel(data, b"initrd" * 1000, big, "console=ttyS0", vcpus=2)
        assert plan.cpus[0].regs["rip"] == image.pvh_entry
        first = image.segments[0]
        assert big.read(first.paddr, 4096) == bytes(first.data[:4096])
        assert plan.initrd[0] >= max(int(s.end) for s in image.segments)
        small = GuestMemory.anonymous(32 * MiB)
        with pytest.raises(BootConfigError, match="does not fit this VM"):
            V.load_kernel(data, None, small, "")
        small.close()
    finally:
        big.close()

"""The Linux boot protocol loader and the ACPI tables, on crafted bzImages and the real kernel."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from sealvm.core.addr import CMDLINE_GPA, MiB
from sealvm.core.boot import acpi
from sealvm.core.boot import bzimage as B
from sealvm.core.boot.errors import BadImageError, BootConfigError, CmdlineError
from sealvm.core.memory import GuestMemory

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "linux"))
import nested  # noqa: E402


def make_bzimage(*, version=0x020F, xloadflags=1, loadflags=1, setup_sects=4, payload=b"K" * 8192,
                 init_size=None, cmdline_size=2047, initrd_addr_max=0x7FFFFFFF,
                 pref_address=0x1000000, magic=b"HdrS", boot_flag=0xAA55) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[B.OFF_SETUP_SECTS] = setup_sects
    struct.pack_into("<H", setup, B.OFF_BOOT_FLAG, boot_flag)
    setup[B.OFF_JUMP:B.OFF_JUMP + 2] = bytes((0xEB, 0x66))      # jmp to the header's end (0x268)
    setup[B.OFF_HEADER:B.OFF_HEADER + 4] = magic
    struct.pack_into("<H", setup, B.OFF_VERSION, version)
    setup[B.OFF_LOADFLAGS] = loadflags
    struct.pack_into("<I", setup, B.OFF_INITRD_ADDR_MAX, initrd_addr_max)
    struct.pack_into("<H", setup, B.OFF_XLOADFLAGS, xloadflags)
    struct.pack_into("<I", setup, B.OFF_CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", setup, B.OFF_PREF_ADDRESS, pref_address)
    struct.pack_into("<I", setup, B.OFF_INIT_SIZE, init_size or 4 * MiB)
    return bytes(setup) + payload


@pytest.fixture
def memory():
    m = GuestMemory.anonymous(64 * MiB)
    yield m
    m.close()


def test_loads_kernel_zero_page_cmdline_initrd(memory):
    img = make_bzimage()
    initrd = b"I" * 10000
    plan = B.load_linux(img, initrd, memory, "console=ttyS0 quiet", vcpus=2)
    assert memory.read(B.KERNEL_GPA, 8192) == b"K" * 8192
    zp = memory.read(B.ZERO_PAGE_GPA, 4096)
    assert zp[B.OFF_HEADER:B.OFF_HEADER + 4] == b"HdrS"             # the setup header copied in
    assert zp[B.OFF_TYPE_OF_LOADER] == 0xFF
    assert zp[B.OFF_LOADFLAGS] == B.LOADED_HIGH | B.CAN_USE_HEAP
    assert struct.unpack_from("<I", zp, B.OFF_CMD_LINE_PTR)[0] == int(CMDLINE_GPA)
    assert memory.read(CMDLINE_GPA, 20) == b"console=ttyS0 quiet\0"
    gpa, size = struct.unpack_from("<II", zp, B.OFF_RAMDISK_IMAGE)
    assert (gpa, size) == (int(plan.initrd[0]), len(initrd))
    assert gpa % 4096 == 0 and gpa + size <= 64 * MiB and gpa >= 0x1000000 + 4 * MiB
    assert memory.read(gpa, size) == initrd
    n = zp[B.OFF_E820_ENTRIES]
    e820 = [struct.unpack_from("<QQI", zp, B.OFF_E820_TABLE + 20 * i) for i in range(n)]
    assert (0x100000, 63 * MiB, B.E820_RAM) in e820
    assert (acpi.ACPI_AREA_START, 0x20000, B.E820_RESERVED) in e820
    bsp = plan.cpus[0]
    assert len(plan.cpus) == 1                    # the kernel starts the others itself
    assert bsp.regs["rip"] == 0x100200 and bsp.regs["rsi"] == int(B.ZERO_PAGE_GPA)
    assert bsp.segments["cs"].selector == B.BOOT_CS and bsp.segments["cs"].l == 1
    assert bsp.segments["ds"].selector == B.BOOT_DS
    assert bsp.efer & (1 << 10) and bsp.cr0 & (1 << 31)
    gdt = memory.read(bsp.gdt.base, bsp.gdt.limit + 1)
    assert struct.unpack("<4Q", gdt)[2] == 0x00AF9B000000FFFF


@pytest.mark.parametrize("kwargs,message", [
    (dict(magic=b"NoPe"), "not a Linux bzImage"),
    (dict(boot_flag=0x1234), "not a Linux bzImage"),
    (dict(version=0x020A), "too old"),
    (dict(xloadflags=0), "no 64-bit entry"),
    (dict(loadflags=0), "LOADED_HIGH"),
    (dict(setup_sects=40, payload=b""), "truncated or corrupt"),
    (dict(init_size=16), "init_size"),
])
def test_bad_kernels_are_refused_before_ram_is_touched(memory, kwargs, message):
    with pytest.raises(BadImageError, match=message):
        B.load_linux(make_bzimage(**kwargs), b"x", memory, "")
    assert memory.read(0, 2 * MiB) == bytes(2 * MiB)


def test_short_or_random_file_is_refused(memory):
    with pytest.raises(BadImageError, match="not a Linux bzImage"):
        B.load_linux(b"\x7fELF" + bytes(100), None, memory)
    with pytest.raises(BadImageError, match="not a Linux bzImage"):
        B.load_linux(bytes(range(256)) * 64, None, memory)


def test_initrd_that_does_not_fit_is_refused(memory):
    with pytest.raises(BootConfigError, match="initrd .* does not fit"):
        B.load_linux(make_bzimage(), b"x" * (60 * MiB), memory, "")
    with pytest.raises(BootConfigError, match="initrd .* does not fit"):     # limit below RAM end
        B.load_linux(make_bzimage(initrd_addr_max=0x17FFFFF), b"x" * 5 * MiB, memory, "")
    assert memory.read(B.KERNEL_GPA, 4096) == bytes(4096)


def test_initrd_respects_initrd_addr_max(memory):
    plan = B.load_linux(make_bzimage(initrd_addr_max=0x1FFFFFF), b"x" * 5000, memory, "")
    gpa, size = plan.initrd
    assert gpa + size <= 0x2000000 and gpa % 4096 == 0


def test_command_line_limit_is_the_kernels(memory):
    B.load_linux(make_bzimage(cmdline_size=100), None, memory, "a" * 100)
    with pytest.raises(CmdlineError, match="at most 100 bytes"):
        B.load_linux(make_bzimage(cmdline_size=100), None, memory, "a" * 101)
    with pytest.raises(CmdlineError, match="NUL"):
        B.load_linux(make_bzimage(), None, memory, "a\0b")


def test_kernel_needing_more_ram_than_there_is(memory):
    with pytest.raises(BootConfigError, match="more memory"):
        B.load_linux(make_bzimage(init_size=60 * MiB), None, memory, "")


def _tables(memory):
    rsdp = memory.read(acpi.RSDP_GPA, 36)
    assert rsdp[:8] == b"RSD PTR " and sum(rsdp[:20]) % 256 == 0 and sum(rsdp) % 256 == 0
    xsdt_gpa = struct.unpack_from("<Q", rsdp, 24)[0]
    tables = {}
    for gpa in [xsdt_gpa] + list(struct.unpack_from("<2Q", memory.read(xsdt_gpa, 52), 36)):
        length = struct.unpack("<I", memory.read(gpa + 4, 4))[0]
        raw = memory.read(gpa, length)
        assert sum(raw) % 256 == 0, raw[:4]
        tables[raw[:4]] = raw
    dsdt_gpa = struct.unpack_from("<Q", tables[b"FACP"], 140)[0]
    length = struct.unpack("<I", memory.read(dsdt_gpa + 4, 4))[0]
    tables[b"DSDT"] = memory.read(dsdt_gpa, length)
    assert sum(tables[b"DSDT"]) % 256 == 0
    return tables


@pytest.mark.parametrize("vcpus", [1, 3])
def test_acpi_tables_describe_vcpus_power_and_virtio(memory, vcpus):
    virtio = [(0xD0000000, 0x1000, 5), (0xD0001000, 0x1000, 6)]
    B.load_linux(make_bzimage(), None, memory, "", vcpus=vcpus, virtio=virtio)
    t = _tables(memory)
    madt = t[b"APIC"]
    entries, i = [], 44
    while i < len(madt):
        entries.append(madt[i:i + madt[i + 1]])
        i += madt[i + 1]
    assert i == len(madt)
    lapics = [e for e in entries if e[0] == 0]
    assert [e[0] for e in entries if e[0] != 0] == [1, 2]          # the IOAPIC, SCI override
    assert [l[3] for l in lapics] == list(range(vcpus))
    fadt = t[b"FACP"]
    assert struct.unpack_from("<I", fadt, 64)[0] == acpi.POWER_PORT + 4     # PM1a_CNT
    assert not struct.unpack_from("<I", fadt, 112)[0] & (1 << 20)          # not HW-reduced
    dsdt = t[b"DSDT"]
    assert b"_S5_" in dsdt and dsdt.count(b"LNRO0005") == 2
    assert struct.pack("<I", 0xD0001000) in dsdt


def test_acpi_power_device():
    from sealvm.core.devices.actions import GuestExit, GuestReset
    from sealvm.core.devices.simple import AcpiPower
    pm = AcpiPower()
    assert pm.write(4, 5 << 10, 2) is None                     # SLP_TYP alone: not yet
    assert pm.write(4, 5 << 10 | acpi.SLP_EN, 2) == GuestExit(0)
    assert isinstance(pm.write(6, acpi.RESET_VALUE, 1), GuestReset)
    pm.write(2, 0x20, 2)
    assert pm.read(2, 2) == 0x20 and pm.read(4, 2) & acpi.SCI_EN


def test_serial_raises_irq4_for_transmit_and_receive():
    from sealvm.core.devices.serial import IER, IIR_FCR, THR_RBR, Serial16550
    levels = []
    s = Serial16550(irq=levels.append)
    s.write(IER, 0x02)                                         # THRI on: transmitter is empty
    assert levels == [1] and s.read(IIR_FCR) & 0x0F == 0x02 and levels == [1, 0]
    s.write(THR_RBR, ord("x"))
    assert levels == [1, 0, 1]
    s.write(IER, 0x01)                                         # receive only
    assert levels[-1] == 0
    s.feed(b"ab")
    assert levels[-1] == 1 and s.read(IIR_FCR) & 0x0F == 0x04
    assert s.read(THR_RBR) == ord("a") and levels[-1] == 1
    assert s.read(THR_RBR) == ord("b") and levels[-1] == 0


def test_real_debian_cloud_kernel_loads(memory):
    kernel = nested.debian_kernel().read_bytes()
    image = B.parse_bzimage(kernel)
    assert image.version >= 0x020F and image.cmdline_size == 2047
    big = GuestMemory.anonymous(256 * MiB)
    try:
        plan = B.load_linux(kernel, b"initrd" * 1000, big, "console=ttyS0", vcpus=2)
        assert big.read(B.KERNEL_GPA, 64) == bytes(image.kernel[:64])
        assert plan.initrd[0] >= image.pref_address + image.init_size
        with pytest.raises(BootConfigError, match="more memory"):
            B.load_linux(kernel, None, memory, "")               # 64 MiB: too small for it
        corrupt = bytearray(kernel)
        corrupt[B.OFF_HEADER:B.OFF_HEADER + 4] = b"\0\0\0\0"
        with pytest.raises(BadImageError):
            B.parse_bzimage(bytes(corrupt))
        with pytest.raises(BadImageError, match="truncated or corrupt"):
            B.parse_bzimage(kernel[:(kernel[B.OFF_SETUP_SECTS] + 1) * 512])
    finally:
        big.close()

"""The ACPI tables a Linux guest needs: its vCPUs, the IOAPIC, power-off and reset.

A minimal fixed-hardware ACPI platform (FADT revision 6): the PM1a event and
control blocks and nothing else (no PM timer, no GPEs, no fixed buttons, no
i8042, VGA or CMOS RTC; SMI_CMD 0, so the platform is always in ACPI mode).
Not hardware-reduced, because Linux then drops the legacy PIC and with it the
ISA interrupts the serial port uses.  Power-off: the kernel writes
SLP_TYP << 10 | SLP_EN to PM1a_CNT (POWER_PORT + 4) for the S5 state named by
the DSDT's `Name(_S5_, Package(){5, 0})`.  Reset writes RESET_VALUE to the
FADT's reset register (POWER_PORT + 6).

virtio-mmio devices are DSDT devices under \_SB with the _HID "LNRO0005" that
Linux's virtio_mmio driver matches, each with a _CRS of its 4 KiB window and its
interrupt (edge, active high: irqfd pulses the line).  Distribution kernels
are built without virtio_mmio's command-line devices, so ACPI is how they
find them.

    RSDP (0xe0000) -> XSDT -> FADT -> DSDT
                           -> MADT: one local APIC per vCPU, the IOAPIC at
                              0xfec00000 (GSI 0-23, ISA IRQs identity-mapped)
"""
from __future__ import annotations

import struct

from ..addr import GPA
from ..memory import GuestMemory

ACPI_AREA_START, ACPI_AREA_END = 0xE0000, 0x100000
RSDP_GPA, XSDT_GPA, FADT_GPA, FACS_GPA = 0xE0000, 0xE0040, 0xE0080, 0xE01C0
MADT_GPA, DSDT_GPA = 0xE0200, 0xE1000
POWER_PORT = 0x600          # +0 PM1a_EVT (4 bytes), +4 PM1a_CNT (2 bytes), +6 reset register
PM1_EVT_LEN, PM1_CNT_LEN = 4, 2
RESET_VALUE = 1
SLP_EN = 1 << 13
SCI_EN = 1 << 0
LAPIC_BASE, IOAPIC_BASE = 0xFEE0_0000, 0xFEC0_0000
SCI_IRQ = 9
OEM = b"SEALVM"
FADT_RESET_REG_SUP, FADT_PWR_BUTTON, FADT_SLP_BUTTON = 1 << 10, 1 << 4, 1 << 5
BOOT_ARCH_NO_VGA, BOOT_ARCH_NO_CMOS_RTC = 1 << 2, 1 << 5
S5_AML = bytes.fromhex("085f53355f1206020a050a00")        # Name(_S5_, Package(){5, 0})
VIRTIO_MMIO_HID = b"LNRO0005"


def _pkg(body: bytes) -> bytes:
    """AML PkgLength (counting its own bytes) followed by `body`."""
    n = len(body) + 1
    if n < 0x40:
        return bytes((n,)) + body
    n += 1
    if n >= 1 << 12:
        raise ValueError("AML package too long")
    return bytes((0x40 | (n & 0xF), n >> 4)) + body


def virtio_device_aml(index: int, gpa: int, size: int, irq: int) -> bytes:
    """Device(VRnn) { _HID "LNRO0005", _UID n, _CRS { Memory32Fixed, Interrupt } }."""
    crs = (struct.pack("<BHBII", 0x86, 9, 1, gpa, size)               # Memory32Fixed, read/write
           + struct.pack("<BHBBI", 0x89, 6, 0x03, 1, irq)             # Interrupt: consumer, edge
           + b"\x79\x00")                                           # end tag
    body = (b"VR%02X" % index
            + b"\x08_HID\x0d" + VIRTIO_MMIO_HID + b"\x00"
            + b"\x08_UID\x0a" + bytes((index,))
            + b"\x08_CRS\x11" + _pkg(b"\x0a" + bytes((len(crs),)) + crs))
    return b"\x5b\x82" + _pkg(body)


def dsdt(virtio: list[tuple[int, int, int]]) -> bytes:
    devices = b"".join(virtio_device_aml(i, *v) for i, v in enumerate(virtio))
    scope = b"\x10" + _pkg(b"_SB_" + devices) if devices else b""
    return _table(b"DSDT", 2, S5_AML + scope)


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    length = 36 + len(body)
    head = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM, OEM + b"VM",
                       1, OEM[:4], 1)
    raw = head + body
    return raw[:9] + bytes((_checksum(raw),)) + raw[10:]


def _gas(port: int, width: int = 8) -> bytes:
    """Generic address structure: a byte-wide register in system I/O space."""
    return struct.pack("<BBBBQ", 1, width, 0, {8: 1, 16: 2, 32: 3}[width], port)


def fadt() -> bytes:
    body = bytearray(276 - 36)
    struct.pack_into("<II", body, 36 - 36, FACS_GPA, DSDT_GPA)
    struct.pack_into("<H", body, 46 - 36, SCI_IRQ)
    struct.pack_into("<I", body, 56 - 36, POWER_PORT)                  # PM1a_EVT_BLK
    struct.pack_into("<I", body, 64 - 36, POWER_PORT + PM1_EVT_LEN)    # PM1a_CNT_BLK
    body[88 - 36], body[89 - 36] = PM1_EVT_LEN, PM1_CNT_LEN
    struct.pack_into("<H", body, 109 - 36, BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_CMOS_RTC)
    struct.pack_into("<I", body, 112 - 36, FADT_RESET_REG_SUP | FADT_PWR_BUTTON | FADT_SLP_BUTTON)
    body[116 - 36:128 - 36] = _gas(POWER_PORT + 6)
    body[128 - 36] = RESET_VALUE
    struct.pack_into("<QQ", body, 132 - 36, FACS_GPA, DSDT_GPA)
    body[148 - 36:160 - 36] = _gas(POWER_PORT, 8 * PM1_EVT_LEN)
    body[172 - 36:184 - 36] = _gas(POWER_PORT + PM1_EVT_LEN, 8 * PM1_CNT_LEN)
    body[268 - 36:276 - 36] = b"SEALVM\0\0"
    return _table(b"FACP", 6, bytes(body))


def madt(vcpus: int) -> bytes:
    body = struct.pack("<II", LAPIC_BASE, 1)                 # PCAT_COMPAT: there are 8259s
    for i in range(vcpus):
        body += struct.pack("<BBBBI", 0, 8, i, i, 1)         # processor local APIC, enabled
    body += struct.pack("<BBBBII", 1, 12, vcpus, 0, IOAPIC_BASE, 0)
    body += struct.pack("<BBBBIH", 2, 10, 0, SCI_IRQ, SCI_IRQ, 0xD)   # SCI: level, active high
    return _table(b"APIC", 5, body)


def write_acpi(memory: GuestMemory, vcpus: int,
               virtio: list[tuple[int, int, int]] = ()) -> None:
    """Write the tables; `virtio` lists (gpa, size, irq) of each virtio-mmio device."""
    if not 1 <= vcpus <= 254:
        raise ValueError(f"ACPI tables describe 1..254 vCPUs, not {vcpus}")
    if len(virtio) > 32:
        raise ValueError("at most 32 virtio-mmio devices are described")
    facs = struct.pack("<4sIIIII", b"FACS", 64, 0, 0, 0, 0).ljust(32, b"\0") + bytes((2,))
    tables = {FACS_GPA: facs.ljust(64, b"\0"), FADT_GPA: fadt(), DSDT_GPA: dsdt(list(virtio)), MADT_GPA: madt(vcpus)}
    tables[XSDT_GPA] = _table(b"XSDT", 1, struct.pack("<2Q", FADT_GPA, MADT_GPA))
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM, 2, 0, 36, XSDT_GPA, 0))
    rsdp[8] = _checksum(rsdp[:20])
    rsdp[32] = _checksum(rsdp)
    tables[RSDP_GPA] = bytes(rsdp)
    memory.fill(GPA(ACPI_AREA_START), ACPI_AREA_END - ACPI_AREA_START, 0)
    for gpa, blob in tables.items():
        memory.write(GPA(gpa), blob)

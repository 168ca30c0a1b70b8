"""The two one-register devices of the guest ABI: the exit port and the idle doorbell.

Exit port (0xf4): a write of STATUS ends the VM with STATUS, the way QEMU's
`isa-debug-exit` device ends it with (STATUS << 1) | 1.

Idle doorbell (MMIO): a 32-bit write of USECS parks the vCPU until a device
event or USECS microseconds pass, so an idle guest costs no host CPU (HLT is
not available to guests on every KVM this runs on).
"""
from __future__ import annotations

from .actions import GuestExit, GuestReset, Park

MAX_PARK_USECS = 10_000_000


class ExitPort:
    PORTS = 4

    def write(self, offset: int, value: int, size: int) -> GuestExit:
        return GuestExit(value & ((1 << (8 * size)) - 1))

    def read(self, offset: int) -> int:
        return 0xFF


class IdleDoorbell:
    SIZE = 0x1000

    def write(self, offset: int, value: int, size: int) -> Park | None:
        if offset != 0 or size != 4:
            return None
        return Park(min(value, MAX_PARK_USECS))

    def read(self, offset: int, size: int) -> int:
        return 0


class AcpiPower:
    """The ACPI PM1a event/control blocks and reset register (boot/acpi.py announces them).

    +0..3 PM1a_EVT: no status bits, ever; the enable half keeps what the guest
    writes (ACPI checks its global-lock enable bit).  +4..5 PM1a_CNT: reads SCI_EN (the
    platform is in ACPI mode); a write with SLP_EN is the guest powering off
    (status 0).  +6 reset register: RESET_VALUE resets, which sealvm treats as
    the end of the VM: a reboot, or a kernel panic with panic=-1.
    """

    PORTS = 8

    def __init__(self) -> None:
        self.enable = bytearray(2)

    def write(self, offset: int, value: int, size: int) -> GuestExit | GuestReset | None:
        from ..boot.acpi import RESET_VALUE, SLP_EN
        for i in range(size):
            if offset + i in (2, 3):
                self.enable[offset + i - 2] = (value >> 8 * i) & 0xFF
        value <<= 8 * (offset & 1)                       # a byte write to PM1a_CNT's high half
        if offset in (4, 5) and value & SLP_EN:
            return GuestExit(0)
        if offset == 6 and value & 0xFF == RESET_VALUE:
            return GuestReset("the guest reset the machine (a reboot, or a kernel panic)")
        return None

    def read(self, offset: int, size: int = 1) -> int:
        from ..boot.acpi import SCI_EN
        regs = bytes(2) + bytes(self.enable) + bytes((SCI_EN, 0, 0, 0))
        return int.from_bytes(regs[offset:offset + size], "little")

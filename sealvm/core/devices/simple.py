"""The two one-register devices of the guest ABI: the exit port and the idle doorbell.

Exit port (0xf4): a write of STATUS ends the VM with STATUS, the way QEMU's
`isa-debug-exit` device ends it with (STATUS << 1) | 1.

Idle doorbell (MMIO): a 32-bit write of USECS parks the vCPU until a device
event or USECS microseconds pass, so an idle guest costs no host CPU (HLT is
not available to guests on every KVM this runs on).
"""
from __future__ import annotations

from .actions import GuestExit, Park

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

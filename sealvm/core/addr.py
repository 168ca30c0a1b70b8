"""Address types and the guest physical memory map.

Guest physical addresses (GPA) and offsets into the host's RAM file (HostOffset)
are distinct types so one can never be passed where the other is meant: mixing
them raises TypeError instead of silently addressing the wrong byte.
"""
from __future__ import annotations


class GPA(int):
    """A guest physical address."""

    __slots__ = ()

    def __add__(self, other: int) -> "GPA":
        if isinstance(other, HostOffset):
            raise TypeError("cannot add a HostOffset to a GPA")
        return GPA(int(self) + int(other))

    __radd__ = __add__

    def __sub__(self, other: int) -> int | "GPA":
        if isinstance(other, HostOffset):
            raise TypeError("cannot subtract a HostOffset from a GPA")
        if isinstance(other, GPA):
            return int(self) - int(other)
        return GPA(int(self) - int(other))

    def __repr__(self) -> str:
        return f"GPA({int(self):#x})"


class HostOffset(int):
    """An offset into the memfd that backs guest RAM (never a guest address)."""

    __slots__ = ()

    def __add__(self, other: int) -> "HostOffset":
        if isinstance(other, GPA):
            raise TypeError("cannot add a GPA to a HostOffset")
        return HostOffset(int(self) + int(other))

    __radd__ = __add__

    def __repr__(self) -> str:
        return f"HostOffset({int(self):#x})"


KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
PAGE_SIZE = 4096

# The memory map.  RAM starts at 0 and runs up to the MMIO hole; RAM beyond
# the hole's start continues at 4 GiB.  Everything in the hole is device space.
MMIO_HOLE_START = GPA(0xC000_0000)
MMIO_HOLE_END = GPA(0x1_0000_0000)

# Fixed guest-physical places the loader uses below the image (1 MiB).
START_INFO_GPA = GPA(0x6000)      # hvm_start_info
MEMMAP_GPA = GPA(0x6100)          # hvm_memmap_table_entry[]
CMDLINE_GPA = GPA(0x7000)         # NUL-terminated command line
CMDLINE_MAX = 0x1000 - 1
BOOT_PAGETABLE_GPA = GPA(0x9000)  # identity tables for the direct long-mode entry
BOOT_PAGETABLE_END = GPA(0x10000)
BOOT_GDT_GPA = GPA(0x8000)

# Device space inside the hole.
VIRTIO_MMIO_BASE = GPA(0xD000_0000)
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_SIZE = 0x1000
VIRTIO_MMIO_FIRST_IRQ = 5
IDLE_DOORBELL_GPA = GPA(0xD010_0000)

# Legacy ports.
SERIAL_PORT = 0x3F8
EXIT_PORT = 0xF4

DEFAULT_MEMORY = 256 * MiB
MIN_MEMORY = 2 * MiB

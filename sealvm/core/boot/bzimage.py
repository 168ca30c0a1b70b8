"""Boot an unmodified Linux bzImage with the x86 64-bit boot protocol.

    plan = load_linux(kernel, initrd, memory, cmdline, vcpus=2)

What the kernel gets (Documentation/arch/x86/boot.rst, "64-bit boot protocol"):

* the protected-mode part of the bzImage (everything after the setup sectors)
  at 1 MiB (`code32_start`); the kernel relocates and decompresses itself;
* the zero page (`struct boot_params`) at ZERO_PAGE_GPA: the image's own setup
  header copied in, then type_of_loader, heap_end_ptr, cmd_line_ptr and the
  initrd fields filled, and an e820 map of guest RAM;
* the command line at CMDLINE_GPA, at most the header's `cmdline_size` bytes;
* the initrd page-aligned as high as allowed: below `initrd_addr_max`, the end
  of RAM under the MMIO hole, and above the kernel's decompression area;
* ACPI tables (acpi.py) that describe the vCPUs, the IOAPIC, power-off and the
  virtio-mmio devices;
* the BSP in 64-bit mode on the loader's identity map of 4 GiB, with a GDT whose
  __BOOT_CS (0x10) and __BOOT_DS (0x18) are flat, RIP = load address + 0x200,
  RSI = zero page.  Secondary vCPUs are not set up: the in-kernel LAPIC holds
  them until the kernel sends INIT/SIPI.

Refusals (all `BootError`s, checked before guest RAM is written): not a bzImage,
a boot protocol older than 2.12, a kernel without the 64-bit entry, a kernel or
initrd that does not fit RAM, a command line longer than the kernel accepts.
"""
from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

from ..addr import (BOOT_GDT_GPA, CMDLINE_GPA, CMDLINE_MAX, GPA, MMIO_HOLE_START, PAGE_SIZE,
                    START_INFO_GPA, MiB)
from ..memory import GuestMemory
from .acpi import ACPI_AREA_END, ACPI_AREA_START, write_acpi
from .cpu_state import CODE64, DATA, CpuState, Dtable, descriptor, long_mode_state, \
    write_long_mode_tables
from .errors import BadImageError, BootConfigError, CmdlineError

ZERO_PAGE_GPA = START_INFO_GPA     # the PVH start_info's place; a Linux guest has none
KERNEL_GPA = GPA(1 * MiB)
LINUX_GDT_GPA = GPA(int(BOOT_GDT_GPA) + 0x200)
BOOT_CS, BOOT_DS = 0x10, 0x18
MIN_PROTOCOL = 0x020C              # 2.12: xloadflags, the 64-bit entry is announced
MAX_KERNEL = 256 * MiB
EBDA_START = 0x9FC00
HDR_MAGIC = b"HdrS"
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH, CAN_USE_HEAP = 0x01, 0x80
E820_RAM, E820_RESERVED = 1, 2
E820_MAX = 128

# Offsets in the bzImage / boot_params (same numbering: the setup header starts at 0x1f1).
OFF_SETUP_SECTS, OFF_BOOT_FLAG, OFF_JUMP, OFF_HEADER, OFF_VERSION = 0x1F1, 0x1FE, 0x200, 0x202, 0x206
OFF_TYPE_OF_LOADER, OFF_LOADFLAGS, OFF_RAMDISK_IMAGE, OFF_RAMDISK_SIZE = 0x210, 0x211, 0x218, 0x21C
OFF_HEAP_END, OFF_CMD_LINE_PTR, OFF_INITRD_ADDR_MAX = 0x224, 0x228, 0x22C
OFF_XLOADFLAGS, OFF_CMDLINE_SIZE, OFF_PREF_ADDRESS, OFF_INIT_SIZE = 0x236, 0x238, 0x258, 0x260
OFF_E820_ENTRIES, OFF_E820_TABLE = 0x1E8, 0x2D0


@dataclass(frozen=True)
class LinuxImage:
    """The fields of a bzImage's setup header the loader acts on."""

    setup: bytes              # boot sector + setup sectors (the header lives here)
    kernel: memoryview        # the protected-mode part, loaded at KERNEL_GPA
    version: int
    cmdline_size: int
    initrd_addr_max: int
    pref_address: int
    init_size: int


@dataclass
class LinuxPlan:
    image: LinuxImage
    zero_page: GPA
    initrd: tuple[GPA, int] | None
    cpus: list[CpuState]        # the BSP only; the kernel starts the others


def _u(fmt: str, data, off: int) -> int:
    return struct.unpack_from(fmt, data, off)[0]


def parse_bzimage(data) -> LinuxImage:
    """Check a bzImage's setup header; raise BadImageError naming what is wrong."""
    data = memoryview(data)
    if len(data) < 0x1000 or len(data) > MAX_KERNEL:
        raise BadImageError(f"a {len(data)}-byte file is not a Linux bzImage (expected 4 KiB .. "
                            f"{MAX_KERNEL >> 20} MiB)")
    if bytes(data[OFF_HEADER:OFF_HEADER + 4]) != HDR_MAGIC or _u("<H", data, OFF_BOOT_FLAG) != 0xAA55:
        raise BadImageError("not a Linux bzImage: no 'HdrS' setup header with boot flag 0xAA55 "
                            "(pass a bzImage such as /boot/vmlinuz-*, not a vmlinux ELF or "
                            "a compressed file)")
    version = _u("<H", data, OFF_VERSION)
    if version < MIN_PROTOCOL:
        raise BadImageError(f"kernel boot protocol {version >> 8}.{version & 0xFF} is too old: "
                            "need 2.12 or newer (Linux 3.8+)")
    if not _u("<H", data, OFF_XLOADFLAGS) & XLF_KERNEL_64:
        raise BadImageError("this kernel has no 64-bit entry point (XLF_KERNEL_64 is not set); "
                            "a 64-bit x86 kernel is needed")
    if not data[OFF_LOADFLAGS] & LOADED_HIGH:
        raise BadImageError("this kernel does not load at 1 MiB (LOADED_HIGH is not set)")
    setup_sects = data[OFF_SETUP_SECTS] or 4
    setup_end = (setup_sects + 1) * 512
    if setup_end >= len(data):
        raise BadImageError(f"setup_sects {setup_sects} runs past the end of the image "
                            f"({len(data)} bytes): the file is truncated or corrupt")
    init_size = _u("<I", data, OFF_INIT_SIZE)
    if init_size < len(data) - setup_end:
        raise BadImageError(f"init_size {init_size:#x} is smaller than the kernel itself: "
                            "the setup header is corrupt")
    return LinuxImage(setup=bytes(data[:setup_end]), kernel=data[setup_end:], version=version,
                      cmdline_size=_u("<I", data, OFF_CMDLINE_SIZE),
                      initrd_addr_max=_u("<I", data, OFF_INITRD_ADDR_MAX),
                      pref_address=_u("<Q", data, OFF_PREF_ADDRESS), init_size=init_size)


def e820_map(memory: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type): RAM below the EBDA, the BIOS area reserved, RAM from 1 MiB."""
    entries = [(0, EBDA_START, E820_RAM), (EBDA_START, 0xA0000 - EBDA_START, E820_RESERVED),
               (ACPI_AREA_START, ACPI_AREA_END - ACPI_AREA_START, E820_RESERVED)]
    for region in memory.regions:
        start, end = max(int(region.gpa), int(KERNEL_GPA)), int(region.end)
        if start < end:
            entries.append((start, end - start, E820_RAM))
    return entries


def _low_ram_end(memory: GuestMemory) -> int:
    return min(int(r.end) for r in memory.regions if int(r.gpa) == 0)


def place_initrd(image: LinuxImage, memory: GuestMemory, size: int) -> int:
    """Where the initrd goes: page-aligned, as high as the kernel and RAM allow."""
    kernel_end = max(int(KERNEL_GPA), image.pref_address) + image.init_size
    top = min(image.initrd_addr_max + 1, _low_ram_end(memory), int(MMIO_HOLE_START))
    gpa = (top - size) & ~(PAGE_SIZE - 1)
    if gpa < kernel_end:
        room = max(top - kernel_end, 0)
        raise BootConfigError(f"the initrd ({size} bytes) does not fit: {room} bytes are free "
                              f"between the kernel's end ({kernel_end:#x}) and the initrd limit "
                              f"({top:#x}); give the VM more memory or use a smaller initrd")
    return gpa


def _linux_gdt(memory: GuestMemory) -> Dtable:
    memory.write(LINUX_GDT_GPA, struct.pack("<4Q", 0, 0, descriptor(CODE64), descriptor(DATA)))
    return Dtable(int(LINUX_GDT_GPA), 4 * 8 - 1)


def load_linux(kernel, initrd: bytes | None, memory: GuestMemory, cmdline: str = "",
               vcpus: int = 1, virtio: list[tuple[int, int, int]] = ()) -> LinuxPlan:
    """Validate, then load kernel, initrd, zero page, ACPI and boot tables; return the plan.

    `virtio` lists the (gpa, size, irq) of each virtio-mmio device for the ACPI tables."""
    image = parse_bzimage(kernel)
    if "\0" in cmdline:
        raise CmdlineError("the guest command line contains a NUL character")
    raw = cmdline.encode()
    limit = min(image.cmdline_size, CMDLINE_MAX)
    if len(raw) > limit:
        raise CmdlineError(f"the kernel command line is {len(raw)} bytes; this kernel accepts at "
                           f"most {limit} bytes")
    need = max(int(KERNEL_GPA), image.pref_address) + image.init_size
    if need > _low_ram_end(memory):
        raise BootConfigError(f"the kernel needs RAM up to {need:#x} to decompress "
                              f"({need >> 20} MiB); give the VM more memory")
    initrd_gpa = place_initrd(image, memory, len(initrd)) if initrd else None
    entries = e820_map(memory)
    if len(entries) > E820_MAX:
        raise BootConfigError(f"memory map has {len(entries)} entries; at most {E820_MAX} fit")

    memory.write(KERNEL_GPA, image.kernel)
    if initrd_gpa is not None:
        memory.write(initrd_gpa, initrd)
    zp = bytearray(PAGE_SIZE)
    hdr_end = OFF_JUMP + 2 + image.setup[OFF_JUMP + 1]      # the header's own length (jump target)
    zp[OFF_SETUP_SECTS:hdr_end] = image.setup[OFF_SETUP_SECTS:hdr_end]
    zp[OFF_TYPE_OF_LOADER] = 0xFF                          # an undefined boot loader
    zp[OFF_LOADFLAGS] |= CAN_USE_HEAP
    struct.pack_into("<H", zp, OFF_HEAP_END, 0xFE00)
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, int(CMDLINE_GPA))
    if initrd_gpa is not None:
        struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, initrd_gpa, len(initrd))
    zp[OFF_E820_ENTRIES] = len(entries)
    for i, (addr, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", zp, OFF_E820_TABLE + 20 * i, addr, size, kind)
    memory.write(ZERO_PAGE_GPA, bytes(zp))
    memory.fill(CMDLINE_GPA, CMDLINE_MAX + 1, 0)
    memory.write(CMDLINE_GPA, raw + b"\0")
    write_acpi(memory, vcpus, virtio)
    cr3, _ = write_long_mode_tables(memory)
    bsp = long_mode_state(int(KERNEL_GPA) + 0x200, 0, cr3=cr3, gdt=_linux_gdt(memory))
    bsp.regs["rbx"], bsp.regs["rsi"] = 0, int(ZERO_PAGE_GPA)
    bsp.segments = {k: dataclasses.replace(v, selector=BOOT_CS if k == "cs" else BOOT_DS)
                    if k not in ("tr", "ldt") else v for k, v in bsp.segments.items()}
    return LinuxPlan(image=image, zero_page=ZERO_PAGE_GPA,
                     initrd=(GPA(initrd_gpa), len(initrd)) if initrd_gpa is not None else None,
                     cpus=[bsp])

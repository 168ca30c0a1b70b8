"""Boot an uncompressed Linux `vmlinux` (ELF) through its PVH entry.

    plan = load_kernel(kernel, initrd, memory, cmdline, vcpus=2, virtio=devices)

`load_kernel` takes either kind of Linux kernel: a bzImage goes to bzimage.py,
an ELF file (`\\x7fELF`) is booted here with the PVH boot ABI, as a kernel built
with CONFIG_PVH=y announces it in its `Xen` note of type 18
(XEN_ELFNOTE_PHYS32_ENTRY):

* the PT_LOAD segments at their p_paddr (elf.py; 16 MiB up for a distribution
  kernel), the initrd page-aligned at the top of low RAM, above the kernel's
  last segment and below 4 GiB (`ramdisk_image` is 32 bits);
* `hvm_start_info` (pvh.py) with the command line, the initrd as module 0, the
  same e820 map and ACPI tables as a bzImage gets, and `rsdp_paddr` = the RSDP;
* the BSP in 32-bit protected mode, paging off, at the note's entry with
  EBX = start_info; the other vCPUs wait in the in-kernel LAPIC for INIT/SIPI.

Refused before guest RAM is written: an ELF the loader cannot parse, one
without the PVH note, a kernel that does not fit RAM or overlaps the ACPI
tables (0xe0000-0x100000), an initrd that does not fit between the kernel and
the initrd limit, a command line longer than x86 Linux's 2047 bytes or
containing NUL.
"""
from __future__ import annotations

from ..addr import GPA, GiB
from ..memory import GuestMemory
from .acpi import ACPI_AREA_END, ACPI_AREA_START, RSDP_GPA, write_acpi
from .bzimage import LinuxPlan, e820_map, load_linux, parse_bzimage, place_initrd
from .cpu_state import pvh_entry_state, write_pvh_gdt
from .elf import ElfImage, check_placement, load_elf, parse_elf
from .errors import BadImageError, BootConfigError, CmdlineError
from .pvh import write_start_info

LINUX_CMDLINE_MAX = 2047        # x86 COMMAND_LINE_SIZE - 1; the kernel truncates beyond it


def is_elf(data) -> bool:
    return bytes(data[:4]) == b"\x7fELF"


def parse_vmlinux(data) -> ElfImage:
    """Parse a vmlinux and check it has the PVH entry; raise BadImageError."""
    try:
        image = parse_elf(data, need_entry=False)
    except BadImageError as e:
        raise BadImageError(f"not a bootable vmlinux: {e}") from None
    if image.pvh_entry is None:
        raise BadImageError("this ELF kernel has no PVH entry note (name 'Xen', type 18 "
                            "XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y, or boot "
                            "its bzImage")
    return image


def check_kernel(data) -> None:
    """Refuse a bad Linux kernel (bzImage or vmlinux) before the VM is made."""
    parse_vmlinux(data) if is_elf(data) else parse_bzimage(data)


def load_kernel(kernel, initrd: bytes | None, memory: GuestMemory, cmdline: str = "",
                vcpus: int = 1, virtio: list[tuple[int, int, int]] = ()) -> LinuxPlan:
    """Load a bzImage or a PVH vmlinux with its initrd, ACPI and boot tables; return the plan."""
    if not is_elf(kernel):
        return load_linux(kernel, initrd, memory, cmdline, vcpus, virtio)
    image = parse_vmlinux(kernel)
    if "\0" in cmdline or len(cmdline.encode()) > LINUX_CMDLINE_MAX:
        raise CmdlineError(f"the kernel command line is {len(cmdline.encode())} bytes or contains "
                           f"NUL; Linux accepts at most {LINUX_CMDLINE_MAX} bytes without NUL")
    try:
        check_placement(image, memory)
    except BadImageError as e:
        raise BootConfigError(f"the kernel does not fit this VM: {e}") from None
    if any(s.paddr < ACPI_AREA_END and s.end > ACPI_AREA_START for s in image.segments):
        raise BadImageError(f"the kernel overlaps the ACPI tables' area "
                            f"({ACPI_AREA_START:#x}-{ACPI_AREA_END:#x})")
    kernel_end = max(int(s.end) for s in image.segments)
    initrd_gpa = place_initrd(kernel_end, 4 * GiB - 1, memory, len(initrd)) if initrd else None
    entries = e820_map(memory)          # a few entries; the kernel appends the ISA hole itself

    load_elf(image, memory)
    modules = []
    if initrd_gpa is not None:
        memory.write(initrd_gpa, initrd)
        modules.append((GPA(initrd_gpa), len(initrd)))
    start_info = write_start_info(memory, cmdline, memmap=entries, modules=modules, rsdp=RSDP_GPA)
    write_acpi(memory, vcpus, virtio)
    bsp = pvh_entry_state(image.pvh_entry, start_info, write_pvh_gdt(memory))
    return LinuxPlan(image=image, zero_page=start_info,
                     initrd=modules[0] if modules else None, cpus=[bsp])

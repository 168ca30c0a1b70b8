"""Load a guest image and plan how its vCPUs start: the one call the VMM makes.

    plan = load_guest(image_bytes, memory, cmdline, entry="pvh", vcpus=2)
    for index, state in enumerate(plan.cpus): ...   # map CpuState onto kvm_regs/sregs

`load_guest` parses the image (capped at `max_size`), checks everything it can before touching guest RAM (entry point for the chosen mode,
`ap_entry64` when there are secondary vCPUs, command line length, segment
placement), then copies the segments, writes start_info / memmap / cmdline,
the GDTs and (when any vCPU starts in long mode) the identity page tables, and
returns one `CpuState` per vCPU.  Every refusal is a `BootError` subclass with
a message for the user.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..addr import GPA
from ..memory import GuestMemory
from .cpu_state import (CpuState, ap_state, long_mode_state, pvh_entry_state, write_long_mode_tables,
                        write_pvh_gdt)
from .elf import MAX_IMAGE_SIZE, ElfImage, check_placement, load_elf, parse_elf
from .errors import BadImageError, BootConfigError
from .pvh import build_memmap, encode_cmdline, write_start_info

ENTRY_MODES = ("pvh", "long")
MAX_VCPUS = 255          # xAPIC IDs; the guest ABI numbers vCPUs 0..N-1
AP_ENTRY_SYMBOL = "ap_entry64"


@dataclass
class BootPlan:
    """What the VMM needs after loading: where things are and how each vCPU starts."""

    image: ElfImage
    entry_mode: str                      # "pvh" or "long"
    entry: GPA                           # BSP's first instruction
    start_info: GPA
    cpus: list[CpuState]                 # index 0 = BSP, then APs 1..N-1
    loaded: list[tuple[GPA, int]]        # (gpa, size) of each segment written


def _check_request(entry: str, vcpus: int) -> None:
    if entry not in ENTRY_MODES:
        raise BootConfigError(f"unknown entry mode {entry!r}; use 'pvh' or 'long'")
    if isinstance(vcpus, bool) or not isinstance(vcpus, int) or not 1 <= vcpus <= MAX_VCPUS:
        raise BootConfigError(f"vCPU count must be between 1 and {MAX_VCPUS}, not {vcpus!r}")


def _bsp_entry(image: ElfImage, entry: str) -> GPA:
    if entry == "pvh":
        if image.pvh_entry is None:
            raise BadImageError("the image has no PVH entry note (name 'Xen', type 18 "
                                "XEN_ELFNOTE_PHYS32_ENTRY); start it with the long-mode entry instead")
        return image.pvh_entry
    if image.long_entry is None:
        raise BadImageError(f"e_entry {image.entry:#x} cannot be used for the direct long-mode entry: it "
                            "must lie in a loadable segment with p_vaddr == p_paddr below 4 GiB; "
                            "start it with the PVH entry instead")
    return image.long_entry


def _ap_entry(image: ElfImage, vcpus: int) -> GPA | None:
    if vcpus == 1:
        return None
    if AP_ENTRY_SYMBOL not in image.symbols:
        raise BadImageError(f"the image has no '{AP_ENTRY_SYMBOL}' symbol in .symtab, so it cannot start "
                            f"{vcpus} vCPUs (is it stripped?); run it with 1 vCPU")
    addr = image.long_mode_address(image.symbols[AP_ENTRY_SYMBOL])
    if addr is None:
        raise BadImageError(f"'{AP_ENTRY_SYMBOL}' at {image.symbols[AP_ENTRY_SYMBOL]:#x} is not inside a "
                            "loadable segment with p_vaddr == p_paddr below 4 GiB")
    return addr


def load_guest(data: bytes | bytearray | memoryview, memory: GuestMemory, cmdline: str = "",
               entry: str = "pvh", vcpus: int = 1, *, max_size: int = MAX_IMAGE_SIZE) -> BootPlan:
    """Parse, validate and load a guest image (its bytes); return the boot plan.

    `entry` is "pvh" (32-bit PVH entry
    from the ELF note) or "long" (64-bit at e_entry).  Secondary vCPUs always
    start in long mode at `ap_entry64`.  Raises a BootError subclass.
    """
    _check_request(entry, vcpus)
    image = parse_elf(data, max_size)
    bsp_entry = _bsp_entry(image, entry)
    ap_entry = _ap_entry(image, vcpus)
    encode_cmdline(cmdline)            # raise before writing anything
    build_memmap(memory)
    check_placement(image, memory)

    loaded = load_elf(image, memory)
    start_info = write_start_info(memory, cmdline)
    if entry == "pvh":
        bsp = pvh_entry_state(bsp_entry, start_info, write_pvh_gdt(memory))
    if entry == "long" or ap_entry is not None:       # APs always start in long mode
        cr3, long_gdt = write_long_mode_tables(memory)
        if entry == "long":
            bsp = long_mode_state(bsp_entry, start_info, cr3=cr3, gdt=long_gdt)
    cpus = [bsp]
    if ap_entry is not None:
        cpus += [ap_state(ap_entry, i, start_info) for i in range(1, vcpus)]
    return BootPlan(image=image, entry_mode=entry, entry=bsp_entry, start_info=start_info,
                    cpus=cpus, loaded=loaded)

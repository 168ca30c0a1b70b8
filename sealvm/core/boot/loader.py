"""Load a guest image and plan how its vCPUs start: the one call the VMM makes.

    plan = load_guest("guest.elf", memory, cmdline, entry="pvh", vcpus=2)
    for index, state in enumerate(plan.cpus): ...   # map CpuState onto kvm_regs/sregs

`load_guest` reads the file (capped at `max_size`), parses it, checks
everything it can before touching guest RAM (entry point for the chosen mode,
`ap_entry64` when there are secondary vCPUs, command line length, segment
placement), then copies the segments, writes start_info / memmap / cmdline,
the GDTs and (when any vCPU starts in long mode) the identity page tables, and
returns one `CpuState` per vCPU.  Every refusal is a `BootError` subclass with
a message for the user.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Iterable, Union

from ..addr import GPA
from ..memory import GuestMemory
from .cpu_state import (CpuState, ap_state, long_mode_state, pvh_entry_state, write_long_mode_tables,
                        write_pvh_gdt)
from .elf import MAX_IMAGE_SIZE, ElfImage, check_placement, load_elf, parse_elf
from .errors import BadImageError, BootConfigError, ImageFileError
from .pvh import MemmapEntry, build_memmap, encode_cmdline, write_start_info

ENTRY_MODES = ("pvh", "long")
MAX_VCPUS = 255          # xAPIC IDs; the guest ABI numbers vCPUs 0..N-1
AP_ENTRY_SYMBOL = "ap_entry64"

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview]


@dataclass
class BootPlan:
    """What the VMM needs after loading: where things are and how each vCPU starts."""

    image: ElfImage
    entry_mode: str                      # "pvh" or "long"
    entry: GPA                           # BSP's first instruction
    start_info: GPA
    cpus: list[CpuState]                 # index 0 = BSP, then APs 1..N-1
    loaded: list[tuple[GPA, int]]        # (gpa, size) of each segment written
    cmdline: str

    @property
    def bsp(self) -> CpuState:
        return self.cpus[0]

    @property
    def symbols(self) -> dict[str, int]:
        return self.image.symbols


def read_image(path: Union[str, os.PathLike], max_size: int = MAX_IMAGE_SIZE) -> bytes:
    """The bytes of the image file at `path`, at most `max_size` of them."""
    name = os.fsdecode(path)
    try:
        # O_NONBLOCK: opening a FIFO must not hang; it is refused by the S_ISREG check below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageFileError(f"guest image {name}: not a regular file")
            if st.st_size > max_size:
                raise BadImageError(
                    f"guest image {name} is {st.st_size} bytes; the limit is {max_size} bytes")
            data = f.read(max_size + 1)
    except FileNotFoundError:
        raise ImageFileError(f"guest image {name}: no such file") from None
    except IsADirectoryError:
        raise ImageFileError(f"guest image {name}: is a directory, not a file") from None
    except PermissionError:
        raise ImageFileError(f"guest image {name}: permission denied") from None
    except OSError as e:
        raise ImageFileError(f"guest image {name}: cannot read it ({e.strerror or e})") from None
    if len(data) > max_size:
        raise BadImageError(f"guest image {name} is larger than the limit of {max_size} bytes")
    return data


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


def load_guest(source: ImageSource, memory: GuestMemory, cmdline: str = "", entry: str = "pvh",
               vcpus: int = 1, *, max_size: int = MAX_IMAGE_SIZE,
               extra_memmap: Iterable[MemmapEntry] = ()) -> BootPlan:
    """Parse, validate and load a guest image; return the boot plan.

    `source` is a path or the image bytes.  `entry` is "pvh" (32-bit PVH entry
    from the ELF note) or "long" (64-bit at e_entry).  Secondary vCPUs always
    start in long mode at `ap_entry64`.  Raises a BootError subclass.
    """
    _check_request(entry, vcpus)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = source
    else:
        data = read_image(source, max_size)
    image = parse_elf(data, max_size)
    bsp_entry = _bsp_entry(image, entry)
    ap_entry = _ap_entry(image, vcpus)
    extra = list(extra_memmap)
    encode_cmdline(cmdline)            # raise before writing anything
    build_memmap(memory, extra)
    check_placement(image, memory)

    loaded = load_elf(image, memory)
    start_info = write_start_info(memory, cmdline, extra)
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
                    cpus=cpus, loaded=loaded, cmdline=cmdline)

"""Guest loader: ELF64 PVH images, hvm_start_info, and initial vCPU state.

The VMM calls `load_guest`; the other modules are its parts (`elf`, `pvh`,
`cpu_state`) and are importable for tests and tools.
"""
from .cpu_state import CpuState, Dtable, Segment
from .elf import MAX_IMAGE_SIZE, ElfImage, ElfSegment, parse_elf
from .errors import BadImageError, BootConfigError, BootError, CmdlineError, ImageFileError
from .loader import BootPlan, load_guest
from .pvh import MemmapEntry

__all__ = [
    "BadImageError", "BootConfigError", "BootError", "BootPlan", "CmdlineError", "CpuState",
    "Dtable", "ElfImage", "ElfSegment", "ImageFileError", "MAX_IMAGE_SIZE", "MemmapEntry",
    "Segment", "load_guest", "parse_elf",
]

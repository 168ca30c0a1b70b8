"""Guest loader: ELF64 PVH images, hvm_start_info, and initial vCPU state.

The VMM calls `loader.load_guest`; the other modules are its parts (`elf`,
`pvh`, `cpu_state`, `errors`).
"""

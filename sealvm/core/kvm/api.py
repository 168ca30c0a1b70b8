"""The KVM API sealvm's monitor uses: one import for the system, VM and vCPU fds.

    kvm = Kvm()                       # /dev/kvm, API version 12 checked
    vm = kvm.create_vm()
    vm.set_user_memory_region(0, 0, gpa, size, host_addr)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    reason = vcpu.run()               # or VcpuInterrupted after a kick
    exit = decode_exit(vcpu.run_struct, vcpu.run_buffer)
"""
from __future__ import annotations

from .exits import (ExceptionExit, FailEntry, InternalError, Io, Mmio, OtherExit, SystemEvent,
                    complete_mmio_read, complete_pio_in, decode_exit, exit_name)
from .raw import KvmError, VcpuInterrupted
from .system import Kvm
from .vcpu import VcpuFd
from .vm import VmFd, dirty_pages

__all__ = [
    "Kvm", "VmFd", "VcpuFd", "KvmError", "VcpuInterrupted", "decode_exit", "exit_name",
    "complete_pio_in", "complete_mmio_read", "dirty_pages", "Io", "Mmio", "SystemEvent",
    "InternalError", "FailEntry", "ExceptionExit", "OtherExit",
]

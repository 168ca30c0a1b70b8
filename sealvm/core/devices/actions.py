"""What a device asks the run loop to do.

Device models never write to the console, sleep or stop the VM themselves:
they return one of these and the vCPU loop carries it out.  That keeps the
models testable without KVM and keeps every side effect in one place.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConsoleOutput:
    data: bytes


@dataclass(frozen=True, slots=True)
class GuestExit:
    status: int


@dataclass(frozen=True, slots=True)
class GuestReset:
    """The guest asked for a reset (reboot, or a panic with panic=-1): the VM stops."""
    reason: str


@dataclass(frozen=True, slots=True)
class Park:
    """Park the calling vCPU until a device event, or `usecs` (0 = no limit)."""
    usecs: int


Action = ConsoleOutput | GuestExit | GuestReset | Park

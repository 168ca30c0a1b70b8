"""Errors the guest loader raises.

Everything here is the user's fault (a bad image, a command line
that does not fit), never the monitor's: each carries a message meant to be
printed as-is, and the CLI turns any `BootError` into that message and a
non-zero exit status instead of a traceback.
"""
from __future__ import annotations


class BootError(ValueError):
    """Base class: the guest cannot be booted as requested."""


class BadImageError(BootError):
    """The guest image is not a loadable ELF64 x86-64 PVH image, or does not fit guest RAM."""


class CmdlineError(BootError):
    """The guest command line cannot be passed (too long, or contains a NUL byte)."""


class BootConfigError(BootError):
    """The boot request itself is invalid (unknown entry mode, bad vCPU count, RAM too small)."""

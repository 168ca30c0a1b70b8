"""The `sealvm` command line.

`sealvm run GUEST` boots one VM and exits with the guest's own exit status.
Exit codes of the monitor itself stay out of the guest's usual range:
125 the VM could not be built or started (the message says why),
126 the VM crashed (triple fault, KVM internal error: the message names the
exit, the vCPU and RIP), 130 stopped with Ctrl-C.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)(i?[bB])?\s*$")
_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB' or a plain number of MiB (as QEMU's -m) -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (try 256M or 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sealvm",
        description="A KVM virtual machine monitor whose guests stay sealed from the host's "
                    "management stack.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    r = sub.add_parser(
        "run", help="boot one VM in the foreground and exit with the guest's status",
        description="Boot GUEST (a PVH ELF kernel) in a new KVM virtual machine, show its serial "
                    "console on stdout (and read stdin when interactive), and exit with the status "
                    "the guest writes to its exit port 0xf4. Ctrl-C stops the VM cleanly. "
                    "Exit codes: the guest's status; 125 the VM could not start; 126 the VM "
                    "crashed; 130 interrupted.")
    r.add_argument("guest", metavar="GUEST", help="PVH ELF image, e.g. guests/build/hello.elf")
    r.add_argument("--memory", "-m", type=parse_size, default=parse_size("256M"),
                   help="guest RAM, e.g. 256M or 1G (default 256M)")
    r.add_argument("--vcpus", type=_positive_int, default=1, help="number of vCPUs (default 1)")
    r.add_argument("--cmdline", default="", help="kernel command line passed to the guest")
    r.add_argument("--entry", choices=("pvh", "long"), default="pvh",
                   help="start at the PVH 32-bit entry (default) or directly in 64-bit long mode")
    r.add_argument("--no-rng", action="store_true", help="do not attach the virtio-rng device")
    r.add_argument("--console-log", metavar="FILE",
                   help="write the guest console to FILE instead of stdout")
    r.add_argument("--bench-sinks", action="store_true", help=argparse.SUPPRESS)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    from .core.runner import run_vm
    return run_vm(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())

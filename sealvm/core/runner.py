"""Run one machine in the foreground: console, Ctrl-C, exit status."""
from __future__ import annotations

import os
import sys
import threading

from .boot.errors import BootError
from .machine import Machine, MachineConfig, MachineError
from .memory import MemoryConfigError

EXIT_CANNOT_START = 125
EXIT_VM_CRASHED = 126
EXIT_INTERRUPTED = 130


def _console_writer(path: str | None):
    fd = 1 if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write(data: bytes) -> None:
        os.write(fd, data)
    return write, fd


def _pump_stdin(machine: Machine) -> None:
    while True:
        try:
            data = os.read(0, 256)
        except OSError:
            return
        if not data:
            return
        machine.serial.feed(data)
        machine._device_event()


def run_vm(args) -> int:
    try:
        write, fd = _console_writer(args.console_log)
    except OSError as e:
        print(f"sealvm: cannot open console log {args.console_log}: {e.strerror}", file=sys.stderr)
        return EXIT_CANNOT_START
    config = MachineConfig(image=args.guest, memory=args.memory, vcpus=args.vcpus,
                           cmdline=args.cmdline, entry=args.entry, rng=not args.no_rng,
                           bench_sinks=args.bench_sinks)
    machine = Machine(config, write)
    try:
        machine.build()
    except (MachineError, BootError, MemoryConfigError) as e:
        print(f"sealvm: {e}", file=sys.stderr)
        machine.close()
        return EXIT_CANNOT_START
    except OSError as e:
        print(f"sealvm: cannot build the VM: {e}", file=sys.stderr)
        machine.close()
        return EXIT_CANNOT_START
    machine.start()
    if sys.stdin.isatty():
        threading.Thread(target=_pump_stdin, args=(machine,), daemon=True).start()
    try:
        while not machine.wait(0.5):
            pass
    except KeyboardInterrupt:
        machine.stop("interrupted")
        machine.close()
        print("\nsealvm: stopped (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    status, reason = machine.exit_status, machine.stop_reason
    machine.close()
    if fd != 1:
        os.close(fd)
    if status is None:
        print(f"sealvm: VM stopped: {reason}", file=sys.stderr)
        return EXIT_VM_CRASHED
    return status & 0xFF

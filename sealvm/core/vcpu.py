"""One vCPU: a thread that enters KVM_RUN and handles every exit.

Exits route to the port or MMIO bus; what devices return (console output, a
guest exit, a park request) goes to the machine.  An exit this monitor does
not expect stops the whole VM with a message naming the exit, the vCPU and
RIP: guessing would risk running a guest in a state nobody checked.

Control (pause, resume, stop) comes from other threads through `VcpuControl`:
they set `immediate_exit` and send the vCPU thread a signal, so a vCPU inside
KVM_RUN comes out at once even if the guest never exits on its own.
"""
from __future__ import annotations

import signal
import struct
import threading
from typing import Callable

from .bus import Bus
from .devices.actions import ConsoleOutput, GuestExit, GuestReset, Park
from .kvm import ioctls as K
from .kvm.api import VcpuFd, VcpuInterrupted, exit_name

KICK_SIGNAL = signal.SIGRTMIN
_INT_FMT = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def install_kick_handler() -> None:
    """A no-op handler so the kick signal interrupts KVM_RUN instead of killing us.

    Must run on the main thread before any vCPU thread starts; from another
    thread it only checks that this was done.
    """
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the vCPU kick signal handler must be installed on the main thread")
    signal.signal(KICK_SIGNAL, lambda *_: None)


class VmStopped(Exception):
    """Raised inside a vCPU loop when the VM must stop (carries the reason)."""


class VcpuControl:
    """Shared run state of all vCPUs of one VM."""

    RUNNING, PAUSED, STOPPING = "running", "paused", "stopping"

    def __init__(self) -> None:
        self.state = self.RUNNING
        self.cond = threading.Condition()
        self.parked = 0  # vCPUs currently waiting in the paused state


class Vcpu:
    def __init__(self, index: int, fd: VcpuFd, control: VcpuControl, pio: Bus, mmio: Bus,
                 on_console: Callable[[bytes], None], on_stop: Callable[[str, int | None], None]):
        self.index = index
        self.fd = fd
        self.control = control
        self.pio = pio
        self.mmio = mmio
        self.on_console = on_console
        self.on_stop = on_stop
        self.wakeup = threading.Event()
        self.thread: threading.Thread | None = None
        self.exits = 0

    # ---- control from other threads ----------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._main, name=f"vcpu{self.index}", daemon=True)
        self.thread.start()

    def kick(self) -> None:
        self.fd.run_struct.immediate_exit = 1
        self.wakeup.set()
        t = self.thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    # ---- the loop -----------------------------------------------------
    def _main(self) -> None:
        try:
            self._loop()
        except VmStopped:
            pass
        except Exception as e:  # our own bug: stop loudly, never run on in an unknown state
            self.on_stop(f"vcpu{self.index}: internal error in the monitor: {e!r}", None)
            raise

    def _wait_runnable(self) -> None:
        c = self.control
        with c.cond:
            if c.state == c.PAUSED:
                c.parked += 1
                c.cond.notify_all()
                while c.state == c.PAUSED:
                    c.cond.wait()
                c.parked -= 1
                c.cond.notify_all()
            if c.state == c.STOPPING:
                raise VmStopped()

    def _loop(self) -> None:
        run = self.fd.run_struct
        control = self.control
        while True:
            if control.state != control.RUNNING:
                self._wait_runnable()
            try:
                reason = self.fd.run()
            except VcpuInterrupted:
                run.immediate_exit = 0
                continue
            self.exits += 1
            if reason == K.KVM_EXIT_IO:
                self._io(run)
            elif reason == K.KVM_EXIT_MMIO:
                self._mmio(run)
            elif reason == K.KVM_EXIT_HLT:
                self._park(0)
            else:
                self._fatal(reason, run)

    def _io(self, run) -> None:
        io = run.io
        size, port, count = io.size, io.port, io.count
        fmt = _INT_FMT.get(size)
        if fmt is None or count == 0:
            return
        buf = self.fd.run_buffer
        off = io.data_offset
        # SAFETY: KVM places count*size bytes at data_offset inside the kvm_run mmap.
        if off + size * count > len(buf):
            self._stop(f"vcpu{self.index}: KVM reported I/O data outside the run area", None)
        if io.direction == K.KVM_EXIT_IO_OUT:
            for i in range(count):
                value = struct.unpack_from(fmt, buf, off + i * size)[0]
                self._act(self.pio.write(port, value, size))
        else:
            for i in range(count):
                struct.pack_into(fmt, buf, off + i * size, self.pio.read(port, size) & ((1 << (8 * size)) - 1))

    def _mmio(self, run) -> None:
        m = run.mmio
        size = m.len
        fmt = _INT_FMT.get(size)
        if fmt is None:
            return
        if m.is_write:
            value = struct.unpack_from(fmt, bytes(m.data), 0)[0]
            self._act(self.mmio.write(m.phys_addr, value, size))
        else:
            value = self.mmio.read(m.phys_addr, size) & ((1 << (8 * size)) - 1)
            data = struct.pack(fmt, value).ljust(8, b"\0")
            for i in range(8):
                m.data[i] = data[i]

    def _act(self, action) -> None:
        if action is None:
            return
        if isinstance(action, ConsoleOutput):
            self.on_console(action.data)
        elif isinstance(action, Park):
            self._park(action.usecs)
        elif isinstance(action, GuestExit):
            self._stop(f"guest exited with status {action.status}", action.status)
        elif isinstance(action, GuestReset):
            self._stop(action.reason, None)

    def _park(self, usecs: int) -> None:
        """Sleep until a device event or the timeout; uses no CPU meanwhile."""
        self.wakeup.wait(usecs / 1e6 if usecs else None)
        self.wakeup.clear()

    def _stop(self, why: str, status: int | None):
        self.on_stop(why, status)
        raise VmStopped(why)

    def _fatal(self, reason: int, run) -> None:
        name = exit_name(reason)
        detail = ""
        if reason == K.KVM_EXIT_INTERNAL_ERROR:
            detail = f" suberror={run.internal.suberror}"
        elif reason == K.KVM_EXIT_FAIL_ENTRY:
            detail = f" hardware_entry_failure_reason={run.fail_entry.hardware_entry_failure_reason:#x}"
        elif reason == K.KVM_EXIT_SYSTEM_EVENT:
            detail = f" type={run.system_event.type}"
        elif reason == K.KVM_EXIT_SHUTDOWN:
            detail = " (triple fault)"
        try:
            rip = f"{self.fd.get_regs().rip:#x}"
        except OSError:
            rip = "unknown"
        self._stop(f"vcpu{self.index}: {name}{detail} at rip={rip}", None)

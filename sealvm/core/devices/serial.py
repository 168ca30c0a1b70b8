"""A 16550 UART subset: enough for a console (transmit, receive, line status).

Transmit is always ready (THRE|TEMT), so a guest that polls LSR never waits.
Received bytes come from `feed()` (the console input thread) and are read by
the guest through RBR with LSR.DR.  Without an `irq` callable nothing is
raised and guests poll; with one (a Linux guest's IRQ 4), the line follows the
enabled conditions: received data (IER bit 0) and transmitter empty (IER bit 1,
pending after each THR write or when enabled, cleared by reading IIR or THR).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Callable

from .actions import Action, ConsoleOutput

THR_RBR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IIR_NO_INT, IIR_THRI, IIR_RDI = 0x01, 0x02, 0x04
IER_RDI, IER_THRI = 0x01, 0x02
MSR_DCD_DSR_CTS = 0xB0
INPUT_LIMIT = 4096


class Serial16550:
    PORTS = 8

    def __init__(self, irq: Callable[[int], None] | None = None) -> None:
        self._irq = irq
        self._level = 0
        self._thr_int = False
        self._lock = threading.RLock()
        self._rx: deque[int] = deque()
        self.ier = 0
        self.lcr = 0x03
        self.mcr = 0x08
        self.scr = 0
        self.dll = 0x0C
        self.dlm = 0

    def feed(self, data: bytes) -> None:
        """Queue console input for the guest (bytes beyond the limit are dropped)."""
        with self._lock:
            room = INPUT_LIMIT - len(self._rx)
            self._rx.extend(data[:max(room, 0)])
            self._update()

    def _iir(self) -> int:
        if self.ier & IER_RDI and self._rx:
            return IIR_RDI
        if self.ier & IER_THRI and self._thr_int:
            return IIR_THRI
        return IIR_NO_INT

    def _update(self) -> None:
        """Drive the interrupt line (caller holds the lock)."""
        level = int(self._iir() != IIR_NO_INT)
        if self._irq is not None and level != self._level:
            self._level = level
            self._irq(level)

    def write(self, offset: int, value: int) -> Action | None:
        with self._lock:
            action = self._write(offset, value & 0xFF)
            self._update()
            return action

    def _write(self, offset: int, value: int) -> Action | None:
        dlab = self.lcr & LCR_DLAB
        if offset == THR_RBR:
            if dlab:
                self.dll = value
                return None
            self._thr_int = True
            return ConsoleOutput(bytes((value,)))
        if offset == IER:
            if dlab:
                self.dlm = value
            else:
                self._thr_int |= bool(value & IER_THRI and not self.ier & IER_THRI)
                self.ier = value & 0x0F
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return None

    def read(self, offset: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update()
            return value

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == THR_RBR:
            if dlab:
                return self.dll
            return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self._thr_int = False
            return iir | 0xC0
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            return MSR_DCD_DSR_CTS
        return self.scr

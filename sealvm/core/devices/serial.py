"""A 16550 UART subset: enough for a console (transmit, receive, line status).

Transmit is always ready (THRE|TEMT), so a guest that polls LSR never waits.
Received bytes come from `feed()` (the console input thread) and are read by
the guest through RBR with LSR.DR.  Interrupts are not raised: guests poll.
"""
from __future__ import annotations

import threading
from collections import deque

from .actions import Action, ConsoleOutput

THR_RBR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
IIR_NO_INT = 0x01
MSR_DCD_DSR_CTS = 0xB0
INPUT_LIMIT = 4096


class Serial16550:
    PORTS = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
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

    def write(self, offset: int, value: int) -> Action | None:
        value &= 0xFF
        dlab = self.lcr & LCR_DLAB
        if offset == THR_RBR:
            if dlab:
                self.dll = value
                return None
            return ConsoleOutput(bytes((value,)))
        if offset == IER:
            if dlab:
                self.dlm = value
            else:
                self.ier = value & 0x0F
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value
        return None

    def read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == THR_RBR:
            if dlab:
                return self.dll
            with self._lock:
                return self._rx.popleft() if self._rx else 0
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR_FCR:
            return IIR_NO_INT | 0xC0
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            with self._lock:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0)
        if offset == MSR:
            return MSR_DCD_DSR_CTS
        return self.scr

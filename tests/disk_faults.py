"""A disk file in memory that can lose power or be killed: the fault model of the disk tests.

`FaultFile` stands where `diskseal.FileIO` stands.  It keeps two images:

* `view`: what a reader sees now (the page cache: every completed pwrite);
* `durable`: what survives a power cut (everything up to the last `sync`).

`killed_copy()` is the file after SIGKILL of the writer: the page cache survives, so
every completed pwrite is there.  `power_cut_copy(rng)` is the file after a power cut:
the durable image plus an arbitrary subset of the writes since the last sync (a disk
cache may persist any of them, in any order).  `kill_at=N` raises `Killed` instead of
doing the N-th I/O operation (pwrite or sync): a kill point.
"""
from __future__ import annotations

import random


class Killed(Exception):
    """The writer was killed at this I/O operation."""


class FaultFile:
    def __init__(self, data: bytes = b"", *, kill_at: int | None = None):
        self.view = bytearray(data)
        self.durable = bytearray(data)
        self.pending: list[tuple[int, bytes]] = []
        self.ops = 0
        self.kill_at = kill_at
        self.fd = -1

    def _op(self) -> None:
        self.ops += 1
        if self.kill_at is not None and self.ops >= self.kill_at:
            raise Killed(self.ops)

    def pread(self, n: int, off: int) -> bytes:
        return bytes(self.view[off:off + n])

    def pwrite(self, data: bytes, off: int) -> None:
        self._op()
        data = bytes(data)
        _put(self.view, off, data)
        self.pending.append((off, data))

    def sync(self) -> None:
        self._op()
        for off, data in self.pending:
            _put(self.durable, off, data)
        self.pending.clear()
        if len(self.durable) != len(self.view):
            del self.durable[len(self.view):]
            self.durable.extend(bytes(len(self.view) - len(self.durable)))

    def size(self) -> int:
        return len(self.view)

    def truncate(self, size: int) -> None:
        del self.view[size:]
        self.view.extend(bytes(size - len(self.view)))

    def killed_copy(self) -> "FaultFile":
        return FaultFile(bytes(self.view))

    def power_cut_copy(self, rng: random.Random) -> "FaultFile":
        img = bytearray(self.durable)
        img.extend(bytes(max(0, len(self.view) - len(img))))
        for off, data in self.pending:
            if rng.random() < 0.5:
                _put(img, off, data)
        return FaultFile(bytes(img))


def _put(buf: bytearray, off: int, data: bytes) -> None:
    if off + len(data) > len(buf):
        buf.extend(bytes(off + len(data) - len(buf)))
    buf[off:off + len(data)] = data

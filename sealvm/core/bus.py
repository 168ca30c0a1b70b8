"""Port and MMIO buses: which device answers an address.

The buses only route; they never interpret data.  A guest access to an
address no device claims is answered the way real hardware answers it (reads
return all ones, writes are dropped) and counted, never an error.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Callable



@dataclass(frozen=True)
class Range:
    base: int
    size: int
    read: Callable[[int, int], int]            # (offset, size) -> value
    write: Callable[[int, int, int], Any]      # (offset, value, size) -> action | None
    name: str

    @property
    def end(self) -> int:
        return self.base + self.size


class BusConflict(ValueError):
    """Two devices were placed on overlapping addresses (our own configuration bug)."""


class Bus:
    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._ranges: list[Range] = []
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def add(self, base: int, size: int, read, write, name: str) -> None:
        base = int(base)
        if size <= 0:
            raise BusConflict(f"{name}: empty range")
        i = bisect.bisect_right(self._bases, base)
        if i > 0 and self._ranges[i - 1].end > base:
            raise BusConflict(f"{name} at {base:#x} overlaps {self._ranges[i - 1].name}")
        if i < len(self._ranges) and base + size > self._ranges[i].base:
            raise BusConflict(f"{name} at {base:#x} overlaps {self._ranges[i].name}")
        self._bases.insert(i, base)
        self._ranges.insert(i, Range(base, size, read, write, name))

    def find(self, addr: int) -> Range | None:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    def read(self, addr: int, size: int) -> int:
        r = self.find(addr)
        if r is None:
            self.unclaimed_reads += 1
            return (1 << (8 * size)) - 1
        return r.read(addr - r.base, size)

    def write(self, addr: int, value: int, size: int):
        r = self.find(addr)
        if r is None:
            self.unclaimed_writes += 1
            return None
        return r.write(addr - r.base, value, size)


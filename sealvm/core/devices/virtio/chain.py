"""Descriptor chains of a split virtqueue: walking, validation, scatter/gather.

A chain is what the guest hands the device for one request: a head index in
the descriptor table, followed through VIRTQ_DESC_F_NEXT links, possibly ending
in one VIRTQ_DESC_F_INDIRECT descriptor that points at a second table in guest
RAM (VIRTIO 1.2 §2.7.5.3: "zero or more normal chained descriptors followed by
a single descriptor with flags&VIRTQ_DESC_F_INDIRECT").

`walk_chain` reads every descriptor exactly once (the guest may rewrite the
table concurrently; we only ever use our copy) and checks, before a single
byte of payload is touched:

* every index lies inside its table, and no table is visited more times than
  it has entries (this bounds loops: a chain longer than its table must repeat);
* every segment lies entirely inside guest RAM (never the MMIO hole);
* the total length stays under the device's cap (≤ 2**32 - 1 by the spec);
* no device-readable segment follows a device-writable one;
* indirect tables: feature negotiated, not combined with NEXT, not nested,
  length a non-zero multiple of 16 and at most MAX_INDIRECT_ENTRIES, in RAM.

Any violation is the guest's fault and raises `InvalidChainError`, which names
the head so the caller can fail just that request.  Nothing allocates more than
one `Segment` per descriptor visited, and the number visited is bounded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

from ...addr import GPA
from ...memory import GuestMemory, GuestMemoryError
from ...sandbox.switches import disabled

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768
# An indirect table may legitimately be longer than the queue (Linux sizes it
# by the request's scatterlist), but never longer than this.
MAX_INDIRECT_ENTRIES = MAX_QUEUE_SIZE
# The spec forbids chains of 2**32 bytes or more; used.len is a u32.
MAX_CHAIN_BYTES = 0xFFFF_FFFF

_DESC = struct.Struct("<QIHH")
# Test-only control: without the bound, a cycle of empty descriptors is walked forever.
_BOUNDED = not disabled("virtio_chain_bound")


class VirtioGuestError(Exception):
    """Base of every error the guest's driver caused (never the monitor's fault)."""


class InvalidChainError(VirtioGuestError):
    """One descriptor chain is malformed; only the request at `head` fails."""

    def __init__(self, head: int, reason: str):
        super().__init__(f"descriptor chain at head {head}: {reason}")
        self.head = head
        self.reason = reason


class QueueBrokenError(VirtioGuestError):
    """The guest corrupted the ring itself; the device must be reset."""


class Segment(NamedTuple):
    """One guest buffer of a chain: `length` bytes at `gpa`, all inside RAM."""

    gpa: GPA
    length: int
    writable: bool


@dataclass(frozen=True)
class DescriptorChain:
    """A validated chain: readable segments first, then writable ones."""

    head: int
    segments: tuple[Segment, ...]
    memory: GuestMemory

    @property
    def writable_len(self) -> int:
        return sum(s.length for s in self.segments if s.writable)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Scatter `data` over the writable segments; returns bytes written.

        Writes stop at the end of the writable space; the excess is dropped.
        """
        src = memoryview(data).cast("B")
        done = 0
        for seg in self.segments:
            if done == len(src):
                break
            if not seg.writable:
                continue
            n = min(seg.length, len(src) - done)
            self.memory.write(seg.gpa, src[done:done + n])
            done += n
        return done


@dataclass
class _WalkState:
    head: int
    total: int = 0
    seen_writable: bool = False


def walk_chain(memory: GuestMemory, table: GPA, table_entries: int, head: int, *,
               indirect_allowed: bool, max_bytes: int = MAX_CHAIN_BYTES) -> DescriptorChain:
    """Follow the chain starting at `head` in the descriptor table at `table`.

    The table itself (`table_entries` * 16 bytes at `table`) must already be
    known to be RAM; the caller checked it when the queue became ready.
    """
    state = _WalkState(head)
    segments: list[Segment] = []
    _walk_table(memory, table, table_entries, head, segments, state,
                in_indirect=False, indirect_allowed=indirect_allowed, max_bytes=max_bytes)
    return DescriptorChain(head, tuple(segments), memory)


def _walk_table(memory: GuestMemory, table: GPA, entries: int, start: int,
                out: list[Segment], st: _WalkState, *, in_indirect: bool,
                indirect_allowed: bool, max_bytes: int) -> None:
    where = "indirect table" if in_indirect else "descriptor table"
    idx = start
    # A chain that does not repeat an entry visits each one at most once.
    for _ in range(entries if _BOUNDED else 1 << 62):
        if idx >= entries:
            raise InvalidChainError(st.head, f"index {idx} outside the {entries}-entry {where}")
        try:
            addr, length, flags, nxt = _DESC.unpack(memory.read(table + DESC_SIZE * idx, DESC_SIZE))
        except GuestMemoryError as e:  # tables are validated first; kept as a second line
            raise InvalidChainError(st.head, f"{where} entry {idx} not readable: {e}") from None
        if flags & VIRTQ_DESC_F_INDIRECT:
            _check_indirect(memory, st.head, addr, length, flags,
                            in_indirect=in_indirect, indirect_allowed=indirect_allowed)
            # The WRITE flag of the descriptor naming the table is ignored (§2.7.5.3.2).
            _walk_table(memory, GPA(addr), length // DESC_SIZE, 0, out, st,
                        in_indirect=True, indirect_allowed=False, max_bytes=max_bytes)
            return
        writable = bool(flags & VIRTQ_DESC_F_WRITE)
        if writable:
            st.seen_writable = True
        elif st.seen_writable:
            raise InvalidChainError(st.head, f"readable descriptor {idx} follows a writable one")
        if length:
            if not memory.contains(addr, length):
                raise InvalidChainError(
                    st.head, f"buffer {addr:#x}+{length:#x} (descriptor {idx}) is not guest RAM")
            st.total += length
            if st.total > max_bytes:
                raise InvalidChainError(st.head, f"total length exceeds the {max_bytes:#x}-byte cap")
            out.append(Segment(GPA(addr), length, writable))
        if not flags & VIRTQ_DESC_F_NEXT:
            return
        idx = nxt
    raise InvalidChainError(st.head, f"chain longer than its {entries}-entry {where} (loop)")


def _check_indirect(memory: GuestMemory, head: int, addr: int, length: int, flags: int, *,
                    in_indirect: bool, indirect_allowed: bool) -> None:
    if in_indirect:
        raise InvalidChainError(head, "nested indirect descriptor")
    if not indirect_allowed:
        raise InvalidChainError(head, "indirect descriptor without VIRTIO_F_INDIRECT_DESC")
    if flags & VIRTQ_DESC_F_NEXT:
        raise InvalidChainError(head, "descriptor has both INDIRECT and NEXT")
    if length == 0 or length % DESC_SIZE:
        raise InvalidChainError(head, f"indirect table length {length:#x} is not a non-zero multiple of 16")
    if length // DESC_SIZE > MAX_INDIRECT_ENTRIES:
        raise InvalidChainError(head, f"indirect table of {length // DESC_SIZE} entries is too long")
    if not memory.contains(addr, length):
        raise InvalidChainError(head, f"indirect table {addr:#x}+{length:#x} is not guest RAM")

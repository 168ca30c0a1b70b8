"""The device side of one split virtqueue (VIRTIO 1.2 §2.7).

Guest memory layout, all little-endian, for a queue of `size` entries:

* descriptor table at `desc` (16-byte aligned): size × {addr u64, len u32,
  flags u16, next u16};
* available ring at `avail` (2-byte aligned): flags u16, idx u16,
  ring[size] u16, used_event u16  — 6 + 2·size bytes;
* used ring at `used` (4-byte aligned): flags u16, idx u16,
  ring[size] {id u32, len u32}, avail_event u16  — 6 + 8·size bytes.

`activate` checks all three lie wholly in RAM before the device may touch
them, so later ring accesses cannot fault.  `pop` consumes available heads
since `last_avail_idx` (16-bit, wrapping); an avail idx more than `size` ahead
is a corrupted ring and raises `QueueBrokenError`, as does a head index
outside the table.  A malformed chain raises `InvalidChainError` *after* the
head was consumed, so the caller completes it with length 0.

Memory ordering (x86 is TSO: only a store followed by a load may be
reordered): avail idx is read before the ring entries it publishes; used
elements are written before used idx.  Where a store must be visible before a
following load (publishing used idx, then reading used_event; publishing
avail_event, then re-reading avail idx) `full_fence` executes a locked
instruction by taking a lock.
"""
from __future__ import annotations

import struct
import threading

from ...addr import GPA
from ...memory import GuestMemory
from .chain import (MAX_CHAIN_BYTES, MAX_QUEUE_SIZE, DescriptorChain, QueueBrokenError,
                    VirtioGuestError, walk_chain)

VIRTQ_AVAIL_F_NO_INTERRUPT = 1

_USED_ELEM = struct.Struct("<II")
_FENCE_LOCK = threading.Lock()


class QueueConfigError(VirtioGuestError):
    """The driver configured a queue the device cannot use (size, alignment, not RAM)."""


def full_fence() -> None:
    """A full memory barrier: acquiring a lock is a locked read-modify-write on x86."""
    with _FENCE_LOCK:
        pass


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Virtqueue:
    """One split virtqueue.  Not thread-safe: the transport's lock guards it."""

    def __init__(self, max_size: int, *, max_chain_bytes: int = MAX_CHAIN_BYTES):
        if not _is_pow2(max_size) or max_size > MAX_QUEUE_SIZE:
            raise ValueError(f"queue max size {max_size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        if not 0 < max_chain_bytes <= MAX_CHAIN_BYTES:
            raise ValueError(f"max_chain_bytes {max_chain_bytes} out of range")
        self.max_size = max_size
        self.max_chain_bytes = max_chain_bytes
        self.reset()

    # ---- configuration (driven by the transport) -------------------------
    def reset(self) -> None:
        """Back to the power-on state: not ready, size = max, addresses 0."""
        self.size = self.max_size
        self.desc = GPA(0)
        self.avail = GPA(0)
        self.used = GPA(0)
        self.ready = False
        self.event_idx = False
        self.indirect = False
        self._memory: GuestMemory | None = None
        self.last_avail_idx = 0
        self.used_idx = 0
        self._avail_idx = 0          # last avail idx read from the guest
        self._signalled_used = 0     # used idx at the last interrupt decision

    def activate(self, memory: GuestMemory, *, event_idx: bool, indirect: bool) -> None:
        """QueueReady=1: validate the driver's configuration, then start at index 0."""
        size = self.size
        if not _is_pow2(size) or size > self.max_size:
            raise QueueConfigError(f"queue size {size} is not a power of 2 <= {self.max_size}")
        for name, gpa, align, length in (("descriptor table", self.desc, 16, 16 * size),
                                          ("available ring", self.avail, 2, 6 + 2 * size),
                                          ("used ring", self.used, 4, 6 + 8 * size)):
            if gpa % align:
                raise QueueConfigError(f"{name} at {int(gpa):#x} is not {align}-byte aligned")
            if not memory.contains(gpa, length):
                raise QueueConfigError(f"{name} {int(gpa):#x}+{length:#x} is not guest RAM")
        self._memory = memory
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = self.used_idx = self._avail_idx = self._signalled_used = 0
        self.ready = True

    def deactivate(self) -> None:
        """QueueReady=0: stop touching the rings (configuration is kept)."""
        self.ready = False
        self._memory = None

    @property
    def _mem(self) -> GuestMemory:
        if self._memory is None or not self.ready:
            raise RuntimeError("virtqueue used while not ready (monitor bug)")
        return self._memory

    # ---- available ring ---------------------------------------------------
    def _read_avail_idx(self) -> None:
        idx = self._mem.read_u16(self.avail + 2)
        pending = (idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise QueueBrokenError(
                f"avail idx {idx} is {pending} entries ahead of {self.last_avail_idx}"
                f" in a {self.size}-entry queue")
        self._avail_idx = idx

    def has_available(self) -> bool:
        """Whether the driver published heads not yet popped (re-reads avail idx)."""
        if self._avail_idx == self.last_avail_idx:
            self._read_avail_idx()
        return self._avail_idx != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None.

        Raises QueueBrokenError (ring corrupt, nothing consumed) or
        InvalidChainError (this head consumed; complete it with length 0).
        """
        if not self.has_available():
            return None
        mem = self._mem
        head = mem.read_u16(self.avail + 4 + 2 * (self.last_avail_idx % self.size))
        if head >= self.size:
            raise QueueBrokenError(
                f"avail ring entry {self.last_avail_idx} names head {head} outside the"
                f" {self.size}-entry table")
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return walk_chain(mem, self.desc, self.size, head,
                          indirect_allowed=self.indirect, max_bytes=self.max_chain_bytes)

    # ---- used ring --------------------------------------------------------
    def add_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes device-written."""
        if not 0 <= head < self.size:
            raise ValueError(f"used head {head} outside the queue (device bug)")
        if not 0 <= written <= MAX_CHAIN_BYTES:
            raise ValueError(f"used length {written} out of range (device bug)")
        mem = self._mem
        slot = self.used_idx % self.size
        mem.write(self.used + 4 + 8 * slot, _USED_ELEM.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        # The element above is stored first; x86 keeps stores in order.
        mem.write_u16(self.used + 2, self.used_idx)

    # ---- notification suppression -----------------------------------------
    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for the used entries added since the last call.

        With VIRTIO_F_EVENT_IDX: vring_need_event(used_event, new, old), i.e. the
        used idx crossed the driver's used_event.  Without it: unless the driver
        set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        mem = self._mem
        new, old = self.used_idx, self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        full_fence()  # our used idx store before the load of the driver's request
        if self.event_idx:
            used_event = mem.read_u16(self.avail + 4 + 2 * self.size)
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not mem.read_u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def _set_avail_event(self, value: int) -> None:
        self._mem.write_u16(self.used + 4 + 8 * self.size, value & 0xFFFF)

    def enable_notification(self) -> bool:
        """Ask to be notified of the next new head; True if heads arrived meanwhile.

        With EVENT_IDX writes avail_event = last_avail_idx; the re-check after
        the fence closes the race with a driver that published just before.
        """
        if self.event_idx:
            self._set_avail_event(self.last_avail_idx)
        full_fence()
        return self.has_available()

    def notify_on_next_add(self) -> None:
        """Work is left over: have the driver notify when it adds anything more."""
        if self.event_idx:
            self._set_avail_event(self._avail_idx)

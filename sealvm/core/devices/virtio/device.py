"""The base of every virtio device model, independent of the transport.

A device model says what it is (`device_id`, `features`, the maximum size of
each of its queues, its configuration bytes) and does the work for one chain
in `handle_chain`.  It performs no I/O of its own: everything it may touch
(guest memory through the chain, an entropy source, a backing file) was handed
to it as a capability when it was built.  The transport (mmio.py) owns the
queues, the locking, the status register and interrupt delivery.

Errors and who is at fault:

* `InvalidChainError` (guest): the base `process` completes that chain with
  length 0 and carries on;
* `QueueBrokenError` (guest): propagates; the transport marks the device
  DEVICE_NEEDS_RESET;
* `DeviceBackendError` (host): the device's own capability failed; the
  transport also marks the device broken, but logs the host as at fault.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .chain import DescriptorChain, InvalidChainError, MAX_CHAIN_BYTES
from .queue import Virtqueue

log = logging.getLogger("sealvm.virtio")

# Device-independent feature bits (VIRTIO 1.2 §6).
VIRTIO_F_INDIRECT_DESC = 1 << 28
VIRTIO_F_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32

VIRTIO_ID_RNG = 4          # device type (VIRTIO 1.2 §5)


class LogLimiter:
    """Token bucket for guest-triggered log lines: a burst, then `rate` per second.

    Not reset by a device reset, so a guest cannot flood the log by looping
    through resets.  Suppressed lines are counted and reported with the next one.
    """

    def __init__(self, burst: int = 16, rate: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, sink: Callable[..., None] | None = None):
        self._burst, self._rate, self._clock = burst, rate, clock
        self._sink = sink or log.log
        self._tokens = float(burst)
        self._last = clock()
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.suppressed += 1
            return
        self._tokens -= 1
        if self.suppressed:
            msg += " (%d similar lines suppressed)"
            args += (self.suppressed,)
            self.suppressed = 0
        self._sink(level, msg, *args)


class DeviceBackendError(Exception):
    """A capability the device depends on failed (the host's fault, not the guest's)."""


class VirtioDevice:
    """Subclass and set the class attributes; override `handle_chain`."""

    name: str = "virtio"
    device_id: int = 0
    features: int = 0                     # device-specific bits only (0..23)
    queue_max_sizes: tuple[int, ...] = ()
    max_chain_bytes: int = MAX_CHAIN_BYTES

    def __init__(self) -> None:
        self.negotiated_features = 0
        self.log_limiter = LogLimiter()

    # ---- configuration space ---------------------------------------------
    @property
    def config(self) -> bytes:
        """The device-specific configuration space (bytes at Config = 0x100)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; bytes past the end read as 0."""
        cfg = self.config
        chunk = cfg[offset:offset + size] if 0 <= offset < len(cfg) else b""
        return chunk + bytes(size - len(chunk))

    def write_config(self, offset: int, data: bytes) -> None:
        """The driver wrote configuration space; read-only by default."""
        self.log_guest_error(f"write of {len(data)} bytes to read-only config at {offset:#x} ignored")

    # ---- lifecycle ---------------------------------------------------------
    def make_queues(self) -> list[Virtqueue]:
        return [Virtqueue(n, max_chain_bytes=self.max_chain_bytes) for n in self.queue_max_sizes]

    def activate(self, features: int) -> None:
        """DRIVER_OK: the driver is live with `features` negotiated."""
        self.negotiated_features = features

    def reset(self) -> None:
        """Status = 0: forget everything the driver set up."""
        self.negotiated_features = 0

    # ---- work ----------------------------------------------------------------
    def process(self, queue_index: int, queue: Virtqueue) -> int:
        """Complete the chains available now (at most one ring's worth).

        Returns the number of used entries added.  QueueBrokenError and
        DeviceBackendError propagate to the transport.
        """
        done = 0
        for _ in range(queue.size):
            try:
                chain = queue.pop()
            except InvalidChainError as e:
                self.log_guest_error(f"queue {queue_index}: {e}; request failed")
                queue.add_used(e.head, 0)
                done += 1
                continue
            if chain is None:
                break
            written = self.handle_chain(queue_index, chain)
            queue.add_used(chain.head, written)
            done += 1
        return done

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """Serve one request; return the number of bytes written into the chain."""
        raise NotImplementedError

    # ---- logging -----------------------------------------------------------
    def log_guest_error(self, message: str) -> None:
        """Log a contained guest error (rate-limited: the guest controls the frequency)."""
        self.log_limiter.log(logging.WARNING, "%s: guest error: %s", self.name, message)

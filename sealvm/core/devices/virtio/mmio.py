"""The virtio-mmio transport, version 2 (VIRTIO 1.2 §4.2), for one device.

`MmioTransport` decodes the 4 KiB register window the run loop maps at
`VIRTIO_MMIO_BASE + n * VIRTIO_MMIO_STRIDE`: identification, 64-bit feature
negotiation, queue setup, the status state machine, interrupt status and the
device configuration space at 0x100.  It owns the device's queues.

Capabilities passed in: the guest `memory`, an `interrupt()` callable (the
run loop wires it to the device's irqfd and to waking a parked vCPU), and
optionally `notify(queue_index)` which, when given, receives QueueNotify
writes instead of processing them on the writing vCPU's thread.  A worker that
owns an ioeventfd on base + 0x50 (datamatch = queue index) calls
`process_queue(i)` directly; it returns True while work is left over and must
then be called again.

Concurrency: one lock per transport serialises register access from vCPU
threads with queue processing from worker threads.  `interrupt` and `notify`
are called after the lock is released.

Guest errors are contained: a bad register access is ignored (reads give 0);
a broken ring puts the device in DEVICE_NEEDS_RESET with a configuration-change
interrupt and no further processing until the driver resets it (Status = 0).
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from ...addr import GPA
from ...memory import GuestMemory, GuestMemoryError
from .chain import VirtioGuestError
from .device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1,
                     DeviceBackendError, VirtioDevice)
from .queue import Virtqueue

MMIO_MAGIC = 0x7472_6976          # "virt"
MMIO_VERSION = 2
MMIO_VENDOR_ID = 0x4C41_4553      # "SEAL"
MMIO_WINDOW = 0x1000

REG_MAGIC, REG_VERSION, REG_DEVICE_ID, REG_VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
REG_DEVICE_FEATURES, REG_DEVICE_FEATURES_SEL = 0x010, 0x014
REG_DRIVER_FEATURES, REG_DRIVER_FEATURES_SEL = 0x020, 0x024
REG_QUEUE_SEL, REG_QUEUE_NUM_MAX, REG_QUEUE_NUM = 0x030, 0x034, 0x038
REG_QUEUE_READY, REG_QUEUE_NOTIFY = 0x044, 0x050
REG_INTERRUPT_STATUS, REG_INTERRUPT_ACK, REG_STATUS = 0x060, 0x064, 0x070
REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH = 0x080, 0x084
REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH = 0x090, 0x094
REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
REG_SHM_SEL, REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH = 0x0AC, 0x0B0, 0x0B4
REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH, REG_QUEUE_RESET = 0x0B8, 0x0BC, 0x0C0
REG_CONFIG_GENERATION, REG_CONFIG = 0x0FC, 0x100

STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK = 0x01, 0x02, 0x04
STATUS_FEATURES_OK, STATUS_DEVICE_NEEDS_RESET, STATUS_FAILED = 0x08, 0x40, 0x80

INT_VRING, INT_CONFIG = 0x1, 0x2

TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX
# Ring passes per process_queue call; each pass handles at most one ring's worth.
MAX_PASSES = 4
# Rounds of process_queue a QueueNotify runs inline when no `notify` hook is set.
MAX_INLINE_ROUNDS = 16

_QUEUE_ADDR_REGS = {
    REG_QUEUE_DESC_LOW: ("desc", 0), REG_QUEUE_DESC_HIGH: ("desc", 32),
    REG_QUEUE_DRIVER_LOW: ("avail", 0), REG_QUEUE_DRIVER_HIGH: ("avail", 32),
    REG_QUEUE_DEVICE_LOW: ("used", 0), REG_QUEUE_DEVICE_HIGH: ("used", 32),
}


class MmioTransport:
    """virtio-mmio v2 registers and queue processing for one `VirtioDevice`."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory,
                 interrupt: Callable[[], None], *,
                 notify: Callable[[int], None] | None = None, name: str | None = None):
        self.device = device
        self.memory = memory
        if name:
            device.name = name  # one name (e.g. "virtio-rng@0xd0000000") in every log line
        self.name = device.name
        self._interrupt = interrupt
        self._notify = notify
        self._lock = threading.RLock()      # re-entered by Machine.devices_held
        self.queues: list[Virtqueue] = device.make_queues()
        self.offered_features = (device.features & 0xFF_FFFF) | TRANSPORT_FEATURES
        self.config_generation = 0
        self.breaks = 0
        self._fire = False  # set under the lock by a write that must raise an interrupt
        self._reset_locked()

    # ---- state ----------------------------------------------------------------
    def _reset_locked(self) -> None:
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self._driver_features_beyond_64 = False
        self.queue_sel = 0
        self.shm_sel = 0
        self.broken_reason: str | None = None
        for q in self.queues:
            q.reset()
        self.device.reset()

    @property
    def broken(self) -> bool:
        return self.broken_reason is not None

    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _mark_broken(self, reason: str) -> bool:
        """Enter DEVICE_NEEDS_RESET; True if the driver must get a config interrupt."""
        if self.broken:
            return False
        self.breaks += 1
        self.device.log_limiter.log(logging.ERROR, "%s: device needs reset: %s", self.name, reason)
        self.broken_reason = reason
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self.interrupt_status |= INT_CONFIG
            return True
        return False

    # ---- register access -----------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` in the window."""
        with self._lock:
            if size not in (1, 2, 4, 8) or offset < 0 or offset + size > MMIO_WINDOW:
                return 0
            if offset >= REG_CONFIG:
                return int.from_bytes(self.device.read_config(offset - REG_CONFIG, size), "little")
            if size != 4 or offset % 4:
                self.device.log_guest_error(f"{size}-byte register read at {offset:#x} ignored")
                return 0
            return self._read_register(offset) & 0xFFFF_FFFF

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == REG_MAGIC:
            return MMIO_MAGIC
        if offset == REG_VERSION:
            return MMIO_VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_id
        if offset == REG_VENDOR_ID:
            return MMIO_VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.offered_features >> (32 * sel)) if sel < 2 else 0
        if offset == REG_QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == REG_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset in _QUEUE_ADDR_REGS:
            attr, shift = _QUEUE_ADDR_REGS[offset]
            return int(getattr(q, attr)) >> shift if q else 0
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH):
            return 0xFFFF_FFFF  # no shared memory regions
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write; a QueueNotify is handed on (see the module docstring)."""
        with self._lock:
            self._fire = False
            kick = self._write_locked(offset, size, value)
            fire, self._fire = self._fire, False
        if fire:
            self._interrupt()
        if kick is None:
            return
        if self._notify is not None:
            self._notify(kick)
            return
        for _ in range(MAX_INLINE_ROUNDS):
            if not self.process_queue(kick):
                break

    def _write_locked(self, offset: int, size: int, value: int) -> int | None:
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > MMIO_WINDOW:
            return None
        value &= (1 << (8 * size)) - 1
        if offset >= REG_CONFIG:
            self.device.write_config(offset - REG_CONFIG, value.to_bytes(size, "little"))
            return None
        if size != 4 or offset % 4:
            self.device.log_guest_error(f"{size}-byte register write at {offset:#x} ignored")
            return None
        if offset == REG_QUEUE_NOTIFY:
            return self._queue_notify(value)
        if offset == REG_STATUS:
            self._write_status(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset in (REG_QUEUE_NUM, REG_QUEUE_READY) or offset in _QUEUE_ADDR_REGS:
            self._write_queue_register(offset, value)
        elif offset == REG_SHM_SEL:
            self.shm_sel = value
        else:
            self.device.log_guest_error(f"write of {value:#x} to register {offset:#x} ignored")
        return None

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK:
            self.device.log_guest_error("DriverFeatures written after FEATURES_OK; ignored")
            return
        sel = self.driver_features_sel
        if sel < 2:
            shift = 32 * sel
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif value:
            self._driver_features_beyond_64 = True

    def _features_refusal(self) -> str | None:
        """Why the driver's feature set cannot be accepted, or None."""
        unoffered = self.driver_features & ~self.offered_features
        if unoffered or self._driver_features_beyond_64:
            return f"driver accepted features not offered ({unoffered:#x})"
        if not self.driver_features & VIRTIO_F_VERSION_1:
            return "driver did not accept VIRTIO_F_VERSION_1"
        return None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset_locked()
            return
        old = self.status & ~STATUS_DEVICE_NEEDS_RESET
        new = value & 0xFF & ~STATUS_DEVICE_NEEDS_RESET
        if old & ~new:
            self.device.log_guest_error(f"status {value:#x} clears bits of {old:#x}; ignored")
            return
        added = new & ~old
        if added & STATUS_FEATURES_OK:
            refusal = self._features_refusal()
            if refusal:
                self.device.log_guest_error(f"FEATURES_OK refused: {refusal}")
                new &= ~(STATUS_FEATURES_OK | STATUS_DRIVER_OK)
                added &= ~STATUS_DRIVER_OK
        if added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            self.device.log_guest_error("DRIVER_OK without FEATURES_OK; ignored")
            new &= ~STATUS_DRIVER_OK
            added &= ~STATUS_DRIVER_OK
        self.status = new | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if added & STATUS_DRIVER_OK:
            self.device.activate(self.driver_features)
            if self.broken:  # broke during setup: tell the now-live driver
                self.interrupt_status |= INT_CONFIG
                self._fire = True

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        if q is None:
            self.device.log_guest_error(f"queue register {offset:#x} for absent queue {self.queue_sel}")
            return
        if self.status & STATUS_DRIVER_OK:
            self.device.log_guest_error(f"queue register {offset:#x} written after DRIVER_OK; ignored")
            return
        if offset == REG_QUEUE_READY:
            self._write_queue_ready(q, value)
        elif q.ready:
            self.device.log_guest_error(f"queue register {offset:#x} written while queue ready; ignored")
        elif offset == REG_QUEUE_NUM:
            q.size = value
        else:
            attr, shift = _QUEUE_ADDR_REGS[offset]
            old = int(getattr(q, attr))
            setattr(q, attr, GPA((old & ~(0xFFFF_FFFF << shift)) | (value << shift)))

    def _write_queue_ready(self, q: Virtqueue, value: int) -> None:
        if value == 0:
            q.deactivate()
        elif value != 1:
            self.device.log_guest_error(f"QueueReady written with {value:#x}; ignored")
        elif q.ready or self.broken:
            return
        elif not self.status & STATUS_FEATURES_OK:
            self.device.log_guest_error("QueueReady before FEATURES_OK; ignored")
        else:
            try:
                q.activate(self.memory, event_idx=bool(self.driver_features & VIRTIO_F_EVENT_IDX),
                           indirect=bool(self.driver_features & VIRTIO_F_INDIRECT_DESC))
            except VirtioGuestError as e:
                self._mark_broken(f"guest error: queue {self.queue_sel}: {e}")

    def _queue_notify(self, index: int) -> int | None:
        if (index < len(self.queues) and self.queues[index].ready and not self.broken
                and self.status & STATUS_DRIVER_OK):
            return index
        self.device.log_guest_error(f"notify of queue {index} that is not live; ignored")
        return None

    # ---- queue processing ----------------------------------------------------
    def process_queue(self, index: int) -> bool:
        """Serve queue `index`; interrupt the driver if it asked to be.

        Safe to call from any thread, any time (a non-live queue is a no-op).
        Returns True if the per-call budget ran out with heads still
        available: call again soon (the driver may not notify again).
        """
        with self._lock:
            fire, pending = self._process_locked(index)
        if fire:
            self._interrupt()
        return pending

    def _process_locked(self, index: int) -> tuple[bool, bool]:
        if self.broken or not self.status & STATUS_DRIVER_OK or not 0 <= index < len(self.queues):
            return False, False
        q = self.queues[index]
        if not q.ready:
            return False, False
        used_before = q.used_idx
        pending = False
        try:
            for _ in range(MAX_PASSES):
                self.device.process(index, q)
                if not q.enable_notification():
                    break
            else:
                pending = True
                q.notify_on_next_add()
            fire = q.needs_interrupt()
        except (VirtioGuestError, GuestMemoryError) as e:
            fire = self._mark_broken(f"guest error: queue {index}: {e}")
            pending = False
        except DeviceBackendError as e:
            fire = self._mark_broken(f"host error: {e}")
            pending = False
        if fire and q.used_idx != used_before:
            self.interrupt_status |= INT_VRING
        return fire, pending

"""A fake guest virtio driver for the virtio tests, plus a few checks of the fake itself.

It talks to an `MmioTransport` only through 32-bit register accesses and lays
out the split rings in `GuestMemory.anonymous(...)` byte for byte as a guest
driver would: descriptor table, available ring (with used_event), used ring
(with avail_event).  Other test modules import it.
"""
from __future__ import annotations

import struct

from sealvm.core.addr import MiB
from sealvm.core.devices.virtio.mmio import MmioTransport
from sealvm.core.devices.virtio.rng import VirtioRng
from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.chain import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                              VIRTQ_DESC_F_WRITE)
from sealvm.core.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                               VIRTIO_F_VERSION_1)
from sealvm.core.memory import GuestMemory

NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
ALL_RING_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC

MEM_SIZE = 4 * MiB
DESC_GPA, AVAIL_GPA, USED_GPA = 0x10000, 0x20000, 0x30000
DATA_GPA = 0x100000


class Counter:
    """The `interrupt` capability: counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


class CountingEntropy:
    """Deterministic entropy: a running byte counter, so fills are checkable."""

    def __init__(self) -> None:
        self.next = 0
        self.requests: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        out = bytes((self.next + i) & 0xFF for i in range(n))
        self.next = (self.next + n) & 0xFF
        return out


class FakeDriver:
    """Guest side of one virtio-mmio device with (by default) one queue."""

    def __init__(self, transport: MmioTransport, memory: GuestMemory, *, queue_size: int = 8,
                 desc: int = DESC_GPA, avail: int = AVAIL_GPA, used: int = USED_GPA):
        self.t = transport
        self.mem = memory
        self.size = queue_size
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = 0
        self.seen_used = 0
        self._bump = DATA_GPA

    # ---- registers ------------------------------------------------------------
    def rd(self, off: int) -> int:
        return self.t.read(off, 4)

    def wr(self, off: int, value: int) -> None:
        self.t.write(off, 4, value)

    def device_features(self) -> int:
        self.wr(M.REG_DEVICE_FEATURES_SEL, 0)
        lo = self.rd(M.REG_DEVICE_FEATURES)
        self.wr(M.REG_DEVICE_FEATURES_SEL, 1)
        return lo | self.rd(M.REG_DEVICE_FEATURES) << 32

    def write_features(self, features: int) -> None:
        for sel in (0, 1):
            self.wr(M.REG_DRIVER_FEATURES_SEL, sel)
            self.wr(M.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; True if the device kept it."""
        self.wr(M.REG_STATUS, 0)
        self.wr(M.REG_STATUS, M.STATUS_ACKNOWLEDGE)
        self.wr(M.REG_STATUS, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER)
        offered = self.device_features()
        self.write_features(offered & ALL_RING_FEATURES if features is None else features)
        self.wr(M.REG_STATUS, M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER | M.STATUS_FEATURES_OK)
        return bool(self.rd(M.REG_STATUS) & M.STATUS_FEATURES_OK)

    def setup_queue(self, index: int = 0) -> None:
        self.mem.fill(self.desc, 16 * self.size)
        self.mem.fill(self.avail, 6 + 2 * self.size)
        self.mem.fill(self.used, 6 + 8 * self.size)
        self.avail_idx = self.seen_used = 0
        self.wr(M.REG_QUEUE_SEL, index)
        assert self.rd(M.REG_QUEUE_READY) == 0
        self.wr(M.REG_QUEUE_NUM, self.size)
        for reg, gpa in ((M.REG_QUEUE_DESC_LOW, self.desc), (M.REG_QUEUE_DRIVER_LOW, self.avail),
                         (M.REG_QUEUE_DEVICE_LOW, self.used)):
            self.wr(reg, gpa & 0xFFFF_FFFF)
            self.wr(reg + 4, gpa >> 32)
        self.wr(M.REG_QUEUE_READY, 1)

    def driver_ok(self) -> None:
        self.wr(M.REG_STATUS, self.rd(M.REG_STATUS) | M.STATUS_DRIVER_OK)

    def init(self, features: int | None = None) -> "FakeDriver":
        assert self.negotiate(features)
        self.setup_queue()
        assert self.rd(M.REG_QUEUE_READY) == 1
        self.driver_ok()
        return self

    # ---- rings ------------------------------------------------------------------
    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self._bump + align - 1) & ~(align - 1)
        self._bump = gpa + n
        return gpa

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                 table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, *heads: int) -> None:
        for h in heads:
            self.mem.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), h)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self.avail_idx)

    def kick(self, queue: int = 0) -> None:
        self.wr(M.REG_QUEUE_NOTIFY, queue)

    def used_idx(self) -> int:
        return self.mem.read_u16(self.used + 2)

    def used_elem(self, n: int) -> tuple[int, int]:
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (n % self.size), 8))

    def take_used(self) -> list[tuple[int, int]]:
        """The used elements added since the last call (as a guest would poll them)."""
        out = []
        while self.seen_used != self.used_idx():
            out.append(self.used_elem(self.seen_used))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def set_used_event(self, v: int) -> None:
        self.mem.write_u16(self.avail + 4 + 2 * self.size, v)

    def set_avail_flags(self, v: int) -> None:
        self.mem.write_u16(self.avail, v)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used + 4 + 8 * self.size)

    def request(self, length: int, head: int = 0) -> int:
        """Post one single-descriptor writable buffer at `head`; returns its GPA."""
        buf = self.alloc(length)
        self.set_desc(head, buf, length, WRITE)
        self.publish(head)
        return buf


def make_rng(queue_size: int = 8, *, entropy=None, driver_queue_size: int | None = None,
             notify=None, **rng_kw):
    """A fresh RAM + rng device + transport + fake driver (not yet initialised)."""
    mem = GuestMemory.anonymous(MEM_SIZE)
    irq = Counter()
    ent = entropy if entropy is not None else CountingEntropy()
    dev = VirtioRng(ent, queue_size=queue_size, **rng_kw)
    t = MmioTransport(dev, mem, irq, notify=notify, name="virtio-rng@test")
    drv = FakeDriver(t, mem, queue_size=driver_queue_size or queue_size)
    return mem, irq, ent, dev, t, drv


# ---- checks of the fake itself -----------------------------------------------------
def test_fake_driver_lays_out_rings_where_it_said() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    q = t.queues[0]
    assert (q.desc, q.avail, q.used, q.size) == (DESC_GPA, AVAIL_GPA, USED_GPA, 8)
    buf = drv.request(4)
    assert mem.read_u16(AVAIL_GPA + 2) == 1 and mem.read_u16(AVAIL_GPA + 4) == 0
    assert struct.unpack("<QIHH", mem.read(DESC_GPA, 16)) == (buf, 4, WRITE, 0)


def test_fake_driver_alloc_is_aligned_and_disjoint() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    a, b = drv.alloc(5), drv.alloc(5)
    assert a % 16 == 0 and b % 16 == 0 and b >= a + 5

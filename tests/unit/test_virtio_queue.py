"""Split virtqueue behaviour, driven through the fake driver and virtio-rng.

Covers: rng fills and used lengths, scatter/gather, 16-bit index wraparound,
indirect tables, EVENT_IDX and NO_INTERRUPT suppression, and the typed errors
of `Virtqueue` itself.  Hostile rings are in test_virtio_malformed.py.
"""
from __future__ import annotations

import struct

import pytest

from sealvm.core.addr import GPA
from sealvm.core.devices.virtio.chain import InvalidChainError, QueueBrokenError
from sealvm.core.devices.virtio.queue import QueueConfigError, Virtqueue
from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.device import VIRTIO_F_VERSION_1
from sealvm.core.memory import GuestMemory

try:
    from .test_virtio_fakedriver import INDIRECT, MEM_SIZE, NEXT, WRITE, FakeDriver, make_rng
except ImportError:
    from test_virtio_fakedriver import INDIRECT, MEM_SIZE, NEXT, WRITE, FakeDriver, make_rng


def expected_bytes(start: int, n: int) -> bytes:
    return bytes((start + i) & 0xFF for i in range(n))


# ---- the happy path ---------------------------------------------------------------
def test_rng_fills_buffers_and_reports_used_lengths() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    bufs = []
    for head, n in enumerate((16, 1, 300)):
        buf = drv.alloc(n)
        drv.set_desc(head, buf, n, WRITE)
        bufs.append((buf, n))
    drv.publish(0, 1, 2)
    drv.kick()
    assert drv.take_used() == [(0, 16), (1, 1), (2, 300)]
    assert ent.requests == [16, 1, 300]
    assert mem.read(*bufs[0]) == expected_bytes(0, 16)
    assert mem.read(*bufs[1]) == expected_bytes(16, 1)
    assert mem.read(*bufs[2]) == expected_bytes(17, 300)
    assert irq.calls == 1                        # one batch, one interrupt
    assert t.interrupt_status == M.INT_VRING
    drv.wr(M.REG_INTERRUPT_ACK, M.INT_VRING)
    assert t.interrupt_status == 0


def test_rng_scatters_over_segments_and_skips_readable() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    r, w1, w2 = drv.alloc(8), drv.alloc(3), drv.alloc(5)
    mem.write(r, b"READONLY")
    drv.set_desc(0, r, 8, NEXT, 4)
    drv.set_desc(4, w1, 3, WRITE | NEXT, 6)
    drv.set_desc(6, w2, 5, WRITE)
    drv.publish(0)
    drv.kick()
    assert drv.take_used() == [(0, 8)]
    assert mem.read(w1, 3) + mem.read(w2, 5) == expected_bytes(0, 8)
    assert mem.read(r, 8) == b"READONLY"


def test_rng_request_capped() -> None:
    mem, irq, ent, dev, t, drv = make_rng(max_request=1000)
    drv.init()
    buf = drv.request(4096)
    drv.kick()
    assert drv.take_used() == [(0, 1000)]
    assert ent.requests == [1000]
    assert mem.read(buf + 1000, 8) == bytes(8)


def test_chain_read_and_write_helpers() -> None:
    mem = GuestMemory.anonymous(MEM_SIZE)
    q = Virtqueue(4)
    q.desc, q.avail, q.used = GPA(0x1000), GPA(0x2000), GPA(0x3000)
    q.activate(mem, event_idx=False, indirect=False)
    drv = FakeDriver.__new__(FakeDriver)   # ring helpers only, no transport
    drv.mem, drv.size, drv.desc, drv.avail, drv.used, drv.avail_idx = mem, 4, 0x1000, 0x2000, 0x3000, 0
    mem.write(0x5000, b"hello ")
    mem.write(0x6000, b"world")
    drv.set_desc(2, 0x5000, 6, NEXT, 3)
    drv.set_desc(3, 0x6000, 5, NEXT, 1)
    drv.set_desc(1, 0x7000, 4, WRITE | NEXT, 0)
    drv.set_desc(0, 0x8000, 4, WRITE)
    drv.publish(2)
    chain = q.pop()
    assert chain is not None and chain.head == 2
    assert [(int(s.gpa), s.length, s.writable) for s in chain.segments] == [
        (0x5000, 6, False), (0x6000, 5, False), (0x7000, 4, True), (0x8000, 4, True)]
    assert chain.writable_len == 8
    assert chain.write(b"0123456789") == 8
    assert mem.read(0x7000, 4) == b"0123" and mem.read(0x8000, 4) == b"4567"
    assert q.pop() is None
    q.add_used(2, 8)
    assert mem.read_u16(0x3002) == 1 and struct.unpack("<II", mem.read(0x3004, 8)) == (2, 8)


def test_index_wraparound_past_65535() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=256)
    drv.init()
    bufs = [drv.alloc(1) for _ in range(256)]
    for i, b in enumerate(bufs):
        drv.set_desc(i, b, 1, WRITE)
    total = 0
    while total < 65536 + 300:
        drv.publish(*range(256))
        drv.kick()
        used = drv.take_used()
        assert used == [(i, 1) for i in range(256)]
        total += 256
    q = t.queues[0]
    assert q.last_avail_idx == q.used_idx == drv.used_idx() == total & 0xFFFF
    assert total > 0xFFFF


def test_wraparound_with_partial_batches() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=4)
    drv.init()
    q = t.queues[0]
    # Fast-forward both sides to just below the wrap, as a long-running guest would be.
    start = 0xFFFE
    q.last_avail_idx = q.used_idx = q._avail_idx = q._signalled_used = start
    drv.avail_idx = drv.seen_used = start
    mem.write_u16(drv.avail + 2, start)
    mem.write_u16(drv.used + 2, start)
    for round_ in range(3):
        for h in range(3):
            drv.set_desc(h, drv.alloc(2), 2, WRITE)
        drv.publish(0, 1, 2)
        drv.kick()
        assert drv.take_used() == [(0, 2), (1, 2), (2, 2)]
    assert drv.used_idx() == (start + 9) & 0xFFFF == 7


# ---- indirect descriptors ------------------------------------------------------------
def test_indirect_table() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    table, b0, b1 = drv.alloc(48), drv.alloc(10), drv.alloc(20)
    drv.set_desc(0, b0, 10, WRITE | NEXT, 2, table=table)
    drv.set_desc(2, b1, 20, WRITE, 0, table=table)
    drv.set_desc(1, 0xDEAD_0000, 0, NEXT, 1, table=table)   # unused entry, never read as part of the chain
    drv.set_desc(5, table, 48, INDIRECT | WRITE)            # WRITE on the table descriptor is ignored
    drv.publish(5)
    drv.kick()
    assert drv.take_used() == [(5, 30)]
    assert mem.read(b0, 10) + mem.read(b1, 20) == expected_bytes(0, 30)


def test_direct_descriptors_followed_by_indirect() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    table, b0, b1 = drv.alloc(16), drv.alloc(4), drv.alloc(6)
    drv.set_desc(0, b0, 4, WRITE, table=table)
    drv.set_desc(3, b1, 6, WRITE | NEXT, 7)
    drv.set_desc(7, table, 16, INDIRECT)
    drv.publish(3)
    drv.kick()
    assert drv.take_used() == [(3, 10)]
    assert mem.read(b1, 6) + mem.read(b0, 4) == expected_bytes(0, 10)


def test_indirect_refused_when_not_negotiated() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init(VIRTIO_F_VERSION_1)
    table, b0 = drv.alloc(16), drv.alloc(4)
    drv.set_desc(0, b0, 4, WRITE, table=table)
    drv.set_desc(0, table, 16, INDIRECT)
    drv.publish(0)
    drv.kick()
    assert drv.take_used() == [(0, 0)]
    assert mem.read(b0, 4) == bytes(4) and not t.broken


# ---- notification suppression -----------------------------------------------------------
def test_event_idx_interrupts_only_when_used_event_crossed() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    q = t.queues[0]
    assert q.event_idx
    drv.set_used_event(2)               # "interrupt me once used idx passes 2"
    for h in range(2):
        drv.request(1, head=h)
    drv.kick()                           # used idx 0 -> 2: entry 2 not yet used
    assert drv.used_idx() == 2 and irq.calls == 0
    assert drv.avail_event() == 2        # device asks to be kicked for avail entry 2
    drv.request(1, head=2)
    drv.kick()                           # used idx 2 -> 3 crosses used_event 2
    assert irq.calls == 1
    drv.request(1, head=3)
    drv.kick()                           # used_event still 2: nothing new crossed
    assert irq.calls == 1 and drv.used_idx() == 4
    drv.set_used_event(4)
    for h in (4, 5, 6):
        drv.request(1, head=h)
    drv.kick()                           # 4 -> 7 crosses 4 in one batch: exactly one interrupt
    assert irq.calls == 2 and drv.avail_event() == 7
    assert len(drv.take_used()) == 7


def test_event_idx_used_event_across_wrap() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=4)
    drv.init()
    q = t.queues[0]
    start = 0xFFFE
    q.last_avail_idx = q.used_idx = q._avail_idx = q._signalled_used = start
    drv.avail_idx = drv.seen_used = start
    mem.write_u16(drv.avail + 2, start)
    mem.write_u16(drv.used + 2, start)
    drv.set_used_event(0)                # entry 0 of the next lap
    drv.request(1, head=0)
    drv.request(1, head=1)
    drv.kick()                           # 0xfffe -> 0: does not pass 0
    assert irq.calls == 0
    drv.request(1, head=2)
    drv.kick()                           # 0 -> 1 passes 0
    assert irq.calls == 1


def test_no_interrupt_flag_without_event_idx() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init(VIRTIO_F_VERSION_1)
    assert not t.queues[0].event_idx
    drv.set_avail_flags(1)               # VIRTQ_AVAIL_F_NO_INTERRUPT
    drv.request(4, head=0)
    drv.kick()
    assert drv.take_used() == [(0, 4)] and irq.calls == 0
    drv.set_avail_flags(0)
    drv.request(4, head=1)
    drv.kick()
    assert drv.take_used() == [(1, 4)] and irq.calls == 1
    assert drv.avail_event() == 0        # avail_event untouched without EVENT_IDX


def test_kick_with_nothing_new_does_not_interrupt() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init(VIRTIO_F_VERSION_1)
    drv.kick()
    assert irq.calls == 0 and drv.used_idx() == 0


def test_queue_unit_errors_are_typed() -> None:
    mem = GuestMemory.anonymous(MEM_SIZE)
    with pytest.raises(ValueError):
        Virtqueue(3)
    with pytest.raises(ValueError):
        Virtqueue(65536)
    q = Virtqueue(8)
    q.desc, q.avail, q.used = GPA(0x1008), GPA(0x2000), GPA(0x3000)
    with pytest.raises(QueueConfigError):
        q.activate(mem, event_idx=False, indirect=False)
    q.desc = GPA(0x1000)
    q.activate(mem, event_idx=False, indirect=False)
    mem.write_u16(0x2002, 1)
    mem.write_u16(0x2004, 0)
    mem.write(0x1000, struct.pack("<QIHH", 0x4000, 4, NEXT, 0))
    with pytest.raises(InvalidChainError) as ei:
        q.pop()
    assert ei.value.head == 0 and "loop" in str(ei.value)
    mem.write_u16(0x2002, 200)
    with pytest.raises(QueueBrokenError):
        q.pop()
    q.add_used(0, 0)
    with pytest.raises(ValueError):
        q.add_used(8, 0)

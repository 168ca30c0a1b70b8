"""Hostile guests: every class of malformed chain or corrupted ring, and recovery.

A malformed chain (loop, index out of range, buffer outside RAM or in the
MMIO hole, huge or overflowing length, readable-after-writable, nested or
malformed indirect table) fails only that request: it is returned with used
length 0 and the device keeps serving.  A corrupted ring (avail idx jump,
head out of range) puts the device in DEVICE_NEEDS_RESET with a
configuration-change interrupt; nothing raises into the monitor, and a driver
reset recovers.
"""
from __future__ import annotations

import pytest

from sealvm.core.addr import MMIO_HOLE_START, VIRTIO_MMIO_BASE
from sealvm.core.devices.virtio import mmio as M

try:
    from .test_virtio_fakedriver import DATA_GPA, INDIRECT, MEM_SIZE, NEXT, WRITE, FakeDriver, make_rng
except ImportError:
    from test_virtio_fakedriver import DATA_GPA, INDIRECT, MEM_SIZE, NEXT, WRITE, FakeDriver, make_rng


# ---- malformed chains: the request fails, the device carries on ----------------------------
def _loop(drv: FakeDriver) -> None:
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 1)
    drv.set_desc(1, drv.alloc(4), 4, WRITE | NEXT, 0)


def _self_loop(drv: FakeDriver) -> None:
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 0)


def _next_out_of_range(drv: FakeDriver) -> None:
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 8)


def _outside_ram(drv: FakeDriver) -> None:
    drv.set_desc(0, MEM_SIZE - 2, 4, WRITE)          # straddles the end of RAM


def _in_mmio_hole(drv: FakeDriver) -> None:
    drv.set_desc(0, int(VIRTIO_MMIO_BASE), 4, WRITE)


def _hole_start(drv: FakeDriver) -> None:
    drv.set_desc(0, int(MMIO_HOLE_START) + 0x10, 0x100, WRITE)


def _huge_length(drv: FakeDriver) -> None:
    drv.set_desc(0, DATA_GPA, 0xFFFF_FFFF, WRITE)


def _addr_overflow(drv: FakeDriver) -> None:
    drv.set_desc(0, 0xFFFF_FFFF_FFFF_FFF0, 0x20, WRITE)


def _readable_after_writable(drv: FakeDriver) -> None:
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 1)
    drv.set_desc(1, drv.alloc(4), 4, NEXT, 2)
    drv.set_desc(2, drv.alloc(4), 4, WRITE)


def _nested_indirect(drv: FakeDriver) -> None:
    inner, outer = drv.alloc(16), drv.alloc(32)
    drv.set_desc(0, drv.alloc(4), 4, WRITE, table=inner)
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 1, table=outer)
    drv.set_desc(1, inner, 16, INDIRECT, table=outer)
    drv.set_desc(0, outer, 32, INDIRECT)


def _indirect_len_not_multiple(drv: FakeDriver) -> None:
    table = drv.alloc(32)
    drv.set_desc(0, drv.alloc(4), 4, WRITE, table=table)
    drv.set_desc(0, table, 24, INDIRECT)


def _indirect_len_zero(drv: FakeDriver) -> None:
    drv.set_desc(0, drv.alloc(16), 0, INDIRECT)


def _indirect_and_next(drv: FakeDriver) -> None:
    table = drv.alloc(16)
    drv.set_desc(0, drv.alloc(4), 4, WRITE, table=table)
    drv.set_desc(0, table, 16, INDIRECT | NEXT, 1)
    drv.set_desc(1, drv.alloc(4), 4, WRITE)


def _indirect_table_outside_ram(drv: FakeDriver) -> None:
    drv.set_desc(0, int(VIRTIO_MMIO_BASE), 64, INDIRECT)


def _indirect_loop(drv: FakeDriver) -> None:
    table = drv.alloc(32)
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 1, table=table)
    drv.set_desc(1, drv.alloc(4), 4, WRITE | NEXT, 0, table=table)
    drv.set_desc(0, table, 32, INDIRECT)


def _indirect_next_out_of_table(drv: FakeDriver) -> None:
    table = drv.alloc(32)
    drv.set_desc(0, drv.alloc(4), 4, WRITE | NEXT, 2, table=table)   # table has 2 entries
    drv.set_desc(0, table, 32, INDIRECT)


MALFORMED = [_loop, _self_loop, _next_out_of_range, _outside_ram, _in_mmio_hole, _hole_start,
             _huge_length, _addr_overflow, _readable_after_writable, _nested_indirect,
             _indirect_len_not_multiple, _indirect_len_zero, _indirect_and_next,
             _indirect_table_outside_ram, _indirect_loop, _indirect_next_out_of_table]


@pytest.mark.parametrize("build", MALFORMED, ids=lambda f: f.__name__.strip("_"))
def test_malformed_chain_fails_only_that_request(build, caplog) -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    build(drv)
    written_setup = bytes(mem.view(DATA_GPA, 0x10000))
    drv.publish(0)
    good = drv.alloc(8)
    drv.set_desc(5, good, 8, WRITE)
    drv.publish(5)
    drv.kick()                                         # never raises
    assert drv.take_used() == [(0, 0), (5, 8)]
    assert not t.broken and not drv.rd(M.REG_STATUS) & M.STATUS_DEVICE_NEEDS_RESET
    assert ent.requests == [8]                          # no entropy spent on the bad chain
    after = bytes(mem.view(DATA_GPA, 0x10000))
    off = good - DATA_GPA
    assert after[:off] + after[off + 8:] == written_setup[:off] + written_setup[off + 8:]
    assert "guest error" in caplog.text and "virtio-rng@test" in caplog.text


def test_total_length_cap() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    t.queues[0].max_chain_bytes = 4096
    drv.init()
    drv.set_desc(0, drv.alloc(4096), 4096, WRITE | NEXT, 1)
    drv.set_desc(1, drv.alloc(1), 1, WRITE)
    drv.publish(0)
    drv.kick()
    assert drv.take_used() == [(0, 0)]


def test_longest_legal_chain_is_accepted() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    for i in range(8):                    # uses every entry of the table once
        drv.set_desc(i, drv.alloc(1), 1, WRITE | (NEXT if i < 7 else 0), i + 1)
    drv.publish(0)
    drv.kick()
    assert drv.take_used() == [(0, 8)]


# ---- corrupted rings: the device needs a reset ----------------------------------------------
def _assert_broken(t, drv, irq) -> None:
    assert t.broken
    assert drv.rd(M.REG_STATUS) & M.STATUS_DEVICE_NEEDS_RESET
    assert drv.rd(M.REG_INTERRUPT_STATUS) & M.INT_CONFIG
    assert irq.calls >= 1


def test_avail_idx_jump_breaks_device_and_reset_recovers(caplog) -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    drv.request(4, head=0)
    mem.write_u16(drv.avail + 2, 9)        # 9 new entries in an 8-entry ring
    drv.kick()
    _assert_broken(t, drv, irq)
    assert "device needs reset" in caplog.text and "virtio-rng@test" in caplog.text
    assert drv.used_idx() == 0
    # Broken: further notifications do nothing, process_queue is a no-op.
    drv.kick()
    assert t.process_queue(0) is False and drv.used_idx() == 0 and ent.requests == []
    # The driver resets and starts over.
    drv.init()
    assert not t.broken and drv.rd(M.REG_STATUS) & M.STATUS_DRIVER_OK
    drv.request(4, head=3)
    drv.kick()
    assert drv.take_used() == [(3, 4)]


def test_head_out_of_range_breaks_device() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    drv.request(4, head=1)
    drv.publish(8)                         # avail entry names head 8 of 8
    drv.request(4, head=2)
    drv.kick()
    _assert_broken(t, drv, irq)
    assert drv.take_used() == [(1, 4)]     # the good request before it completed
    assert drv.rd(M.REG_INTERRUPT_STATUS) == M.INT_CONFIG | M.INT_VRING

"""The virtio-mmio v2 transport, driven through its register interface.

Covers: identification, feature negotiation and its refusal cases, the status
state machine and reset, queue setup and its validation, register access
rules (size, alignment, window), interrupt status/ack, log rate limiting and
host-side entropy failure.  QueueNotify routing is in test_virtio_notify.py.
"""
from __future__ import annotations

import pytest

from sealvm.core.addr import MMIO_HOLE_START
from sealvm.core.devices.virtio.mmio import MmioTransport
from sealvm.core.devices.virtio.rng import VirtioRng
from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                               VIRTIO_F_VERSION_1, LogLimiter)
from sealvm.core.memory import GuestMemory

try:
    from .test_virtio_fakedriver import ALL_RING_FEATURES, MEM_SIZE, Counter, FakeDriver, make_rng
except ImportError:
    from test_virtio_fakedriver import ALL_RING_FEATURES, MEM_SIZE, Counter, FakeDriver, make_rng

ACK_DRIVER = M.STATUS_ACKNOWLEDGE | M.STATUS_DRIVER


# ---- identification ------------------------------------------------------------------
def test_identification_registers() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.rd(M.REG_MAGIC) == 0x74726976
    assert drv.rd(M.REG_VERSION) == 2
    assert drv.rd(M.REG_DEVICE_ID) == 4
    assert drv.rd(M.REG_VENDOR_ID) == M.MMIO_VENDOR_ID
    assert drv.rd(M.REG_STATUS) == 0
    assert drv.rd(M.REG_CONFIG_GENERATION) == 0
    for reg in (M.REG_SHM_LEN_LOW, M.REG_SHM_LEN_HIGH, M.REG_SHM_BASE_LOW, M.REG_SHM_BASE_HIGH):
        assert drv.rd(reg) == 0xFFFF_FFFF
    assert drv.rd(M.REG_QUEUE_RESET) == 0
    assert t.read(M.REG_CONFIG, 4) == 0 and t.read(M.REG_CONFIG + 0x10, 1) == 0


def test_device_features_window() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.device_features() == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC
    drv.wr(M.REG_DEVICE_FEATURES_SEL, 2)
    assert drv.rd(M.REG_DEVICE_FEATURES) == 0
    drv.wr(M.REG_DEVICE_FEATURES_SEL, 0xFFFF_FFFF)
    assert drv.rd(M.REG_DEVICE_FEATURES) == 0


def test_queue_num_max_and_absent_queues() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=256)
    assert drv.rd(M.REG_QUEUE_NUM_MAX) == 256
    drv.wr(M.REG_QUEUE_SEL, 1)
    assert drv.rd(M.REG_QUEUE_NUM_MAX) == 0 and drv.rd(M.REG_QUEUE_READY) == 0
    drv.wr(M.REG_QUEUE_NUM, 16)           # absent queue: ignored, no exception
    drv.wr(M.REG_QUEUE_READY, 1)
    assert drv.rd(M.REG_QUEUE_READY) == 0


# ---- feature negotiation ------------------------------------------------------------------
def test_negotiation_accepts_subset_with_version_1() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    assert t.driver_features == VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX


@pytest.mark.parametrize("features", [
    0,                                              # no VERSION_1 (legacy driver)
    VIRTIO_F_EVENT_IDX,                             # no VERSION_1
    VIRTIO_F_VERSION_1 | 1,                         # device-specific bit 0 not offered by rng
    VIRTIO_F_VERSION_1 | (1 << 34),                 # RING_PACKED not offered
    VIRTIO_F_VERSION_1 | (1 << 63),
])
def test_negotiation_refused(features: int) -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert not drv.negotiate(features)
    assert drv.rd(M.REG_STATUS) == ACK_DRIVER
    # DRIVER_OK without FEATURES_OK is not kept either, and queues cannot go live.
    drv.wr(M.REG_STATUS, ACK_DRIVER | M.STATUS_DRIVER_OK)
    assert drv.rd(M.REG_STATUS) == ACK_DRIVER
    drv.setup_queue()
    assert drv.rd(M.REG_QUEUE_READY) == 0


def test_negotiation_refused_for_features_beyond_64_bits() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.wr(M.REG_STATUS, ACK_DRIVER)
    drv.write_features(VIRTIO_F_VERSION_1)
    drv.wr(M.REG_DRIVER_FEATURES_SEL, 2)
    drv.wr(M.REG_DRIVER_FEATURES, 1)
    drv.wr(M.REG_STATUS, ACK_DRIVER | M.STATUS_FEATURES_OK)
    assert not drv.rd(M.REG_STATUS) & M.STATUS_FEATURES_OK


def test_refused_driver_may_retry_with_fewer_features() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert not drv.negotiate(VIRTIO_F_VERSION_1 | (1 << 40))
    drv.write_features(VIRTIO_F_VERSION_1)
    drv.wr(M.REG_STATUS, ACK_DRIVER | M.STATUS_FEATURES_OK)
    assert drv.rd(M.REG_STATUS) & M.STATUS_FEATURES_OK


def test_driver_features_frozen_after_features_ok() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.write_features(ALL_RING_FEATURES)
    assert t.driver_features == VIRTIO_F_VERSION_1


def test_status_bits_cannot_be_cleared_without_reset() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    full = drv.rd(M.REG_STATUS)
    drv.wr(M.REG_STATUS, M.STATUS_ACKNOWLEDGE)
    assert drv.rd(M.REG_STATUS) == full
    drv.wr(M.REG_STATUS, full | M.STATUS_DEVICE_NEEDS_RESET)   # driver cannot set it
    assert drv.rd(M.REG_STATUS) == full
    drv.wr(M.REG_STATUS, full | M.STATUS_FAILED)
    assert drv.rd(M.REG_STATUS) == full | M.STATUS_FAILED


# ---- queue setup ------------------------------------------------------------------------
def test_queue_setup_registers() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=256)
    drv.negotiate()
    drv.size = 64
    drv.setup_queue()
    q = t.queues[0]
    assert drv.rd(M.REG_QUEUE_READY) == 1 and q.ready and q.size == 64
    assert drv.rd(M.REG_QUEUE_DESC_LOW) == drv.desc and drv.rd(M.REG_QUEUE_DESC_HIGH) == 0
    assert q.event_idx and q.indirect


def _setup_with(t: MmioTransport, drv: FakeDriver, **regs: int) -> None:
    drv.wr(M.REG_QUEUE_SEL, 0)
    values = {M.REG_QUEUE_NUM: drv.size, M.REG_QUEUE_DESC_LOW: drv.desc,
              M.REG_QUEUE_DRIVER_LOW: drv.avail, M.REG_QUEUE_DEVICE_LOW: drv.used}
    values.update({getattr(M, k): v for k, v in regs.items()})
    for reg, v in values.items():
        drv.wr(reg, v & 0xFFFF_FFFF)
        if reg != M.REG_QUEUE_NUM:
            drv.wr(reg + 4, v >> 32)
    drv.wr(M.REG_QUEUE_READY, 1)


@pytest.mark.parametrize("regs", [
    {"REG_QUEUE_NUM": 6},                              # not a power of 2
    {"REG_QUEUE_NUM": 0},
    {"REG_QUEUE_NUM": 16},                             # above QueueNumMax (8)
    {"REG_QUEUE_DESC_LOW": 0x10008},                   # desc table not 16-aligned
    {"REG_QUEUE_DRIVER_LOW": 0x20001},                 # avail not 2-aligned
    {"REG_QUEUE_DEVICE_LOW": 0x30002},                 # used not 4-aligned
    {"REG_QUEUE_DESC_LOW": MEM_SIZE - 64},             # table runs past RAM
    {"REG_QUEUE_DEVICE_LOW": int(MMIO_HOLE_START)},    # used ring in the MMIO hole
    {"REG_QUEUE_DRIVER_LOW": 1 << 40},                 # far beyond RAM
])
def test_invalid_queue_config_is_refused(regs, caplog) -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate()
    _setup_with(t, drv, **regs)
    assert drv.rd(M.REG_QUEUE_READY) == 0
    assert t.broken and drv.rd(M.REG_STATUS) & M.STATUS_DEVICE_NEEDS_RESET
    assert irq.calls == 0                     # no DRIVER_OK yet: no config interrupt
    assert "virtio-rng@test" in caplog.text
    drv.init()                                # reset + proper setup recovers
    assert not t.broken and drv.rd(M.REG_QUEUE_READY) == 1


def test_driver_ok_on_a_device_broken_during_setup_raises_config_interrupt() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate()
    _setup_with(t, drv, REG_QUEUE_NUM=3)
    assert t.broken and irq.calls == 0
    drv.driver_ok()
    assert drv.rd(M.REG_INTERRUPT_STATUS) == M.INT_CONFIG and irq.calls == 1
    assert drv.rd(M.REG_STATUS) & M.STATUS_DEVICE_NEEDS_RESET


def test_guest_error_logging_is_rate_limited(caplog) -> None:
    now = [0.0]
    mem, irq, ent, dev, t, drv = make_rng()
    dev.log_limiter = LogLimiter(burst=3, rate=1.0, clock=lambda: now[0])
    for _ in range(50):                        # 2-byte register reads: each a guest error
        t.read(M.REG_STATUS, 2)
        drv.wr(M.REG_STATUS, 0)                # resets do not refill the budget
    assert caplog.text.count("guest error") == 3
    now[0] = 10.0
    t.read(M.REG_STATUS, 2)
    assert caplog.text.count("guest error") == 4 and "47 similar lines suppressed" in caplog.text


def test_queue_ready_before_features_ok_ignored() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.wr(M.REG_STATUS, ACK_DRIVER)
    drv.setup_queue()
    assert drv.rd(M.REG_QUEUE_READY) == 0 and not t.broken


def test_queue_registers_ignored_while_ready_or_after_driver_ok() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate()
    drv.setup_queue()
    q = t.queues[0]
    drv.wr(M.REG_QUEUE_NUM, 4)
    drv.wr(M.REG_QUEUE_DESC_LOW, 0x40000)
    assert q.size == 8 and q.desc == drv.desc
    drv.driver_ok()
    drv.wr(M.REG_QUEUE_READY, 0)
    assert q.ready and drv.rd(M.REG_QUEUE_READY) == 1
    drv.wr(M.REG_QUEUE_DEVICE_LOW, 0x50000)
    assert q.used == drv.used


def test_queue_ready_zero_before_driver_ok_disables() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate()
    drv.setup_queue()
    drv.wr(M.REG_QUEUE_READY, 0)
    assert drv.rd(M.REG_QUEUE_READY) == 0
    drv.wr(M.REG_QUEUE_NUM, 4)                 # reconfigurable again
    assert t.queues[0].size == 4


# ---- register access rules -----------------------------------------------------------------
def test_non_32bit_and_unaligned_register_access() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert t.read(M.REG_MAGIC, 1) == 0 and t.read(M.REG_MAGIC, 2) == 0 and t.read(M.REG_MAGIC, 8) == 0
    assert t.read(M.REG_MAGIC + 1, 4) == 0
    assert t.read(M.REG_MAGIC, 3) == 0
    t.write(M.REG_STATUS, 1, M.STATUS_ACKNOWLEDGE)
    t.write(M.REG_STATUS, 2, M.STATUS_ACKNOWLEDGE)
    t.write(M.REG_STATUS + 2, 4, M.STATUS_ACKNOWLEDGE)
    assert t.status == 0
    # outside the window / negative offsets
    assert t.read(0x1000, 4) == 0 and t.read(0xFFE, 4) == 0 and t.read(-4, 4) == 0
    t.write(0x1000, 4, 1)
    t.write(-4, 4, 1)
    # oversized values are truncated to the access size, not rejected with an exception
    t.write(M.REG_STATUS, 4, (1 << 40) | M.STATUS_ACKNOWLEDGE)
    assert t.status == M.STATUS_ACKNOWLEDGE


def test_read_only_registers_ignore_writes() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    for reg in (M.REG_MAGIC, M.REG_VERSION, M.REG_DEVICE_ID, M.REG_QUEUE_NUM_MAX,
                M.REG_INTERRUPT_STATUS, M.REG_CONFIG_GENERATION, 0x0F0):
        drv.wr(reg, 0x1234)
    assert drv.rd(M.REG_MAGIC) == M.MMIO_MAGIC and drv.rd(M.REG_DEVICE_ID) == 4
    assert drv.rd(M.REG_INTERRUPT_STATUS) == 0
    t.write(M.REG_CONFIG, 4, 0xFFFF_FFFF)      # rng has no config space: ignored


# ---- interrupts, reset, host errors --------------------------------------------------------
def test_interrupt_ack_clears_only_acked_bits() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init(VIRTIO_F_VERSION_1)
    drv.request(4)
    drv.kick()
    t.interrupt_status |= M.INT_CONFIG          # as a configuration change would
    assert drv.rd(M.REG_INTERRUPT_STATUS) == M.INT_VRING | M.INT_CONFIG
    drv.wr(M.REG_INTERRUPT_ACK, M.INT_VRING)
    assert drv.rd(M.REG_INTERRUPT_STATUS) == M.INT_CONFIG


def test_reset_clears_everything() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    drv.init()
    drv.request(4)
    drv.kick()
    drv.wr(M.REG_QUEUE_SEL, 0)
    drv.wr(M.REG_STATUS, 0)
    q = t.queues[0]
    assert drv.rd(M.REG_STATUS) == 0 and drv.rd(M.REG_INTERRUPT_STATUS) == 0
    assert drv.rd(M.REG_QUEUE_READY) == 0 and not q.ready
    assert (q.last_avail_idx, q.used_idx, q.size, int(q.desc)) == (0, 0, 8, 0)
    assert t.driver_features == 0 and dev.negotiated_features == 0
    drv.init()
    drv.request(4, head=2)
    drv.kick()
    assert drv.take_used() == [(2, 4)]


def test_entropy_failure_is_a_host_error(caplog) -> None:
    def failing(n: int) -> bytes:
        raise OSError("no entropy")

    mem, irq, ent, dev, t, drv = make_rng(entropy=failing)
    drv.init()
    buf = drv.request(8)
    drv.kick()
    assert t.broken and "host error" in t.broken_reason
    assert drv.rd(M.REG_STATUS) & M.STATUS_DEVICE_NEEDS_RESET
    assert drv.rd(M.REG_INTERRUPT_STATUS) == M.INT_CONFIG and irq.calls == 1
    assert mem.read(buf, 8) == bytes(8) and drv.used_idx() == 0
    assert "host error" in caplog.text and "virtio-rng@test" in caplog.text


@pytest.mark.parametrize("bad", [lambda n: b"x" * (n - 1), lambda n: "s" * n, lambda n: None])
def test_entropy_wrong_amount_is_a_host_error(bad) -> None:
    mem, irq, ent, dev, t, drv = make_rng(entropy=bad)
    drv.init()
    drv.request(8)
    drv.kick()
    assert t.broken and "host error" in t.broken_reason


def test_two_queue_sizes_in_one_memory() -> None:
    """Two devices share RAM, each with its own transport and rings."""
    mem = GuestMemory.anonymous(MEM_SIZE)
    irqs = Counter(), Counter()
    ts = [MmioTransport(VirtioRng(lambda n: b"\xaa" * n, queue_size=s), mem, irqs[i], name=f"rng{i}")
          for i, s in enumerate((4, 16))]
    drvs = [FakeDriver(ts[0], mem, queue_size=4),
            FakeDriver(ts[1], mem, queue_size=16, desc=0x40000, avail=0x50000, used=0x60000)]
    drvs[1]._bump = 0x200000
    for d in drvs:
        d.init()
        d.request(4)
        d.kick()
    assert [d.take_used() for d in drvs] == [[(0, 4)], [(0, 4)]]
    assert irqs[0].calls == irqs[1].calls == 1

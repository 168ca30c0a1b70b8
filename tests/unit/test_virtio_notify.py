"""QueueNotify routing: inline processing, the `notify` hook, worker threads.

The run loop may process a queue on the vCPU thread that wrote QueueNotify
(no hook), or hand the kick to a worker (hook / ioeventfd) that calls
`process_queue(i)` while vCPUs keep accessing registers.  Also: a guest that
never stops adding buffers cannot keep the monitor in one call forever.
"""
from __future__ import annotations

import threading

from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.device import VIRTIO_F_VERSION_1

try:
    from .test_virtio_fakedriver import WRITE, make_rng
except ImportError:
    from test_virtio_fakedriver import WRITE, make_rng


# ---- notify routing -----------------------------------------------------------------------
def test_notify_of_absent_or_idle_queue_ignored() -> None:
    mem, irq, ent, dev, t, drv = make_rng()
    assert drv.negotiate()
    drv.setup_queue()
    drv.request(4)
    drv.kick()                                 # before DRIVER_OK: ignored
    assert drv.used_idx() == 0
    drv.driver_ok()
    drv.kick(1)
    drv.kick(0xFFFF_FFFF)
    assert drv.used_idx() == 0
    assert t.process_queue(5) is False and t.process_queue(-1) is False
    drv.kick(0)
    assert drv.take_used() == [(0, 4)]


def test_notify_hook_defers_processing_to_worker() -> None:
    kicks: list[int] = []
    mem, irq, ent, dev, t, drv = make_rng(notify=kicks.append)
    drv.init()
    drv.request(16)
    drv.kick()
    assert kicks == [0] and drv.used_idx() == 0
    done = threading.Event()

    def worker() -> None:
        while t.process_queue(kicks.pop()):
            pass
        done.set()

    th = threading.Thread(target=worker)
    th.start()
    th.join(5)
    assert done.is_set() and drv.take_used() == [(0, 16)] and irq.calls == 1


def test_concurrent_register_reads_and_processing() -> None:
    mem, irq, ent, dev, t, drv = make_rng(queue_size=64, notify=lambda i: None)
    drv.init(VIRTIO_F_VERSION_1)
    bufs = [drv.alloc(4) for _ in range(64)]
    for i, b in enumerate(bufs):
        drv.set_desc(i, b, 4, WRITE)
    stop = threading.Event()
    errors: list[BaseException] = []

    def vcpu() -> None:
        try:
            while not stop.is_set():
                assert drv.rd(M.REG_MAGIC) == M.MMIO_MAGIC
                drv.wr(M.REG_INTERRUPT_ACK, drv.rd(M.REG_INTERRUPT_STATUS))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    th = threading.Thread(target=vcpu)
    th.start()
    try:
        for _ in range(20):
            drv.publish(*range(64))
            while t.process_queue(0):
                pass
            assert len(drv.take_used()) == 64
    finally:
        stop.set()
        th.join(5)
    assert not errors


def test_budget_bounds_a_guest_that_never_stops_adding() -> None:
    """An entropy source that publishes a new request on every call stands in for a
    second vCPU feeding the queue as fast as the device drains it."""
    holder: dict = {}

    def feeding_entropy(n: int) -> bytes:
        drv = holder["drv"]
        drv.publish(drv.avail_idx % drv.size)
        return bytes(n)

    mem, irq, ent, dev, t, drv = make_rng(entropy=feeding_entropy)
    holder["drv"] = drv
    drv.init()
    for h in range(8):
        drv.set_desc(h, drv.alloc(1), 1, WRITE)
    drv.publish(0)
    drv.kick()                                  # inline path: bounded rounds, returns
    q = t.queues[0]
    assert q.used_idx == M.MAX_INLINE_ROUNDS * M.MAX_PASSES * 8
    assert t.process_queue(0) is True           # still more: the caller must call again
    assert drv.avail_event() == q._avail_idx    # driver's next add will notify
    assert not t.broken

"""virtio-rng requests from the guest (sealvm/core/devices/virtio/rng.py) over real queues.

VirtioRng.process serves one ring's worth of chains; malformed chains fail alone.
Refusal: VirtioGuestError (a broken ring).  No request gets more than max_request
bytes, and every used length matches what the device wrote.
"""
from __future__ import annotations

from fuzz.target import Violation
from fuzz.targets import _virtio as V
from fuzz.targets.virtqueue import seeds as _seeds
from sealvm.core.devices.virtio.chain import VirtioGuestError
from sealvm.core.devices.virtio.rng import VirtioRng

MODULES = ["sealvm.core.devices.virtio.rng", "sealvm.core.devices.virtio.device",
           "sealvm.core.devices.virtio.queue", "sealvm.core.devices.virtio.chain"]
EXPECTED = (VirtioGuestError,)
dev: VirtioRng | None = None


def setup() -> None:
    global dev
    V.setup()
    dev = VirtioRng(lambda n: b"\x5a" * n, queue_size=16, max_request=1024)
    dev.log_guest_error = lambda message: None


def one(data: bytes) -> None:
    q = V.queue_from(data, max_size=16)
    used = V.record_used(q)
    done = dev.process(0, q)
    if done > q.size or len(used) != done:
        raise Violation(f"{done} chains in one pass of a {q.size}-entry queue")
    for head, n in used:
        if n > dev.max_request:
            raise Violation(f"used length {n} at head {head} over max_request")


def seeds() -> list[bytes]:
    return _seeds()

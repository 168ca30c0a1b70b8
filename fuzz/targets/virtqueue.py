"""Virtqueues and descriptor chains from the guest (sealvm/core/devices/virtio/{queue,chain}.py).

The fuzzer writes the descriptor table, the available ring and the buffers into a
2 MiB guest RAM; the real Virtqueue pops every available chain (walk_chain checks
them), fills the writable part, returns it on the used ring and runs the notification
logic, as a device's worker does.  Refusal: VirtioGuestError (QueueConfigError,
QueueBrokenError, InvalidChainError).  Every chain handed out must satisfy
walk_chain's promises; one pass never pops more than the queue holds.
"""
from __future__ import annotations

from fuzz.target import Violation
from fuzz.targets import _virtio as V
from sealvm.core.devices.virtio.chain import InvalidChainError, VirtioGuestError

MODULES = ["sealvm.core.devices.virtio.queue", "sealvm.core.devices.virtio.chain",
           "sealvm.core.memory"]
EXPECTED = (VirtioGuestError,)


def setup() -> None:
    V.setup()


def one(data: bytes) -> None:
    q = V.queue_from(data)
    popped = 0
    for _ in range(q.size + 1):
        try:
            chain = q.pop()
        except InvalidChainError as e:
            q.add_used(e.head, 0)
            popped += 1
            continue
        if chain is None:
            break
        popped += 1
        V.check_chain(chain, q)
        n = min(chain.writable_len, 4096)
        if chain.write(b"\xa5" * n) != n:
            raise Violation("chain.write wrote less than its writable length")
        q.add_used(chain.head, n)
    if popped > q.size:
        raise Violation(f"popped {popped} chains from a {q.size}-entry queue in one pass")
    q.needs_interrupt()
    q.enable_notification()
    q.notify_on_next_add()


def seeds() -> list[bytes]:
    d = V.DATA
    return [
        V.layout(4, [(d, 64, 1, 1), (d + 64, 512, 2, 0)], [0]),                  # read + write
        V.layout(8, [(d, 16, 0, 0), (d + 16, 16, 2, 0), (d + 32, 4096, 2, 0)], [0, 1, 2], cfg_bits=0x20),
        V.layout(4, [(d, 32, 4, 0)], [0],                                          # indirect
                 data=V._D.pack(d + 256, 100, 1, 1) + V._D.pack(d + 512, 200, 2, 0),
                 cfg_bits=0x10),
        V.layout(2, [(d, 16, 1, 1), (d, 16, 1, 0)], [0, 1]),                      # loop-free pair
        V.layout(2, [(d, 16, 1, 0)], [0, 0], flags=1),
    ]

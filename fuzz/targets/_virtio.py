"""Guest RAM and one virtqueue laid out in it, filled from fuzzer bytes, for the virtio targets.

Input layout: byte 0 picks the queue size (2**(1 + b % 4), or a bad size when b >= 0xF0)
and bit 0x10/0x20 the INDIRECT_DESC / EVENT_IDX features; then, verbatim into guest RAM:
the descriptor table (16 * size bytes at DESC), the available ring (6 + 2 * size at
AVAIL) and everything else from DATA on (request headers, buffers, indirect tables).
Addresses inside descriptors are the guest's own business: the real queue and chain
code must refuse what is not RAM.  RAM is 2 MiB (the smallest a VM may have), so both
in-range and out-of-range addresses are easy to reach.
"""
from __future__ import annotations

import struct

from fuzz.target import Violation
from sealvm.core.addr import GPA, MIN_MEMORY
from sealvm.core.devices.virtio.chain import DescriptorChain
from sealvm.core.devices.virtio.queue import Virtqueue
from sealvm.core.memory import GuestMemory

DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x4000
SCRUB = 0x10000                       # bytes cleared before each input
_D = struct.Struct("<QIHH")

memory: GuestMemory | None = None


def setup() -> GuestMemory:
    global memory
    if memory is None:
        memory = GuestMemory.anonymous(MIN_MEMORY)
    return memory


def queue_from(data: bytes, max_size: int = 16, max_chain_bytes: int | None = None) -> Virtqueue:
    """A ready queue over guest RAM filled from `data` (QueueConfigError if refused)."""
    mem = memory
    mem.fill(GPA(0), SCRUB)
    cfg = data[0] if data else 0
    size = 1 << (1 + cfg % 4) if cfg < 0xF0 else cfg - 0xEF        # 1..16, some not a power of 2
    body = data[1:]
    n_desc, n_avail = 16 * size, 6 + 2 * size
    mem.write(GPA(DESC), body[:n_desc])
    mem.write(GPA(AVAIL), body[n_desc:n_desc + n_avail])
    mem.write(GPA(DATA), body[n_desc + n_avail:][:SCRUB - DATA])
    kw = {} if max_chain_bytes is None else {"max_chain_bytes": max_chain_bytes}
    q = Virtqueue(max_size, **kw)
    q.size = size
    q.desc, q.avail, q.used = GPA(DESC), GPA(AVAIL), GPA(USED)
    q.activate(mem, event_idx=bool(cfg & 0x20), indirect=bool(cfg & 0x10))
    return q


def check_chain(chain: DescriptorChain, q: Virtqueue) -> None:
    """What walk_chain promises: RAM only, readable before writable, within the byte cap."""
    seen_w, total = False, 0
    for s in chain.segments:
        if not memory.contains(s.gpa, s.length) or s.length <= 0:
            raise Violation(f"segment {int(s.gpa):#x}+{s.length:#x} is not RAM")
        if s.writable:
            seen_w = True
        elif seen_w:
            raise Violation("readable segment after a writable one")
        total += s.length
    if total > q.max_chain_bytes:
        raise Violation(f"chain of {total} bytes over the {q.max_chain_bytes} cap")
    if not 0 <= chain.head < q.size:
        raise Violation(f"head {chain.head} outside the queue")


def record_used(q: Virtqueue) -> list[tuple[int, int]]:
    """Every (head, length) the device returns, as it returns them (the used ring itself
    is guest memory: a guest may point a buffer at it and overwrite what was written)."""
    log: list[tuple[int, int]] = []
    add = q.add_used

    def add_used(head: int, written: int) -> None:
        log.append((head, written))
        add(head, written)

    q.add_used = add_used
    return log


def layout(size: int, descs: list[tuple[int, int, int, int]], heads: list[int], data: bytes = b"",
           cfg_bits: int = 0, flags: int = 0) -> bytes:
    """A seed: a well-formed queue image."""
    log2 = size.bit_length() - 2
    table = b"".join(_D.pack(*d) for d in descs).ljust(16 * size, b"\0")
    avail = struct.pack("<HH", flags, len(heads)) + b"".join(struct.pack("<H", h) for h in heads)
    avail = avail.ljust(6 + 2 * size, b"\0")
    return bytes([log2 | cfg_bits]) + table + avail + data

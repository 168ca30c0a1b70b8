"""Property tests: arbitrary guest-written rings never hurt the monitor.

Two generators write descriptor tables, indirect tables and available rings
into guest RAM, then a guest kick runs virtio-rng over them through the MMIO
transport (or `Virtqueue.pop` directly):

* `test_structured_rings_match_reference`: descriptors drawn from a mix of
  valid and hostile values.  An independent reference walker (a visited set
  instead of a step count, a recursive layout) predicts which chains are valid,
  which ring errors break the device, and which bytes may change.  The device
  must match it exactly: used elements, used idx, broken state, and no byte
  outside the writable segments of valid chains and the used ring changes.
* `test_random_bytes_never_escape`: the rings are raw random bytes.  Nothing
  raises, `pop` raises only the documented guest errors, used idx advances by
  exactly the number of chains completed, and nothing outside the segments the
  device was handed (and the used ring) is written.

The ring layout helpers are local so this file stands alone.
"""
from __future__ import annotations

import struct

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sealvm.core.addr import MiB, VIRTIO_MMIO_BASE
from sealvm.core.devices.virtio.chain import InvalidChainError, QueueBrokenError
from sealvm.core.devices.virtio.mmio import MmioTransport
from sealvm.core.devices.virtio.queue import Virtqueue
from sealvm.core.devices.virtio.rng import VirtioRng
from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.device import (VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
                                               VIRTIO_F_VERSION_1)
from sealvm.core.memory import GuestMemory

MEM = 2 * MiB
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
TABLES = (0x4000, 0x5000)            # indirect tables live here
DATA, DATA_LEN = 0x10000, 0x1000     # writable buffers of generated chains live here
MAX_REQ = 64 * 1024
NEXT, WRITE, INDIRECT = 1, 2, 4

SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _used_len(q: int) -> int:
    return 6 + 8 * q


# ---- a guest that follows the register protocol ------------------------------------------------
class Irq:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def bring_up(q: int, features: int, start: int, entropy=None):
    mem = GuestMemory.anonymous(MEM)
    irq = Irq()
    dev = VirtioRng(entropy or (lambda n: b"\x5a" * n), queue_size=16, max_request=MAX_REQ)
    t = MmioTransport(dev, mem, irq, name="virtio-rng@prop")
    w = lambda off, v: t.write(off, 4, v)  # noqa: E731
    w(M.REG_STATUS, 0)
    w(M.REG_STATUS, 3)
    for sel in (0, 1):
        w(M.REG_DRIVER_FEATURES_SEL, sel)
        w(M.REG_DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFF_FFFF)
    w(M.REG_STATUS, 3 | M.STATUS_FEATURES_OK)
    assert t.read(M.REG_STATUS, 4) & M.STATUS_FEATURES_OK
    w(M.REG_QUEUE_SEL, 0)
    w(M.REG_QUEUE_NUM, q)
    w(M.REG_QUEUE_DESC_LOW, DESC)
    w(M.REG_QUEUE_DRIVER_LOW, AVAIL)
    w(M.REG_QUEUE_DEVICE_LOW, USED)
    w(M.REG_QUEUE_READY, 1)
    w(M.REG_STATUS, 3 | M.STATUS_FEATURES_OK | M.STATUS_DRIVER_OK)
    vq = t.queues[0]
    assert vq.ready
    # A guest that has been running a while: both sides at `start`.
    vq.last_avail_idx = vq.used_idx = vq._avail_idx = vq._signalled_used = start
    mem.write_u16(USED + 2, start)
    return mem, irq, dev, t, vq


# ---- the independent reference --------------------------------------------------------------
class Bad(Exception):
    pass


def ref_chain(mem: bytes, q: int, head: int, indirect_ok: bool) -> list[tuple[int, int, bool]]:
    """Segments (addr, len, writable) of the chain at `head`, or raise Bad."""
    segs: list[tuple[int, int, bool]] = []
    state = {"writable": False, "total": 0}

    def walk(table: int, n: int, i: int, nested: bool) -> None:
        visited: set[int] = set()
        while True:
            if i >= n or i in visited:
                raise Bad
            visited.add(i)
            addr, ln, flags, nxt = struct.unpack_from("<QIHH", mem, table + 16 * i)
            if flags & INDIRECT:
                if nested or not indirect_ok or flags & NEXT or ln == 0 or ln % 16:
                    raise Bad
                if ln // 16 > 32768 or addr + ln > MEM:
                    raise Bad
                walk(addr, ln // 16, 0, True)
                return
            w = bool(flags & WRITE)
            if state["writable"] and not w:
                raise Bad
            state["writable"] |= w
            if ln:
                if addr + ln > MEM:
                    raise Bad
                state["total"] += ln
                if state["total"] > 0xFFFF_FFFF:
                    raise Bad
                segs.append((addr, ln, w))
            if not flags & NEXT:
                return
            i = nxt

    walk(DESC, q, head, False)
    return segs


def predict(mem: bytes, q: int, start: int, indirect_ok: bool):
    """(used elements, broken?, byte ranges the device may write)."""
    avail_idx = struct.unpack_from("<H", mem, AVAIL + 2)[0]
    pending = (avail_idx - start) & 0xFFFF
    if pending > q:
        return [], True, []
    used, ranges = [], []
    for k in range(pending):
        head = struct.unpack_from("<H", mem, AVAIL + 4 + 2 * ((start + k) % q))[0]
        if head >= q:
            return used, True, ranges
        try:
            segs = ref_chain(mem, q, head, indirect_ok)
        except Bad:
            used.append((head, 0))
            continue
        left = min(MAX_REQ, sum(ln for _, ln, w in segs if w))
        used.append((head, left))
        for addr, ln, w in segs:
            if w and left:
                ranges.append((addr, min(ln, left)))
                left -= min(ln, left)
    return used, False, ranges


# ---- strategies --------------------------------------------------------------------------
def mostly(good, bad, weight: int = 4):
    """`good` about weight/(weight+1) of the time, else `bad`."""
    return st.integers(0, weight).flatmap(lambda r: bad if r == weight else good)


def addresses():
    return st.one_of(
        st.integers(DATA, DATA + DATA_LEN - 1),                      # the buffer area
        st.integers(DATA, DATA + DATA_LEN - 1),
        st.sampled_from(TABLES),                                     # an indirect table
        st.sampled_from([MEM - 8, MEM, int(VIRTIO_MMIO_BASE), 0xC000_0000, 2**64 - 16]),
    )


@st.composite
def descriptors(draw, q: int):
    """Mostly well-formed descriptors (so valid chains are common), some hostile."""
    kind = draw(st.integers(0, 9))
    nxt = draw(mostly(st.integers(0, q - 1), st.integers(q, q + 2), 8))
    if kind <= 6:
        flags = draw(st.sampled_from([WRITE, WRITE | NEXT, WRITE, WRITE | NEXT, 0, NEXT]))
        return (draw(st.integers(DATA, DATA + DATA_LEN - 64)), draw(st.integers(0, 64)), flags, nxt)
    if kind == 7:
        flags = draw(st.sampled_from([INDIRECT, INDIRECT | WRITE, INDIRECT | NEXT]))
        return (draw(st.sampled_from(TABLES)), 16 * draw(st.integers(0, 6)), flags, nxt)
    lengths = st.sampled_from([16, 32, 48, 64, 24, 0, 1, 0xFFFF_FFFF, 0x10_0000])
    return (draw(addresses()), draw(lengths | st.integers(0, 64)),
            draw(st.integers(0, 7) | st.integers(0, 0xFFFF)), nxt)


@st.composite
def scenarios(draw):
    q = draw(st.sampled_from([1, 2, 4, 8, 16]))
    desc = draw(st.lists(descriptors(q), min_size=q, max_size=q))
    tables = [draw(st.lists(descriptors(q), min_size=0, max_size=6)) for _ in TABLES]
    start = draw(st.sampled_from([0, 1, 0xFFFF - q, 0xFFFE, 0xFFFF]))
    count = draw(mostly(st.integers(0, q), st.integers(q + 1, 0xFFFF), 6))
    ring = draw(st.lists(mostly(st.integers(0, q - 1), st.integers(q, 0xFFFF), 12),
                         min_size=q, max_size=q))
    features = VIRTIO_F_VERSION_1 | draw(st.sampled_from(
        [0, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC]))
    used_event = draw(st.integers(0, 0xFFFF))
    return q, desc, tables, start, count, ring, features, used_event


def write_rings(mem: GuestMemory, q, desc, tables, start, count, ring, used_event) -> None:
    for i, d in enumerate(desc):
        mem.write(DESC + 16 * i, struct.pack("<QIHH", *d))
    for base, entries in zip(TABLES, tables):
        for i, d in enumerate(entries):
            mem.write(base + 16 * i, struct.pack("<QIHH", *d))
    for i, h in enumerate(ring):
        mem.write_u16(AVAIL + 4 + 2 * i, h)
    mem.write_u16(AVAIL + 4 + 2 * q, used_event)
    mem.write_u16(AVAIL + 2, (start + count) & 0xFFFF)


def unchanged_outside(before: bytes, after: bytes, ranges) -> bool:
    patched = bytearray(before)
    for addr, ln in ranges:
        patched[addr:addr + ln] = after[addr:addr + ln]
    return bytes(patched) == after


@SETTINGS
@given(scenarios())
def test_structured_rings_match_reference(s) -> None:
    q, desc, tables, start, count, ring, features, used_event = s
    mem, irq, dev, t, vq = bring_up(q, features, start)
    write_rings(mem, q, desc, tables, start, count, ring, used_event)
    before = bytes(mem.view(0, MEM))
    used, broken, ranges = predict(before, q, start, bool(features & VIRTIO_F_INDIRECT_DESC))

    t.write(M.REG_QUEUE_NOTIFY, 4, 0)          # must not raise, must return

    event("device broken" if broken else "device live")
    event(f"completed chains: {'0' if not used else '1-2' if len(used) < 3 else '3+'}")
    if any(n for _, n in used):
        event("some chain filled")
    if any(n == 0 for _, n in used):
        event("some chain failed")
    if any(ln % 16 == 0 and ln and f & INDIRECT for _, ln, f, _n in desc) and any(n for _, n in used):
        event("indirect present, some chain filled")

    after = bytes(mem.view(0, MEM))
    assert t.broken == broken
    assert bool(t.status & M.STATUS_DEVICE_NEEDS_RESET) == broken
    assert mem.read_u16(USED + 2) == (start + len(used)) & 0xFFFF
    got = [struct.unpack_from("<II", after, USED + 4 + 8 * ((start + k) % q)) for k in range(len(used))]
    assert got == used
    assert unchanged_outside(before, after, ranges + [(USED, _used_len(q))])
    if not broken and not used:
        assert irq.calls == 0


@st.composite
def raw_scenarios(draw):
    """Raw bytes everywhere, with fields biased so that chains do get walked and served."""
    q = draw(st.sampled_from([2, 4, 8, 16]))
    raw_desc = st.tuples(
        mostly(st.integers(0, MEM - 1) | st.sampled_from(TABLES), st.integers(0, 2**64 - 1), 3),
        mostly(st.integers(0, 512), st.integers(0, 2**32 - 1), 3),
        mostly(st.integers(0, 7), st.integers(0, 0xFFFF), 3),
        mostly(st.integers(0, q - 1), st.integers(0, 0xFFFF), 3))
    desc = b"".join(struct.pack("<QIHH", *d)
                    for d in draw(st.lists(raw_desc, min_size=q, max_size=q)))
    table = b"".join(struct.pack("<QIHH", *d) for d in draw(st.lists(raw_desc, max_size=8)))
    table += draw(st.binary(max_size=15))
    start = draw(st.integers(0, 0xFFFF))
    count = draw(mostly(st.integers(0, q), st.integers(0, 0xFFFF)))
    ring = draw(st.lists(mostly(st.integers(0, q - 1), st.integers(0, 0xFFFF), 8),
                         min_size=q + 1, max_size=q + 1))
    avail = struct.pack("<HH", draw(st.integers(0, 0xFFFF)), (start + count) & 0xFFFF)
    avail += struct.pack(f"<{q + 1}H", *ring)
    features = VIRTIO_F_VERSION_1 | draw(st.sampled_from([0, VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC]))
    return q, desc, table, avail, start, features


@SETTINGS
@given(raw_scenarios(), st.booleans())
def test_random_bytes_never_escape(s, via_transport: bool) -> None:
    q, desc, table, avail, start, features = s
    mem, irq, dev, t, vq = bring_up(q, features, start)
    mem.write(DESC, desc)
    mem.write(TABLES[0], table)
    mem.write(AVAIL, avail)
    before = bytes(mem.view(0, MEM))

    handed: list = []
    completed = [0]
    real_add_used = vq.add_used

    def counting_add_used(head: int, written: int) -> None:
        completed[0] += 1
        real_add_used(head, written)

    vq.add_used = counting_add_used          # type: ignore[method-assign]
    real_handle = dev.handle_chain

    def recording_handle(i, chain):
        assert all(0 <= seg.gpa and seg.gpa + seg.length <= MEM for seg in chain.segments)
        handed.append(chain)
        return real_handle(i, chain)

    dev.handle_chain = recording_handle      # type: ignore[method-assign]

    if via_transport:
        t.write(M.REG_QUEUE_NOTIFY, 4, 0)
    else:
        for _ in range(2 * q + 2):
            try:
                chain = vq.pop()
            except InvalidChainError as e:
                assert 0 <= e.head < q
                vq.add_used(e.head, 0)
                continue
            except QueueBrokenError:
                break
            if chain is None:
                break
            handed.append(chain)
            vq.add_used(chain.head, real_handle(0, chain))

    event(f"handed {'0' if not handed else '1+'} chains; completed {'0' if not completed[0] else '1+'}")
    event("broken" if t.broken else "live")
    after = bytes(mem.view(0, MEM))
    assert mem.read_u16(USED + 2) == (start + completed[0]) & 0xFFFF
    assert completed[0] <= q
    ranges = [(int(seg.gpa), seg.length) for c in handed for seg in c.segments if seg.writable]
    assert unchanged_outside(before, after, ranges + [(USED, _used_len(q))])


@SETTINGS
@given(st.integers(0, 4), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_avail_idx_jump_is_exactly_the_broken_boundary(q_log: int, start: int, delta: int) -> None:
    q = 1 << q_log
    mem = GuestMemory.anonymous(MEM)
    vq = Virtqueue(16)
    vq.size = q
    vq.desc, vq.avail, vq.used = DESC, AVAIL, USED
    vq.activate(mem, event_idx=False, indirect=False)
    vq.last_avail_idx = vq._avail_idx = start
    mem.write_u16(AVAIL + 2, (start + delta) & 0xFFFF)
    try:
        vq.has_available()
        assert delta <= q
    except QueueBrokenError:
        assert delta > q

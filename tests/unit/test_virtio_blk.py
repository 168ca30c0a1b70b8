"""virtio-blk over a sealed disk, driven by the fake guest driver (no KVM).

Reads and writes (whole and partial blocks, many in flight, indirect tables), flush,
GET_ID, unsupported and malformed requests, and tampering: the guest gets IOERR for
that request, a report names the block and kind, the counter moves, and the device
keeps serving other requests.
"""
from __future__ import annotations

import struct

import pytest

from sealvm.core.devices.virtio import mmio as M
from sealvm.core.devices.virtio.blk import (MAX_REQUEST, S_IOERR, S_OK, S_UNSUPP, T_FLUSH,
                                            T_GET_ID, T_IN, T_OUT, VIRTIO_ID_BLOCK, VirtioBlk)
from sealvm.core.diskseal import SLOT, SealedDisk, format_disk
from sealvm.core.memory import GuestMemory
from tests.disk_faults import FaultFile
from tests.unit.test_virtio_fakedriver import (INDIRECT, MEM_SIZE, NEXT, WRITE, Counter,
                                               FakeDriver)

KEY = bytes(range(32))


@pytest.fixture
def env(request):
    f = FaultFile()
    format_disk(f, KEY, getattr(request, "param", 64))
    reports: list[str] = []
    dev = VirtioBlk(report=reports.append, serial=b"disk-serial")
    dev.open(SealedDisk(f, KEY))
    mem = GuestMemory.anonymous(MEM_SIZE)
    t = M.MmioTransport(dev, mem, Counter(), name="virtio-blk@test")
    drv = FakeDriver(t, mem, queue_size=64).init()
    return f, dev, drv, reports


def post(drv: FakeDriver, first: int, rtype: int, sector: int, data_len: int,
         payload: bytes = b"", *, indirect: bool = False) -> tuple[int, int]:
    """One request at descriptors first..first+2 (or one indirect table); returns (buf, status)."""
    hdr = drv.alloc(16)
    drv.mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    buf = drv.alloc(max(data_len, 1))
    if payload:
        drv.mem.write(buf, payload)
    st = drv.alloc(1)
    drv.mem.write(st, b"\xee")
    table = drv.alloc(48) if indirect else None
    base = 0 if indirect else first
    descs = [(hdr, 16, NEXT)]
    if data_len:
        descs.append((buf, data_len, NEXT | (WRITE if rtype in (T_IN, T_GET_ID) else 0)))
    descs.append((st, 1, WRITE))
    for i, (addr, length, flags) in enumerate(descs):
        drv.set_desc(base + i, addr, length, flags, base + i + 1 if flags & NEXT else 0, table=table)
    if indirect:
        drv.set_desc(first, table, 16 * len(descs), INDIRECT)
    drv.publish(first)
    return buf, st


def run(drv: FakeDriver) -> list[tuple[int, int]]:
    drv.kick()
    return drv.take_used()


def test_identity_and_config(env):
    _, dev, drv, _ = env
    assert drv.rd(M.REG_DEVICE_ID) == VIRTIO_ID_BLOCK
    capacity = drv.rd(M.REG_CONFIG) | drv.rd(M.REG_CONFIG + 4) << 32
    assert capacity == 64 * 8
    assert drv.rd(M.REG_CONFIG + 20) == 4096          # blk_size


@pytest.mark.parametrize("env", [512], indirect=True)
def test_the_largest_request_a_driver_may_build_is_served(env):
    """A driver limits a request only by size_max and seg_max (Linux: 1280 KiB by default
    otherwise); the largest request they allow, one page per segment, must be served."""
    _, dev, drv, _ = env
    size_max, seg_max = drv.rd(M.REG_CONFIG + 8), drv.rd(M.REG_CONFIG + 12)
    assert size_max * seg_max <= MAX_REQUEST
    n = size_max * seg_max // 4096
    data = bytes(i % 251 for i in range(n * 4096))
    for rtype, first in ((T_OUT, 0), (T_IN, 0)):
        hdr, st = drv.alloc(16), drv.alloc(1)
        drv.mem.write(hdr, struct.pack("<IIQ", rtype, 0, 0))
        pages = [drv.alloc(4096) for _ in range(n)]
        if rtype == T_OUT:
            for i, a in enumerate(pages):
                drv.mem.write(a, data[i * 4096:(i + 1) * 4096])
        table = drv.alloc(16 * (n + 2))
        descs = [(hdr, 16, NEXT)] + [(a, 4096, NEXT | (WRITE if rtype == T_IN else 0))
                                     for a in pages] + [(st, 1, WRITE)]
        for i, (addr, length, flags) in enumerate(descs):
            drv.set_desc(i, addr, length, flags, i + 1 if flags & NEXT else 0, table=table)
        drv.set_desc(first, table, 16 * len(descs), INDIRECT)
        drv.publish(first)
        run(drv)
        assert drv.mem.read(st, 1) == bytes([S_OK]), rtype
    assert b"".join(drv.mem.read(a, 4096) for a in pages) == data


def test_write_read_flush_and_get_id(env):
    f, dev, drv, _ = env
    data = bytes(range(256)) * 32                     # two blocks
    _, s1 = post(drv, 0, T_OUT, 8, 8192, data)
    _, s2 = post(drv, 3, T_FLUSH, 0, 0)
    buf, s3 = post(drv, 6, T_IN, 8, 8192)
    idb, s4 = post(drv, 9, T_GET_ID, 0, 20)
    used = run(drv)
    assert [h for h, _ in used] == [0, 3, 6, 9]
    assert [drv.mem.read(s, 1)[0] for s in (s1, s2, s3, s4)] == [S_OK] * 4
    assert drv.mem.read(buf, 8192) == data
    assert drv.mem.read(idb, 20) == b"disk-serial".ljust(20, b"\0")
    assert dict(used)[6] == 8192 + 1
    assert dev.disk.generation == 2 and data[:64] not in bytes(f.view)


def test_partial_block_write_keeps_the_rest(env):
    _, _, drv, _ = env
    post(drv, 0, T_OUT, 0, 4096, b"A" * 4096)
    post(drv, 3, T_OUT, 1, 512, b"B" * 512)           # sector 1 of block 0
    buf, st = post(drv, 6, T_IN, 0, 4096)
    run(drv)
    assert drv.mem.read(buf, 4096) == b"A" * 512 + b"B" * 512 + b"A" * 3072
    assert drv.mem.read(st, 1)[0] == S_OK


def test_many_in_flight_with_indirect_tables(env):
    _, _, drv, _ = env
    for i in range(16):
        post(drv, i, T_OUT, 8 * i, 4096, bytes([i]) * 4096, indirect=True)
    assert len(run(drv)) == 16
    bufs = [post(drv, i, T_IN, 8 * i, 4096, indirect=True) for i in range(16)]
    assert len(run(drv)) == 16
    for i, (buf, st) in enumerate(bufs):
        assert drv.mem.read(buf, 4096) == bytes([i]) * 4096 and drv.mem.read(st, 1)[0] == S_OK


def test_bad_requests_fail_alone(env):
    _, dev, drv, _ = env
    _, s1 = post(drv, 0, T_IN, 64 * 8, 4096)          # past the end
    _, s2 = post(drv, 3, T_IN, 0, 100)                # not whole sectors
    _, s3 = post(drv, 6, 99, 0, 0)                    # unknown type
    buf, s4 = post(drv, 9, T_IN, 0, 4096)
    run(drv)
    assert [drv.mem.read(s, 1)[0] for s in (s1, s2, s3, s4)] == [S_IOERR, S_IOERR, S_UNSUPP, S_OK]
    assert not dev.tampered and drv.mem.read(buf, 4096) == bytes(4096)


def test_tampered_block_gives_ioerr_report_and_counter_and_device_goes_on(env):
    f, dev, drv, reports = env
    post(drv, 0, T_OUT, 8 * 5, 4096, b"x" * 4096)
    post(drv, 3, T_OUT, 8 * 6, 4096, b"y" * 4096)
    run(drv)
    d = dev.disk
    at = d.layout.slot(5, d.entry(5)[3])
    f.view[at + 300] ^= 0x40
    _, bad = post(drv, 0, T_IN, 8 * 5, 4096)
    good_buf, good = post(drv, 3, T_IN, 8 * 6, 4096)
    run(drv)
    assert drv.mem.read(bad, 1)[0] == S_IOERR and drv.mem.read(good, 1)[0] == S_OK
    assert drv.mem.read(good_buf, 4096) == b"y" * 4096
    assert dev.tampered == 1 and not drv.t.broken
    assert len(reports) == 1 and "block 5" in reports[0] and "altered" in reports[0]
    # a swap is named as such
    a, b = d.layout.slot(6, d.entry(6)[3]), d.layout.slot(5, d.entry(5)[3])
    f.view[b:b + SLOT] = f.view[a:a + SLOT]
    _, st = post(drv, 0, T_IN, 8 * 5, 4096)
    run(drv)
    assert drv.mem.read(st, 1)[0] == S_IOERR and "swapped" in reports[-1]


def test_data_split_over_several_descriptors(env):
    _, _, drv, _ = env
    data = bytes(range(256)) * 32                     # 8 KiB in 3 pieces, header shares one
    hdr = drv.alloc(16 + 1000)
    drv.mem.write(hdr, struct.pack("<IIQ", T_OUT, 0, 16) + data[:1000])
    a, b = drv.alloc(3000), drv.alloc(8192 - 4000)
    drv.mem.write(a, data[1000:4000])
    drv.mem.write(b, data[4000:])
    st = drv.alloc(1)
    drv.set_desc(0, hdr, 1016, NEXT, 1)
    drv.set_desc(1, a, 3000, NEXT, 2)
    drv.set_desc(2, b, 8192 - 4000, NEXT, 3)
    drv.set_desc(3, st, 1, WRITE)
    drv.publish(0)
    run(drv)
    assert drv.mem.read(st, 1)[0] == S_OK
    hdr2 = drv.alloc(16)
    drv.mem.write(hdr2, struct.pack("<IIQ", T_IN, 0, 16))
    x, y = drv.alloc(5000), drv.alloc(8192 - 5000 + 1)      # the status shares the last one
    drv.set_desc(4, hdr2, 16, NEXT, 5)
    drv.set_desc(5, x, 5000, NEXT | WRITE, 6)
    drv.set_desc(6, y, 8192 - 5000 + 1, WRITE)
    drv.publish(4)
    run(drv)
    assert drv.mem.read(x, 5000) + drv.mem.read(y, 8192 - 5000) == data
    assert drv.mem.read(y + 8192 - 5000, 1)[0] == S_OK

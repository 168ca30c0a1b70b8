"""Sealed disk metadata and data slots from the host's file (sealvm/core/diskseal.py).

The host owns the disk file.  Input: patches {offset u24, length u8, bytes} applied to
a valid 16-block disk image, then an optional new file length; the core opens it (the
owner's last-seen generation as the minimum), reads every block, writes one, commits
and reopens.  Refusal: DiskError (DiskTamper included).  Whatever block reads back
must be exactly what was written: a host cannot make the core accept other contents.
"""
from __future__ import annotations

import struct

from fuzz.target import Violation
from fuzz.targets import _disk
from sealvm.core import diskseal as D

MODULES = ["sealvm.core.diskseal"]
EXPECTED = (D.DiskError,)
MAX_LEN = 2048
disk: _disk.Disk | None = None


def setup() -> None:
    global disk
    if disk is None:
        disk = _disk.Disk()


def patched(data: bytes) -> bytes:
    img = bytearray(disk.image)
    pos = 0
    if data[:1] == b"\xff" and len(data) >= 4:          # a new file length first
        n = int.from_bytes(data[1:4], "little") % (2 * len(img))
        img = img[:n] if n < len(img) else img + bytes(n - len(img))
        pos = 4
    while pos + 4 <= len(data):
        off = int.from_bytes(data[pos:pos + 3], "little")
        n = data[pos + 3]
        chunk = data[pos + 4:pos + 4 + n]
        pos += 4 + n
        if off < len(img):
            img[off:off + len(chunk)] = chunk[:len(img) - off]
    return bytes(img)


def _check_reads(d: D.SealedDisk, fresh: dict[int, bytes]) -> None:
    for b in range(d.blocks):
        try:
            got = d.read_block(b)
        except D.DiskTamper:
            continue
        want = fresh.get(b, _disk.content(b))
        if got != want:
            raise Violation(f"block {b} read back {got[:8].hex()}..., not what was written")


def one(data: bytes) -> None:
    disk.restore(patched(data))
    d = disk.open()
    if d.blocks != _disk.BLOCKS:
        raise Violation(f"disk opened with {d.blocks} blocks")
    _check_reads(d, {})
    new = bytes([0xEE]) * D.BLOCK
    d.write_block(7, new)
    d.flush()
    _check_reads(disk.open(), {7: new})


def seeds() -> list[bytes]:
    def p(off: int, data: bytes) -> bytes:
        return off.to_bytes(3, "little") + bytes([len(data)]) + data
    lay = D.Layout(_disk.BLOCKS)
    return [b"", p(0, b"\0"), p(lay.meta[0] + 8, struct.pack("<Q", 9)),
            p(lay.meta[1], b"X" * 8), p(lay.slot(2, 0) + 80, b"\1"),
            p(lay.meta[0] + D.PAGE + 36, b"\1"), b"\xff" + (1000).to_bytes(3, "little")]

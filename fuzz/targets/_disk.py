"""A small sealed disk in a memfd: 16 blocks, blocks 0-5 written with known contents."""
from __future__ import annotations

import os

from sealvm.core import diskseal as D

KEY = bytes(range(32))
BLOCKS = 16
WRITTEN = 6


def content(block: int) -> bytes:
    return bytes([block + 1]) * D.BLOCK if block < WRITTEN else D.ZERO_BLOCK


class Disk:
    def __init__(self) -> None:
        self.fd = os.memfd_create("fuzz-disk", os.MFD_CLOEXEC)
        self.io = D.FileIO(self.fd)
        D.format_disk(self.io, KEY, BLOCKS, disk_id=bytes(16))
        d = D.SealedDisk(self.io, KEY)
        d.write_blocks(0, b"".join(content(b) for b in range(WRITTEN)))
        d.flush()
        self.generation = d.generation
        self.image = os.pread(self.fd, self.io.size(), 0)

    def restore(self, image: bytes | None = None) -> None:
        img = self.image if image is None else image
        os.ftruncate(self.fd, len(img))
        self.io.pwrite(img, 0)

    def open(self) -> D.SealedDisk:
        return D.SealedDisk(self.io, KEY, min_generation=self.generation)

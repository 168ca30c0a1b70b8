"""virtio-blk over a sealed disk (VIRTIO 1.2 §5.2).

Device ID 2, one request queue.  Requests: IN (read), OUT (write), FLUSH, GET_ID;
anything else is answered UNSUPP.  A request is a chain {type u32, reserved u32,
sector u64} (device-readable), the data (readable for OUT, writable for IN), and a
one-byte status, the last device-writable byte.  Sectors are 512 bytes; the disk seals
4 KiB blocks (offered as VIRTIO_BLK_F_BLK_SIZE), so a request that covers part of a
block reads, patches and re-seals it.

The disk (`diskseal.SealedDisk`) is handed in by `open(disk)` once the key is known,
before the guest's first instruction.  Who is at fault:

* a malformed request (too short, not a whole sector, past the end): the guest's;
  status IOERR, logged as a guest error;
* data that fails its check (`DiskTamper`) or an I/O error on the host's file: the
  host's; status IOERR for that request only, a report naming the block and the kind of
  tampering (`report`, rate-limited), `tampered`/`io_errors` counted; the VM goes on.
"""
from __future__ import annotations

import logging
import struct
from typing import Callable

from ...diskseal import BLOCK, DiskError, DiskTamper, SealedDisk
from .chain import DescriptorChain
from .device import LogLimiter, VirtioDevice

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SECTOR = 512
MAX_REQUEST = 1 << 20           # bytes of data per request the device takes
# A driver bounds a request only by segments: at most SEG_MAX of at most SIZE_MAX bytes
# (Linux sends up to 1280 KiB otherwise), so their product must not exceed MAX_REQUEST.
SIZE_MAX, SEG_MAX = 4096, 254
ID_BYTES = 20

_HDR = struct.Struct("<IIQ")


class VirtioBlk(VirtioDevice):
    device_id = VIRTIO_ID_BLOCK
    features = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | \
        VIRTIO_BLK_F_FLUSH
    max_chain_bytes = MAX_REQUEST + 4096

    def __init__(self, *, name: str = "virtio-blk", queue_size: int = 256, serial: bytes = b"",
                 report: Callable[[str], None] = lambda message: None):
        super().__init__()
        self.name = name
        self.queue_max_sizes = (queue_size,)
        self.serial = serial[:ID_BYTES]
        self.disk: SealedDisk | None = None
        self._reports = LogLimiter(sink=lambda level, msg, *a: report(msg % a if a else msg))
        self.requests = self.tampered = self.io_errors = 0

    def open(self, disk: SealedDisk) -> None:
        self.disk = disk

    @property
    def config(self) -> bytes:
        sectors = self.disk.blocks * (BLOCK // SECTOR) if self.disk else 0
        # capacity, size_max, seg_max, geometry (unused), blk_size
        return struct.pack("<QIIIII", sectors, SIZE_MAX, SEG_MAX, 0, BLOCK, 0)

    # ---- requests -------------------------------------------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        self.requests += 1
        mem = chain.memory
        readable = [s for s in chain.segments if not s.writable]
        writable = [s for s in chain.segments if s.writable]
        if not writable:
            self.log_guest_error(f"request at head {chain.head} has no status byte")
            return 0
        status_at = writable[-1].gpa + writable[-1].length - 1
        space = sum(s.length for s in writable) - 1
        rlen = sum(s.length for s in readable)
        if rlen < _HDR.size or self.disk is None:
            self.log_guest_error(f"request at head {chain.head} has no 16-byte header")
            mem.write(status_at, bytes([S_IOERR]))
            return 1
        rtype, _, sector = _HDR.unpack(_region(mem, readable, 0, _HDR.size))
        written, status = 0, S_OK
        try:
            if rtype == T_IN:
                r = self._range(sector, space, chain.head)
                if r is None:
                    status = S_IOERR
                else:
                    written = self._read(*r, mem, writable)
            elif rtype == T_OUT:
                r = self._range(sector, rlen - _HDR.size, chain.head)
                if r is None:
                    status = S_IOERR
                else:
                    self._write(*r, _region(mem, readable, _HDR.size, rlen - _HDR.size))
            elif rtype == T_FLUSH:
                self.disk.flush()
            elif rtype == T_GET_ID:
                written = _scatter(mem, writable, self.serial.ljust(ID_BYTES, b"\0")[:space])
            else:
                status = S_UNSUPP
        except DiskTamper as e:
            status = S_IOERR
            self.tampered += 1
            self._reports.log(logging.ERROR, "%s: TAMPERING DETECTED: %s; request failed", self.name, e)
        except (OSError, DiskError) as e:
            status = S_IOERR
            self.io_errors += 1
            self._reports.log(logging.ERROR, "%s: host storage error: %s; request failed", self.name, e)
        mem.write(status_at, bytes([status]))
        return written + 1

    def _range(self, sector: int, length: int, head: int) -> tuple[int, int] | None:
        """(byte offset, length) of a request that is whole sectors inside the disk."""
        off = sector * SECTOR
        if length % SECTOR or length > MAX_REQUEST or off + length > self.disk.blocks * BLOCK:
            self.log_guest_error(f"request at head {head}: {length} bytes at sector {sector} "
                                 "is not whole sectors inside the disk")
            return None
        return off, length

    def _read(self, off: int, n: int, mem, writable) -> int:
        """Blocks covering [off, off+n) into the writable segments; returns n."""
        first, last = off // BLOCK, (off + n + BLOCK - 1) // BLOCK
        dest = _region(mem, writable, 0, n, view_only=True)
        blocks = self.disk.read_blocks(first, last - first)
        if dest is not None and off % BLOCK == 0 and n % BLOCK == 0:
            for i, data in enumerate(blocks):             # straight into guest RAM
                dest[i * BLOCK:(i + 1) * BLOCK] = data
            return n
        buf = b"".join(blocks)
        skip = off - first * BLOCK
        return _scatter(mem, writable, buf[skip:skip + n])

    def _write(self, off: int, n: int, data) -> None:
        if off % BLOCK == 0 and n % BLOCK == 0:
            if n:
                self.disk.write_blocks(off // BLOCK, data)
            return
        pos = 0
        while pos < n:
            b, within = divmod(off + pos, BLOCK)
            take = min(BLOCK - within, n - pos)
            if take == BLOCK:
                block = data[pos:pos + BLOCK]
            else:                        # part of a block: read, patch, re-seal
                block = bytearray(self.disk.read_block(b))
                block[within:within + take] = data[pos:pos + take]
            self.disk.write_block(b, block)
            pos += take


def _region(mem, segments, skip: int, n: int, *, view_only: bool = False):
    """Bytes [skip, skip+n) of the segments joined: a view of guest RAM when they lie in
    one segment (no copy), else a copy (or None with `view_only`)."""
    at = skip
    for s in segments:
        if at < s.length:
            if at + n <= s.length:
                return (mem.writable_view if view_only else mem.view)(s.gpa + at, n)
            break
        at -= s.length
    if view_only:
        return None
    return b"".join(mem.read(s.gpa, s.length) for s in segments)[skip:skip + n]


def _scatter(mem, segments, data: bytes) -> int:
    """Copy `data` into the writable segments in order (the status byte stays last)."""
    done = 0
    for s in segments:
        if done == len(data):
            break
        n = min(s.length, len(data) - done)
        mem.write(s.gpa, data[done:done + n])
        done += n
    return done

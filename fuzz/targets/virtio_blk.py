"""virtio-blk requests from the guest (sealvm/core/devices/virtio/blk.py) over a real sealed disk.

Chains in guest RAM as for the virtqueue target; their buffers hold the 16-byte
request header {type, reserved, sector}, data, and the status byte.  The device serves
them against a 16-block SealedDisk in a memfd (restored before each input).
Refusal: VirtioGuestError (a broken ring); a bad request is answered IOERR/UNSUPP.
The device must not report tampering or I/O errors (the host did nothing wrong here),
and every used length stays within the chain's writable space.
"""
from __future__ import annotations

from fuzz.target import Violation
from fuzz.targets import _disk, _virtio as V
from sealvm.core.devices.virtio.blk import VirtioBlk
from sealvm.core.devices.virtio.chain import VirtioGuestError

MODULES = ["sealvm.core.devices.virtio.blk", "sealvm.core.devices.virtio.device",
           "sealvm.core.diskseal"]
EXPECTED = (VirtioGuestError,)
disk: _disk.Disk | None = None


def setup() -> None:
    global disk
    V.setup()
    if disk is None:
        disk = _disk.Disk()


def one(data: bytes) -> None:
    dev = VirtioBlk(queue_size=16, serial=b"fuzz-serial")
    dev.log_guest_error = lambda message: None
    disk.restore()
    dev.open(disk.open())
    q = V.queue_from(data, max_size=16, max_chain_bytes=VirtioBlk.max_chain_bytes)
    done = dev.process(0, q)
    if done > q.size:
        raise Violation(f"{done} chains in one pass of a {q.size}-entry queue")
    if dev.tampered or dev.io_errors:
        raise Violation(f"a guest request looked like host tampering ({dev.tampered}) "
                        f"or an I/O error ({dev.io_errors})")


def _req(rtype: int, sector: int) -> bytes:
    return V.struct.pack("<IIQ", rtype, 0, sector)


def seeds() -> list[bytes]:
    d = V.DATA
    hdr = 0x100
    out = []
    for rtype, sector, dlen, dflag in ((0, 0, 4096, 2), (0, 3, 512, 2), (1, 8, 4096, 0),
                                       (1, 1, 1024, 0), (4, 0, 0, 0), (8, 0, 20, 2), (9, 0, 0, 0)):
        descs = [(d + hdr, 16, 1, 1)]
        if dlen:
            descs.append((d + 0x1000, dlen, dflag | 1, 2))
        descs.append((d + 0x200, 1, 2, 0))
        data = bytes(hdr) + _req(rtype, sector)
        out.append(V.layout(4, descs, [0], data=data))
    return out

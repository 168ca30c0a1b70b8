"""virtio-net transmit and receive chains from the guest (sealvm/core/devices/virtio/net.py).

Chains in guest RAM as for the virtqueue target; bit 0x40 of the first byte selects the
receive queue (the device fills the guest's buffers with waiting frames) instead of the
transmit queue (the device reads {virtio_net_hdr, frame} and seals the frame into the
tunnel, whose session is up with an in-memory peer).  Refusal: VirtioGuestError.
Every frame that leaves is at most MAX_FRAME bytes and opens at the peer; a receive
buffer never gets more than its writable length.
"""
from __future__ import annotations

import socket

from fuzz.target import Violation
from fuzz.targets import _virtio as V
from sealvm.core.devices.virtio import net as N
from sealvm.core.devices.virtio.chain import VirtioGuestError
from sealvm.core.net_tunnel import Tunnel

MODULES = ["sealvm.core.devices.virtio.net", "sealvm.core.devices.virtio.device"]
EXPECTED = (VirtioGuestError,)
KEY = bytes(32)
dev: N.VirtioNet | None = None
peer: Tunnel | None = None
wire: socket.socket | None = None


def setup() -> None:
    global dev, peer, wire
    V.setup()
    link, wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link.setblocking(False)
    wire.setblocking(False)
    dev = N.VirtioNet(link, lambda: KEY, b"\x02\0\0\0\0\1", queue_size=16)
    dev.log_guest_error = lambda message: None
    dev.tunnel, peer = Tunnel(KEY, initiator=True), Tunnel(KEY, initiator=False)
    _, resp = peer.receive(dev.tunnel.initiate())
    _, confirm = dev.tunnel.receive(resp)
    peer.receive(confirm)


def _drain() -> list[bytes]:
    out = []
    while True:
        try:
            out.append(wire.recv(65536))
        except BlockingIOError:
            return out


def one(data: bytes) -> None:
    rx = bool(data[:1] and data[0] & 0x40)
    q = V.queue_from(data, max_size=16)
    if rx:
        dev.rx_frames.clear()
        dev.rx_frames.extend([b"\x11" * 60, b"\x22" * N.MAX_FRAME, b"\x33" * (len(data) % 200)])
        used = V.record_used(q)
        dev.process(N.RX, q)
        for head, n in used:
            if n > N.HDR_LEN + N.MAX_FRAME:
                raise Violation(f"receive buffer at head {head} given {n} bytes")
        return
    dev.process(N.TX, q)
    dev.tx_waiting.clear()
    for dgram in _drain():
        frame, _ = peer.receive(dgram)
        if frame is None or len(frame) > N.MAX_FRAME:
            raise Violation(f"sent a datagram the peer refuses or an oversized frame "
                            f"({len(frame) if frame else None} bytes)")


def seeds() -> list[bytes]:
    d = V.DATA
    frame = bytes(12) + b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"E" * 46
    return [
        V.layout(4, [(d, len(frame), 0, 0)], [0], data=frame),
        V.layout(4, [(d, 12, 1, 1), (d + 12, len(frame) - 12, 0, 0)], [0], data=frame),
        V.layout(4, [(d, 1600, 2, 0), (d + 2048, 100, 2, 0)], [0, 1], cfg_bits=0x40),
        V.layout(4, [(d, 1600, 0, 0)], [0]),
    ]

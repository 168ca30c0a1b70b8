"""virtio-net: the guest's network card, every frame sealed into the owner's tunnel.

Device ID 1 (VIRTIO 1.2 §5.1), queue 0 = receiveq, queue 1 = transmitq.
Offered features, each honest about what the device does:

* VIRTIO_NET_F_MAC: the MAC address in configuration space;
* VIRTIO_NET_F_STATUS: link status (always up);
* VIRTIO_NET_F_MTU: 1420, so a full frame plus the tunnel's 32 bytes and the
  outer IPv4/UDP headers fit a 1500-byte path without fragmenting.

Not offered: checksum offload (CSUM / GUEST_CSUM: the device never computes or
checks a checksum, so the guest must send complete ones and gets frames as the
gateway sent them), segmentation offloads (no TSO/UFO: a frame is at most the
MTU), and mergeable receive buffers (MRG_RXBUF: they save guest memory for
64 KiB GSO frames; with a 1434-byte frame limit every receive buffer of 1446
bytes holds one whole frame, so the header's num_buffers is always 1).

The frames themselves go through a capability handed in: `link`, a connected
datagram socket to the host, on which only sealed tunnel datagrams travel.
The device seals and opens them with `Tunnel` (core/net_tunnel.py); the key is
fetched from `key()` at start (the owner's attested "net" key).
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections import deque
from typing import Callable

from ...net_tunnel import Tunnel, self_test
from .chain import DescriptorChain
from .device import VirtioDevice
from .queue import Virtqueue

VIRTIO_ID_NET = 1
VIRTIO_NET_F_MTU, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS = 1 << 3, 1 << 5, 1 << 16
VIRTIO_NET_S_LINK_UP = 1
HDR_LEN = 12                      # struct virtio_net_hdr with num_buffers (VERSION_1)
MTU = 1420
MAX_FRAME = MTU + 14
RX_BACKLOG = 256                  # frames held while the guest has no receive buffer
TX_BACKLOG = 64                   # frames held while no session is up yet
RX, TX = 0, 1
VIRTQ_USED_F_NO_NOTIFY = 1

log = logging.getLogger("sealvm.virtio")


class VirtioNet(VirtioDevice):
    device_id = VIRTIO_ID_NET
    features = VIRTIO_NET_F_MTU | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS

    def __init__(self, link: socket.socket, key: Callable[[], bytes], mac: bytes, *,
                 report: Callable[[str], None] = lambda m: None,
                 tunnel_options: dict | None = None, queue_size: int = 256):
        super().__init__()
        self.name = "virtio-net"
        self.queue_max_sizes = (queue_size, queue_size)
        self.link = link
        self.mac = bytes(mac)
        self._key = key
        self._report = report
        self._options = tunnel_options or {}
        self.tunnel: Tunnel | None = None
        self.rx_frames: deque[bytes] = deque()
        self.tx_waiting: deque[bytes] = deque()
        self.stats = dict(rx_backlog_drop=0, tx_too_big=0, tx_nosession=0, rx_too_big=0,
                          link_errors=0)
        self._deliver: Callable[[], None] = lambda: None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._reported = ""
        self_test()

    @property
    def config(self) -> bytes:
        return self.mac + struct.pack("<HHH", VIRTIO_NET_S_LINK_UP, 1, MTU)

    # ---- transmit (queue 1, on its ioeventfd worker) ---------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index != TX:
            return 0
        data = bytearray()
        for seg in chain.segments:
            if seg.writable:
                break
            if len(data) + seg.length > HDR_LEN + MAX_FRAME:
                self.stats["tx_too_big"] += 1
                return 0
            data += chain.memory.read(seg.gpa, seg.length)
        if len(data) <= HDR_LEN:
            self.log_guest_error(f"transmit chain at head {chain.head} carries no frame")
            return 0
        self.send_frame(bytes(data[HDR_LEN:]))
        return 0

    def send_frame(self, frame: bytes) -> None:
        t = self.tunnel
        dgram = t.seal(frame) if t is not None else None
        if dgram is None:
            if len(self.tx_waiting) >= TX_BACKLOG:
                self.stats["tx_nosession"] += 1
                return
            self.tx_waiting.append(frame)
            return
        self._send(dgram)

    def _send(self, dgram: bytes) -> None:
        try:
            self.link.send(dgram)
        except OSError:   # the host's relay is gone or full: the frame is lost, as on a wire
            self.stats["link_errors"] += 1

    # ---- receive (queue 0) -----------------------------------------------------
    def process(self, queue_index: int, queue: Virtqueue) -> int:
        if queue_index == TX:
            return super().process(queue_index, queue)
        done = 0
        while self.rx_frames and done < queue.size:
            chain = queue.pop()
            if chain is None:
                break
            frame = self.rx_frames.popleft()
            if chain.writable_len < HDR_LEN + len(frame):
                self.stats["rx_too_big"] += 1
                self.log_guest_error(f"receive buffer at head {chain.head} too small")
                queue.add_used(chain.head, 0)
            else:
                hdr = bytes(10) + (1).to_bytes(2, "little")      # num_buffers = 1
                queue.add_used(chain.head, chain.write(hdr + frame))
            done += 1
        if not queue.event_idx:
            # Receive buffers are only wanted while frames wait: spare the driver's
            # QueueNotify (and us a worker wake-up) when none do (VIRTIO 1.2 2.7.10).
            queue._mem.write_u16(queue.used, VIRTQ_USED_F_NO_NOTIFY if not self.rx_frames else 0)
        return done

    def has_work(self, queue_index: int) -> bool:
        return queue_index == TX or bool(self.rx_frames)

    # ---- the link thread: receive datagrams, run handshakes and rekeys ----------
    def start(self, deliver: Callable[[], None]) -> None:
        """Open the tunnel with the owner's key; `deliver()` serves the receive queue."""
        self._deliver = deliver
        self.tunnel = Tunnel(self._key(), initiator=True, **self._options)
        self.link.settimeout(0.25)
        self._thread = threading.Thread(target=self._main, name="virtio-net-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.link.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.link.close()

    def _main(self) -> None:
        t = self.tunnel
        last_report = time.monotonic()
        while not self._stop.is_set():
            if t.needs_handshake():
                self._send(t.initiate())
            try:
                dgram = self.link.recv(65536)
            except TimeoutError:
                dgram = None
            except OSError:
                return
            if dgram == b"":                  # an empty datagram, or the host hung up
                self._stop.wait(0.1)
                continue
            if dgram:
                had = t.current
                frame, reply = t.receive(dgram)
                if reply is not None:
                    self._send(reply)
                if t.current is not had:
                    self._flush_waiting()
                if frame is not None:
                    if len(self.rx_frames) >= RX_BACKLOG:
                        self.stats["rx_backlog_drop"] += 1
                    else:
                        self.rx_frames.append(frame)
                        self._deliver()
            now = time.monotonic()
            if now - last_report >= 1.0:
                last_report = now
                self._report_counters()

    def _flush_waiting(self) -> None:
        while self.tx_waiting:
            self.send_frame(self.tx_waiting.popleft())

    def _report_counters(self) -> None:
        s = {**self.tunnel.stats, **self.stats}
        text = "net: " + " ".join(f"{k}={v}" for k, v in s.items())
        line = " ".join(f"{k}={v}" for k, v in s.items() if k.startswith("drop") or k == "handshakes")
        if line != self._reported:          # only when a drop or a handshake happened
            self._reported = line
            self._report(text)

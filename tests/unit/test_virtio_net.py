"""virtio-net (core/devices/virtio/net.py) driven by the fake driver, the test playing the gateway."""
from __future__ import annotations

import socket
import time

import pytest

from sealvm.core.devices.virtio.mmio import MmioTransport
from sealvm.core.devices.virtio.net import (HDR_LEN, MAX_FRAME, MTU, VIRTIO_NET_F_MAC,
                                            VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VirtioNet)
from sealvm.core.memory import GuestMemory
from sealvm.core.net_tunnel import Tunnel
from tests.unit.test_virtio_fakedriver import MEM_SIZE, NEXT, Counter, FakeDriver
from sealvm.core.devices.virtio import mmio as M

MAC = bytes.fromhex("025345414c01")
KEY = bytes(range(32))


class Rig:
    def __init__(self):
        self.mem = GuestMemory.anonymous(MEM_SIZE)
        self.core_end, self.gw_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.dev = VirtioNet(self.core_end, lambda: KEY, MAC, queue_size=8)
        self.t = MmioTransport(self.dev, self.mem, Counter(), name="virtio-net@test")
        self.rx = FakeDriver(self.t, self.mem, queue_size=8)
        self.tx = FakeDriver(self.t, self.mem, queue_size=8, desc=0x40000, avail=0x50000,
                             used=0x60000)
        self.tx._bump = 0x200000
        assert self.rx.negotiate()
        self.rx.setup_queue(0)
        self.tx.setup_queue(1)
        self.rx.driver_ok()
        self.gw = Tunnel(KEY, initiator=False)
        self.dev.start(lambda: self.t.process_queue(0))
        self.gw_end.settimeout(3)
        _, resp = self.gw.receive(self.gw_end.recv(65536))      # the core's INIT
        self.gw_end.send(resp)
        self.gw.receive(self.gw_end.recv(65536))                # its keepalive

    def send_frame(self, frame: bytes, split: int = 5) -> None:
        data = bytes(HDR_LEN) + frame
        a, b = self.tx.alloc(split), self.tx.alloc(len(data) - split)
        self.mem.write(a, data[:split])
        self.mem.write(b, data[split:])
        self.tx.set_desc(0, a, split, NEXT, 1)
        self.tx.set_desc(1, b, len(data) - split)
        self.tx.publish(0)
        self.tx.kick(1)

    def close(self):
        self.dev.stop()
        self.gw_end.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_features_and_config_say_what_the_device_does(rig):
    f = rig.rx.device_features()
    assert f & (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU) == \
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU
    assert not f & (1 << 0 | 1 << 1 | 1 << 11 | 1 << 15)   # CSUM, GUEST_CSUM, HOST_TSO4, MRG_RXBUF
    cfg = bytes(rig.t.read(M.REG_CONFIG + i, 1) for i in range(12))
    assert cfg[:6] == MAC and cfg[6:8] == b"\x01\x00" and int.from_bytes(cfg[10:12], "little") == MTU


def test_a_transmitted_frame_leaves_sealed_and_the_gateway_opens_it(rig):
    frame = b"\xff" * 6 + MAC + b"\x08\x00" + b"secret payload " * 10
    rig.send_frame(frame)
    d = rig.gw_end.recv(65536)
    assert b"secret payload" not in d
    assert rig.gw.receive(d) == (frame, None)
    assert rig.tx.take_used() == [(0, 0)]


def test_an_oversized_frame_is_dropped_and_counted(rig):
    rig.send_frame(bytes(MAX_FRAME + 1))
    rig.gw_end.settimeout(0.3)
    with pytest.raises(TimeoutError):
        rig.gw_end.recv(65536)
    assert rig.dev.stats["tx_too_big"] == 1


def test_a_received_frame_fills_one_buffer_with_the_header(rig):
    buf = rig.rx.request(2048)
    frame = MAC + b"\x0a" * 6 + b"\x08\x06" + b"arp" * 10
    rig.gw_end.send(rig.gw.seal(frame))
    end = time.monotonic() + 3
    while not (used := rig.rx.take_used()):
        assert time.monotonic() < end, "frame never delivered"
        time.sleep(0.01)
    assert used == [(0, HDR_LEN + len(frame))]
    got = rig.mem.read(buf, HDR_LEN + len(frame))
    assert got[:HDR_LEN] == bytes(10) + b"\x01\x00" and got[HDR_LEN:] == frame


def test_a_buffer_too_small_gets_nothing_and_is_counted(rig):
    rig.rx.request(HDR_LEN + 10)
    rig.gw_end.send(rig.gw.seal(bytes(100)))
    end = time.monotonic() + 3
    while not (used := rig.rx.take_used()):
        assert time.monotonic() < end
        time.sleep(0.01)
    assert used == [(0, 0)] and rig.dev.stats["rx_too_big"] == 1


def test_forged_datagrams_never_reach_the_guest(rig):
    rig.rx.request(2048)
    good = bytearray(rig.gw.seal(b"x" * 60))
    good[-1] ^= 1
    rig.gw_end.send(bytes(good))
    time.sleep(0.3)
    assert rig.rx.take_used() == [] and rig.dev.tunnel.stats["drop_auth"] == 1

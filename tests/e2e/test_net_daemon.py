"""A networked VM through the host daemon's API: `net` on create, the daemon relays.

The test plays the owner's gateway with the tunnel's responder on a loopback
UDP port (no TAP, no namespaces): it answers the core's handshake, then sends
the guest an ARP request and a UDP datagram inside sealed frames, and gets the
ARP reply and the echo back.  The daemon's cores get the tunnel key through the
test-mode switch (no broker here).
"""
from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
from pathlib import Path

import pytest

from sealvm.core.net_tunnel import Tunnel
from tests.conftest import HAVE_KVM, environ, guest_image
from tests.e2e.conftest import Hostd

pytestmark = pytest.mark.skipif(not HAVE_KVM or os.geteuid() != 0, reason="needs /dev/kvm and root")

GUEST_MAC = bytes.fromhex("025345414c01")
OWNER_MAC = bytes.fromhex("0a0000000001")
OWNER_IP, GUEST_IP = socket.inet_aton("10.77.0.1"), socket.inet_aton("10.77.0.2")


def _csum(b: bytes) -> int:
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack(f">{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def arp_request() -> bytes:
    return (b"\xff" * 6 + OWNER_MAC + b"\x08\x06" + struct.pack(">HHBBH", 1, 0x800, 6, 4, 1)
            + OWNER_MAC + OWNER_IP + bytes(6) + GUEST_IP)


def udp_frame(payload: bytes, dport: int = 7) -> bytes:
    udp = struct.pack(">HHHH", 40000, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, OWNER_IP, GUEST_IP)
    ip = ip[:10] + struct.pack(">H", _csum(ip)) + ip[12:]
    return GUEST_MAC + OWNER_MAC + b"\x08\x00" + ip + udp


class LoopbackGateway:
    def __init__(self, key: bytes):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.tunnel = Tunnel(key, initiator=False)
        self.peer = None

    def frames(self, timeout: float):
        """Frames from the guest until `timeout` passes without one (answers handshakes)."""
        self.sock.settimeout(timeout)
        while True:
            try:
                d, self.peer = self.sock.recvfrom(65536)
            except TimeoutError:
                return
            frame, reply = self.tunnel.receive(d)
            if reply is not None:
                self.sock.sendto(reply, self.peer)
            if frame is not None:
                yield frame

    def send(self, frame: bytes) -> None:
        self.sock.sendto(self.tunnel.seal(frame), self.peer)


@pytest.fixture
def netd(tmp_path):
    key = os.urandom(32)
    base = Path(tempfile.mkdtemp(prefix="sealvm-netd-", dir="/tmp"))
    os.chmod(base, 0o755)
    with environ(SEALVM_TEST_MODE="1", SEALVM_TEST_NET_KEY=key.hex()):
        h = Hostd(base, "64650-64699")
    yield h, LoopbackGateway(key)
    h.close()


@pytest.mark.parametrize("direct", [False, True], ids=["relayed", "direct"])
def test_daemon_vm_with_net_answers_arp_and_udp_through_the_tunnel(netd, direct):
    hostd, gw = netd
    with hostd.api() as api:
        r = api.post("/v1/vms", json={"image": str(guest_image("netecho")), "name": "net1",
                                      "memory_mib": 64, "cmdline": "secs=30", "start": True,
                                      "net": f"127.0.0.1:{gw.port}", "net_direct": direct})
        assert r.status_code == 201, r.text
        assert r.json()["net"] == f"127.0.0.1:{gw.port}" and r.json()["net_direct"] is direct
        end = time.monotonic() + 20
        while gw.tunnel.current is None:              # handshake + the core's confirmation
            assert time.monotonic() < end, "no handshake from the core"
            for _ in gw.frames(0.2):
                pass
        time.sleep(0.5)                               # the guest's driver is up
        gw.send(arp_request())
        got = list(gw.frames(1.5))
        assert any(f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == GUEST_IP
                   for f in got), got
        gw.send(udp_frame(b"through the daemon"))
        got = list(gw.frames(1.5))
        assert any(f.endswith(b"through the daemon") for f in got), got
        assert api.delete("/v1/vms/net1").status_code == 204


def test_a_bad_gateway_address_is_refused(netd):
    hostd, _ = netd
    with hostd.api() as api:
        r = api.post("/v1/vms", json={"image": str(guest_image("netecho")), "name": "net2",
                                      "net": "no-port-here"})
        assert r.status_code == 400 and "GATEWAY_HOST:PORT" in r.text

"""Two network namespaces joined by a veth pair, for the sealed-network tests.

    owner namespace (gw):  veth 10.99.0.1/24, the gateway, TAP 10.77.0.1/24 (the VM's LAN)
    host namespace (host): veth 10.99.0.2/24, the host's relay (and the capture)

`in_netns(ns, fn)` runs fn on a thread that has joined namespace `ns`, so the
sockets and TAP devices it creates live there (setns affects only that thread).
Needs root and `ip`; `netlab_or_skip()` says why not.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
import time

CLONE_NEWNET = 0x4000_0000
GW_VETH, HOST_VETH = "10.99.0.1", "10.99.0.2"
GW_LAN, GUEST_IP = "10.77.0.1", "10.77.0.2"
GATEWAY_PORT = 51820
_libc = ctypes.CDLL(None, use_errno=True)


def netlab_or_skip() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not shutil.which("ip"):
        return "needs iproute2 (make apt)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class NetLab:
    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.gw, self.host = f"svgw{tag}", f"svho{tag}"
        self.gw_if, self.host_if = f"svg{tag}", f"svh{tag}"

    def __enter__(self) -> "NetLab":
        self.close()
        _ip("netns", "add", self.gw)
        _ip("netns", "add", self.host)
        for ns in (self.gw, self.host):   # no IPv6 chatter (router and neighbour solicitations)
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                            "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True)
        _ip("link", "add", self.host_if, "netns", self.host, "type", "veth",
            "peer", "name", self.gw_if, "netns", self.gw)
        for ns, ifname, addr in ((self.gw, self.gw_if, GW_VETH), (self.host, self.host_if, HOST_VETH)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in (self.gw, self.host):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def exec(self, ns: str) -> list[str]:
        return ["ip", "netns", "exec", ns]

    def up_tap(self, name: str = "svtap0", addr: str = f"{GW_LAN}/24") -> None:
        _ip("-n", self.gw, "addr", "add", addr, "dev", name)
        _ip("-n", self.gw, "link", "set", name, "up")


def in_netns(ns: str, fn):
    """fn() on a thread inside namespace `ns`; its result (or exception) comes back."""
    out: dict = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as e:   # handed back to the caller
            out["error"] = e
    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def udp_socket(ns: str, bind: tuple[str, int] = ("0.0.0.0", 0)) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(bind)
        return s
    return in_netns(ns, make)


class Capture:
    """Every frame seen on interface `ifname` of namespace `ns` (an AF_PACKET raw socket);
    ns None: this namespace; ifname None: every interface."""

    def __init__(self, ns: str | None, ifname: str | None):
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            if ifname:
                s.bind((ifname, 0))
            return s
        self.sock = in_netns(ns, make) if ns else make()
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.frames.append(self.sock.recv(65536))
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> bytes:
        self._stop = True
        self._t.join(2)
        self.sock.close()
        return b"".join(self.frames)


def echo(sock: socket.socket, payload: bytes, port: int = 7, timeout: float = 1.0,
         tries: int = 1, first: bool = False) -> list[bytes]:
    """Send `payload` to the guest's UDP echo port; every reply that arrives in `timeout`
    (only the first one with `first`)."""
    sock.settimeout(0.05)
    for _ in range(tries):
        sock.sendto(payload, (GUEST_IP, port))
    got = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            got.append(sock.recv(65536))
            if first:
                break
        except TimeoutError:
            continue
    return got

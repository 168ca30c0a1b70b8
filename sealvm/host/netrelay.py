"""The host's half of a VM's network: move sealed datagrams between the core and the gateway.

The core holds one end of a SOCK_SEQPACKET socketpair (handed over with
ATTACH kind NET); this relay holds the other end and a UDP socket connected
to the owner's gateway.  Every datagram is copied as it is, in both
directions: they are sealed inside the core, so the host can count, delay or
drop them but cannot read, alter or replay them unnoticed.

`tamper`, if given, sees each datagram (direction "out" = core to gateway,
"in" = gateway to core) and returns the list of datagrams to pass on instead:
the security tests use it to play a malicious host.
"""
from __future__ import annotations

import socket
import threading
from typing import Callable

Tamper = Callable[[str, bytes], list[bytes]]


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port); ValueError with a clear message otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--net wants GATEWAY_HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


class Relay:
    def __init__(self, gateway: tuple[str, int], *, tamper: Tamper | None = None,
                 udp: socket.socket | None = None):
        self.core_end, self.core_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            info = socket.getaddrinfo(gateway[0], gateway[1], type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve the gateway {gateway[0]}: {e}") from None
        self.udp = udp or socket.socket(info[0], socket.SOCK_DGRAM)
        self.udp.connect(info[4])
        self.tamper = tamper
        self.counts = {"out": 0, "in": 0, "errors": 0}
        self.seen: list[tuple[str, bytes]] | None = None   # tests: keep what passed by
        self._stop = False
        self._threads = [threading.Thread(target=self._pump, args=(self.core_sock, self.udp, "out"),
                                          daemon=True, name="relay-out"),
                         threading.Thread(target=self._pump, args=(self.udp, self.core_sock, "in"),
                                          daemon=True, name="relay-in")]

    def start(self) -> "Relay":
        for t in self._threads:
            t.start()
        return self

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while not self._stop:
            try:
                d = src.recv(65536)
            except OSError:
                if self._stop:
                    return
                self.counts["errors"] += 1     # e.g. ICMP port unreachable: gateway not up yet
                continue
            if not d and direction == "out":
                return                         # the core closed its end
            if self.seen is not None:
                self.seen.append((direction, d))
            for x in (self.tamper(direction, d) if self.tamper else [d]):
                try:
                    dst.send(x)
                    self.counts[direction] += 1
                except OSError:
                    self.counts["errors"] += 1

    def inject(self, direction: str, data: bytes) -> None:
        """Send `data` as if it had come from the other side (tests of a hostile host)."""
        (self.udp if direction == "out" else self.core_sock).send(data)

    def close(self) -> None:
        self._stop = True
        for s in (self.core_sock, self.udp, self.core_end):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class DirectLink:
    """The kernel as the relay: the core gets a UDP socket this host connected to the gateway.

    The host still decides where the datagrams go (it made and connected the
    socket) and still sees only sealed bytes, but no host process copies them:
    two thread hops fewer per datagram.  No `tamper` hook: use Relay to watch.
    """

    def __init__(self, gateway: tuple[str, int]):
        try:
            info = socket.getaddrinfo(gateway[0], gateway[1], type=socket.SOCK_DGRAM)[0]
        except socket.gaierror as e:
            raise ValueError(f"cannot resolve the gateway {gateway[0]}: {e}") from None
        self.core_end = socket.socket(info[0], socket.SOCK_DGRAM)
        self.core_end.connect(info[4])

    def start(self) -> "DirectLink":
        return self

    def close(self) -> None:
        self.core_end.close()

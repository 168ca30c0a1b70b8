"""Tunnel datagrams from the network and the host relay (sealvm/core/net_tunnel.py: receive).

The input is a sequence of datagrams {length u16, bytes}, delivered to a responder and
an initiator whose session is up; with bit 0x80 of a length, the datagram is first
replaced by a genuine one (a sealed frame, an INIT, a keepalive) XORed with the bytes,
so mutations land on real traffic.  `receive` never raises (drops are counted) and
never hands the guest a frame its peer did not seal (a genuine frame at most once).
"""
from __future__ import annotations

import time

from fuzz.target import Violation
from sealvm.core import net_tunnel as NT

MODULES = ["sealvm.core.net_tunnel"]
EXPECTED = ()
KEY = bytes(range(32))
MAX_LEN = 8192
_now = [1000.0]


def clock() -> float:
    return _now[0]


def _pair():
    i = NT.Tunnel(KEY, initiator=True, clock=clock)
    r = NT.Tunnel(KEY, initiator=False, clock=clock)
    _, resp = r.receive(i.initiate())
    _, confirm = i.receive(resp)
    r.receive(confirm)
    return i, r


def setup() -> None:
    pass


def one(data: bytes) -> None:
    _now[0] += 1.0
    ini, resp = _pair()
    sent = {}
    genuine = [ini.seal(b"frame-%d" % k) for k in range(4)] + [resp.seal(b"back"), ini.initiate(),
                                                               ini.seal(b"")]
    for k, g in enumerate(genuine[:4]):
        sent[g] = b"frame-%d" % k
    sent[genuine[4]] = b"back"
    delivered: set[bytes] = set()
    pos = 0
    while pos + 2 <= len(data):
        n = int.from_bytes(data[pos:pos + 2], "little")
        body, pos = data[pos + 2:pos + 2 + (n & 0x7FF)], pos + 2 + (n & 0x7FF)
        if n & 0x8000:
            g = genuine[n % len(genuine)]
            body = bytes(x ^ y for x, y in zip(g, body.ljust(len(g), b"\0")))
        for t in (resp, ini) if n & 0x4000 else (ini, resp):
            frame, _ = t.receive(body)
            if frame is None:
                continue
            if sent.get(body) != frame or body in delivered:
                raise Violation(f"tunnel accepted a datagram its peer never sealed "
                                f"(or twice): {body[:32].hex()}")
            delivered.add(body)


def seeds() -> list[bytes]:
    def d(n: int, body: bytes) -> bytes:
        return n.to_bytes(2, "little") + body
    return [d(0x8000, b""), d(0x8001, b"") + d(0x8001, b""), d(0x8000 | 0x4000 | 4, b""),
            d(0x8005, b"\0" * 8 + b"\1"), d(3, b"\1\0\0"), d(0x8006, b"")]

"""Messages between the core and its preboot stage: length-prefixed JSON on a socketpair.

Both ends are trusted code started by the launcher, but each still bounds
what it reads: a message is at most MAX_MESSAGE bytes of JSON object.
"""
from __future__ import annotations

import json
import socket
import struct

MAX_MESSAGE = 8 << 20


class ChannelError(Exception):
    pass


def send(sock: socket.socket, obj: dict) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("<I", len(data)) + data)


def _exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 16))
        if not chunk:
            raise ChannelError("the other side closed the channel")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict:
    (n,) = struct.unpack("<I", _exact(sock, 4))
    if n > MAX_MESSAGE:
        raise ChannelError(f"message of {n} bytes, at most {MAX_MESSAGE}")
    try:
        obj = json.loads(_exact(sock, n))
    except ValueError as e:
        raise ChannelError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ChannelError("message is not a JSON object")
    return obj

"""Migration streams from the source host (sealvm/core/migration.py: receive).

Byte 0 picks the mode:
* 0: the rest is the whole stream, as a hostile source host or relay sends it (the
  hello is read and parsed in the clear, before any key is known);
* 1: a genuine source: the harness sends a hello with the VM key's MAC, completes the
  key exchange with the target's reply, and seals the records the fuzzer describes
  (each {kind u8, length u16, payload}) under the session key, then the manifest: the
  record parser behind the MAC (RAM offsets, VM state, clock fields).
The harness's memory_for/build stand in for the machine (2 MiB of guest RAM).
Refusal: what the core's migration handler catches: MigrationError, SealError,
ValueError, KeyError, OSError.
"""
from __future__ import annotations

import json
import os
import socket
import threading

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fuzz.targets import _state
from sealvm.core import migration as MG
from sealvm.core import vmstate
from sealvm.core.addr import MIN_MEMORY
from sealvm.core.memory import GuestMemory
from sealvm.wire import sealed as SL
from sealvm.wire.sealed_layout import SealError

MODULES = ["sealvm.core.migration", "sealvm.core.vmstate"]
EXPECTED = (MG.MigrationError, SealError, ValueError, KeyError, OSError)
MAX_LEN = 32768
KEY, VM, GEN = bytes(range(32)), "web1", 7
ram: GuestMemory | None = None


def setup() -> None:
    global ram
    ram = GuestMemory.anonymous(MIN_MEMORY)


def _hello() -> tuple[bytes, X25519PrivateKey]:
    eph = X25519PrivateKey.generate()
    hello = MG._canon({"vm": VM, "generation": GEN, "nonce": "00" * 16,
                       "eph": eph.public_key().public_bytes_raw().hex()})
    return hello, eph


def _records(spec: bytes):
    pos = 0
    while pos + 3 <= len(spec):
        kind, n = spec[pos], int.from_bytes(spec[pos + 1:pos + 3], "little")
        yield kind, spec[pos + 3:pos + 3 + n]
        pos += 3 + n


def _source(sock: socket.socket, spec: bytes) -> None:
    """A genuine source core (it holds the VM key) sending fuzzer-chosen records."""
    try:
        wire = MG.Wire(sock)
        hello, eph = _hello()
        wire.send(hello, MG._mac(KEY, b"hello", hello))
        rec = wire.recv(MG.MAX_HELLO)
        reply = rec[:-32]
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(json.loads(reply)["eph"]))
        session = MG._session(KEY, eph.exchange(peer), hello, reply)
        sealer = SL.Sealer(session, VM, GEN + 1, MG.PURPOSE, chunk_size=1 << 16)
        wire.send(sealer.header)
        for kind, payload in _records(spec):
            wire.send(sealer.seal_chunk(kind, payload))
        wire.send(sealer.finish())
    except (OSError, ValueError, MG.MigrationError):
        pass
    finally:
        sock.shutdown(socket.SHUT_WR)


def one(data: bytes) -> None:
    if not data:
        return
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    t = None
    try:
        if data[0] == 0:
            b.sendall(data[1:])
            b.shutdown(socket.SHUT_WR)
        else:
            t = threading.Thread(target=_source, args=(b, data[1:]))
            t.start()
        MG.receive(a, lambda vm, g: KEY, lambda: ram, Built, lambda done, total: None)
    finally:
        a.close()
        if t is not None:
            t.join()
        b.close()


class Built:
    """What `receive` builds the VM from, in place of a machine (it has `before_run`)."""
    def __init__(self, config: dict, state: dict, memory) -> None:
        self.config, self.state, self.memory, self.before_run = config, state, memory, []


def _rec(kind: int, payload: bytes) -> bytes:
    return bytes([kind]) + len(payload).to_bytes(2, "little") + payload


def seeds() -> list[bytes]:
    meta = MG._canon({"config": {"memory_mib": 2}, "state": vmstate.to_bytes(_state.state()).decode(),
                      "wall_ns": 1, "tsc_khz": 2_000_000})
    page = (4096).to_bytes(8, "big") + b"\x01" * 4096
    hello, _ = _hello()
    return [b"\1" + _rec(1, page) + _rec(4, meta), b"\1" + _rec(4, meta),
            b"\1" + _rec(1, page[:8] + page[8:100]),
            b"\0" + len(hello + bytes(32)).to_bytes(4, "big") + hello + bytes(32)]

"""Snapshot files from the host's storage (sealvm/core/snapshot.py: Reader, load, build_from).

Byte 0 picks the mode:
* 0: the rest is the snapshot file (mutated from real ones sealed under a known key);
* 1: the rest is the METADATA chunk's payload, sealed under the key with one MEMORY
  chunk after it: what a core with the key made, run through the parser of
  metadata, VM state (vmstate.from_bytes) and RAM ranges (a second line behind the
  MAC).
The harness's `build` stands in for the machine builder (it makes 2 MiB of guest RAM;
the KVM part is not under test here).  Refusal: SnapshotError, the only error
`load` may raise.  A file that was never sealed must not load.
"""
from __future__ import annotations

import json
import os

from fuzz.target import Violation
from fuzz.targets import _state
from sealvm.core import snapshot as S
from sealvm.core.addr import MIN_MEMORY
from sealvm.core.memory import GuestMemory
from sealvm.wire import sealed as SL
from sealvm.wire.sealed_layout import ChunkKind

MODULES = ["sealvm.core.snapshot", "sealvm.core.vmstate", "sealvm.core.vmstate_devices"]
EXPECTED = (S.SnapshotError,)
MAX_LEN = 32768
KEY, VM, GEN = bytes(range(32)), "web1", 4
fd = -1
ram: GuestMemory | None = None
originals: set[bytes] = set()


class _Machine:
    def __init__(self):
        self.memory = ram

    def close(self):
        pass


def _build(config: dict, state: dict) -> _Machine:
    if not isinstance(config, dict):
        raise TypeError("config is not an object")
    return _Machine()


def _file(meta: bytes, pages: int = 1) -> bytes:
    chunks = [(ChunkKind.METADATA, meta)] + [(ChunkKind.MEMORY, bytes([7]) * 4096)] * pages
    return SL.seal_set(KEY, VM, GEN, S.PURPOSE, chunks, chunk_size=S.CHUNK, set_id=bytes(16))


def _meta(ranges) -> bytes:
    from sealvm.core import vmstate
    return json.dumps({"config": {"memory_mib": 2}, "state": vmstate.to_bytes(_state.state()).decode(),
                       "ranges": ranges}).encode()


def setup() -> None:
    global fd, ram
    if fd >= 0:
        return
    fd = os.memfd_create("fuzz-snapshot", os.MFD_CLOEXEC)
    ram = GuestMemory.anonymous(MIN_MEMORY)
    originals.update(s[1:] for s in seeds() if s[0] == 0)


def one(data: bytes) -> None:
    if not data:
        return
    blob = data[1:] if data[0] == 0 else _file(data[1:])
    os.ftruncate(fd, 0)
    os.pwrite(fd, blob, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    reader = S.Reader(fd)
    S.load(reader, KEY, VM, reader.header.generation, _build, lambda done, total: None)
    if data[0] == 0 and blob not in originals:
        raise Violation("a snapshot file that was never sealed loaded")


def seeds() -> list[bytes]:
    return [b"\0" + _file(_meta([[0, 4096]])), b"\0" + _file(_meta([]), pages=0),
            b"\1" + _meta([[4096, 8192]]), b"\1" + _meta([[0, 4096], [8192, 12288]])]

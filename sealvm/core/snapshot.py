"""Sealed snapshots: a paused machine out to an fd, and back into a new machine.

The host hands the fd over (ATTACH kind SNAPSHOT) and stores what arrives; it never
holds the key.  A snapshot is one sealed set (docs/sealed-format.md) for purpose
"snapshot", bound to the VM's name and generation: one METADATA chunk (the VM's
configuration and its vCPU, device and clock state), then MEMORY chunks, each
`u64 RAM offset || bytes`, for the populated parts of guest RAM only (the memfd's
holes, found with SEEK_DATA/SEEK_HOLE, were never touched and restore as zeros), then
the manifest.  Both directions stream in pieces of PIECE bytes: constant memory.
"""
from __future__ import annotations

import errno
import json
import os
import struct
from typing import Callable, Iterator

from ..wire import sealed as SL
from ..wire.sealed_layout import CHUNK_OVERHEAD, MAX_HEADER, ChunkKind, parse_header
from . import vmstate

PURPOSE = "snapshot"
PIECE = 4 << 20                      # guest RAM per MEMORY chunk
CHUNK = 8 << 20                      # the set's chunk size: the METADATA chunk can be larger
_OFF = struct.Struct(">Q")
_LEN = struct.Struct(">I")
Progress = Callable[[int, int], None]


class SnapshotError(ValueError):
    """The snapshot does not fit this VM, or does not open (message says why)."""


def populated(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of every range of the memfd that holds data."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        data = data[os.write(fd, data):]


def save(machine, fd: int, key: bytes, vm: str, generation: int, config: dict,
         progress: Progress) -> tuple[bytes, int]:
    """Seal the paused `machine` to `fd`; returns (set id, bytes written)."""
    state = vmstate.to_bytes(vmstate.capture_vm(machine))
    mem = machine.memory
    ranges = list(populated(mem.fd, mem.size))
    total = sum(e - s for s, e in ranges)
    sealer = SL.Sealer(key, vm, generation, PURPOSE, chunk_size=CHUNK)
    out = bytearray(_LEN.size + CHUNK_OVERHEAD + CHUNK)
    payload = bytearray(_OFF.size + PIECE)
    written = 0

    def emit(kind: ChunkKind, body) -> None:
        nonlocal written
        n = sealer.seal_chunk_into(kind, body, memoryview(out)[_LEN.size:])
        _LEN.pack_into(out, 0, n)
        _write_all(fd, memoryview(out)[:_LEN.size + n])
        written += _LEN.size + n

    _write_all(fd, memoryview(_LEN.pack(len(sealer.header)) + sealer.header))
    emit(ChunkKind.METADATA, json.dumps({"config": config, "state": state.decode()}).encode())
    buf, done = mem.buffer, 0
    for start, end in ranges:
        for off in range(start, end, PIECE):
            n = min(PIECE, end - off)
            _OFF.pack_into(payload, 0, off)
            payload[_OFF.size:_OFF.size + n] = buf[off:off + n]
            emit(ChunkKind.MEMORY, memoryview(payload)[:_OFF.size + n])
            done += n
            progress(done, total)
    manifest = sealer.finish()
    _write_all(fd, memoryview(_LEN.pack(len(manifest)) + manifest))
    os.fsync(fd)
    return parse_header(sealer.header).set_id, written + len(sealer.header) + len(manifest) + 2 * _LEN.size


class Reader:
    """Reads a snapshot from `fd`: the clear header first (to name the snapshot to the
    broker before any key exists), then `open()` authenticates everything."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.pos = 0
        try:
            head = SL.read_record(self.read, MAX_HEADER)
            if head is None:
                raise SL.TruncatedError("empty file")
            self.header = parse_header(head)
        except SL.SealError as e:
            raise SnapshotError(f"not a snapshot: {e.kind}: {e}") from None
        os.lseek(fd, 0, os.SEEK_SET)
        self.pos = 0

    def read(self, n: int) -> bytes:
        parts = []
        while n > 0:
            chunk = os.read(self.fd, min(n, CHUNK + CHUNK_OVERHEAD + _LEN.size))
            if not chunk:
                break
            parts.append(chunk)
            n -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.pos += len(data)
        return data

    def open(self, key: bytes, vm: str, generation: int) -> Iterator[tuple[ChunkKind, bytes]]:
        return SL.open_records(SL.Opener(key, vm, generation, PURPOSE, exact=True), self.read)


def load(reader: Reader, key: bytes, vm: str, generation: int,
         build: Callable[[dict, dict], object], progress: Progress):
    """Open the snapshot; `build(config, state)` makes the machine from the METADATA chunk,
    then RAM is filled from the MEMORY chunks.  Returns the machine once the manifest
    checked out; on any refusal the half-built machine is closed."""
    machine = None
    last = -1
    try:
        for kind, body in reader.open(key, vm, generation):
            if machine is None:
                if kind != ChunkKind.METADATA:
                    raise SnapshotError("the snapshot does not start with its metadata")
                meta = json.loads(body)
                machine = build(meta["config"], vmstate.from_bytes(meta["state"].encode()))
                mem = machine.memory
                continue
            (off,) = _OFF.unpack_from(body)
            n = len(body) - _OFF.size
            if kind != ChunkKind.MEMORY or off <= last or off % 4096 or off + n > mem.size:
                raise SnapshotError(f"memory chunk at {off:#x} of {n} bytes does not fit")
            mem.buffer[off:off + n] = memoryview(body)[_OFF.size:]
            last = off
            progress(reader.pos, reader.size)
        if machine is None:
            raise SnapshotError("the snapshot holds no metadata")
        if reader.read(1):
            raise SL.ExtraError("bytes after the snapshot's manifest")
        return machine
    except SL.SealError as e:
        if machine is not None:
            machine.close()
        raise SnapshotError(f"snapshot refused ({e.kind}): {e}") from None
    except (ValueError, KeyError, TypeError) as e:       # SnapshotError is a ValueError
        if machine is not None:
            machine.close()
        if isinstance(e, SnapshotError):
            raise
        raise SnapshotError(f"snapshot metadata malformed: {e!r}") from None

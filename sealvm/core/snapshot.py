"""Sealed snapshots: a paused machine out to an fd, and back into a new machine.

The host hands the fd over (ATTACH kind SNAPSHOT) and stores what arrives; it never
holds the key.  A snapshot is one sealed set (docs/sealed-format.md) for purpose
"snapshot", bound to the VM's name and generation: one METADATA chunk (the VM's
configuration and its vCPU, device and clock state), then MEMORY chunks for the populated parts of guest RAM only (the memfd's
holes, found with SEEK_DATA/SEEK_HOLE, were never touched and restore as zeros; the
METADATA chunk lists the populated ranges, and the MEMORY chunks are their PIECE-sized
pieces in order), then the manifest.  Both directions stream in pieces of PIECE bytes: constant memory.
"""
from __future__ import annotations

import errno
import json
import os
import struct
import threading
from typing import Callable, Iterator

from ..wire import sealed as SL
from ..wire.sealed_layout import (CHUNK_OVERHEAD, MANIFEST_MAGIC, MAX_HEADER, ChunkKind,
                                  parse_header)
from . import vmstate

PURPOSE = "snapshot"
PIECE = 4 << 20                      # guest RAM per MEMORY chunk
CHUNK = 8 << 20                      # the set's chunk size: the METADATA chunk can be larger
WRITERS = 2                          # threads writing sealed records out
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


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data, pos = data[n:], pos + n


class _Writers:
    """Records go to their file offsets from WRITERS threads while the caller seals the
    next ones (sealing must stay in order; writing need not).  Buffers come from a pool."""

    def __init__(self, fd: int, size: int):
        self.fd, self.cond = fd, threading.Condition()
        self.free = [bytearray(size) for _ in range(2 * WRITERS)]
        self.jobs: list = []
        self.done, self.error = False, None
        self.threads = [threading.Thread(target=self._run, name="snapshot-write", daemon=True)
                        for _ in range(WRITERS)]
        for t in self.threads:
            t.start()

    def buffer(self) -> bytearray:
        with self.cond:
            while not self.free and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error
            return self.free.pop()

    def put(self, buf: bytearray, n: int, pos: int) -> None:
        with self.cond:
            self.jobs.append((buf, n, pos))
            self.cond.notify_all()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.jobs and not self.done:
                    self.cond.wait()
                if not self.jobs:
                    return
                buf, n, pos = self.jobs.pop(0)
            try:
                _pwrite_all(self.fd, memoryview(buf)[:n], pos)
            except OSError as e:
                self.error = e
            with self.cond:
                self.free.append(buf)
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()
        if self.error is not None:
            raise self.error


def pieces(ranges: list) -> Iterator[tuple[int, int]]:
    """(offset, size) of each MEMORY chunk, in order, for the populated `ranges`."""
    for start, end in ranges:
        for off in range(start, end, PIECE):
            yield off, min(PIECE, end - off)


def save(machine, fd: int, key: bytes, vm: str, generation: int, config: dict,
         progress: Progress) -> tuple[bytes, int]:
    """Seal the paused `machine` to `fd`; returns (set id, bytes written)."""
    with machine.devices_held():
        return _save(machine, fd, key, vm, generation, config, progress)


def _save(machine, fd: int, key: bytes, vm: str, generation: int, config: dict,
          progress: Progress) -> tuple[bytes, int]:
    state = vmstate.to_bytes(vmstate.capture_vm(machine))
    mem = machine.memory
    ranges = list(populated(mem.fd, mem.size))
    total = sum(e - s for s, e in ranges)
    sealer = SL.Sealer(key, vm, generation, PURPOSE, chunk_size=CHUNK)
    ram = memoryview(mem.buffer)
    meta = json.dumps({"config": config, "state": state.decode(), "ranges": ranges}).encode()
    out = _Writers(fd, _LEN.size + CHUNK_OVERHEAD + CHUNK)
    pos = done = 0
    try:
        for rec in (sealer.header, (ChunkKind.METADATA, meta), *(
                (ChunkKind.MEMORY, p) for p in pieces(ranges)), None):
            buf = out.buffer()
            if rec is None:
                rec = sealer.finish()
            if isinstance(rec, bytes):
                n = len(rec)
                buf[_LEN.size:_LEN.size + n] = rec
            else:
                kind, body = rec
                if kind == ChunkKind.MEMORY:
                    body = ram[body[0]:body[0] + body[1]]
                    done += len(body)
                n = sealer.seal_chunk_into(kind, body, memoryview(buf)[_LEN.size:])
            _LEN.pack_into(buf, 0, n)
            out.put(buf, _LEN.size + n, pos)
            pos += _LEN.size + n
            if done:
                progress(done, total)
    finally:
        ram.release()
        out.close()
    os.fsync(fd)
    return parse_header(sealer.header).set_id, pos


class Reader:
    """Reads a snapshot from `fd`: the clear header first (to name the snapshot to the
    broker before any key exists), then `open()` authenticates everything."""

    def __init__(self, fd: int):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.pos = 0
        self._buf = bytearray(MAX_HEADER + _LEN.size)
        try:
            head = SL.read_record(self.read, MAX_HEADER)
            if head is None:
                raise SL.TruncatedError("empty file")
            self.header = parse_header(head)
        except SL.SealError as e:
            raise SnapshotError(f"not a snapshot: {e.kind}: {e}") from None
        os.lseek(fd, 0, os.SEEK_SET)
        self.pos = 0
        self._buf = bytearray(CHUNK + CHUNK_OVERHEAD)

    def read(self, n: int) -> memoryview:
        """Up to n bytes (fewer only at the end), valid until the next read."""
        view = memoryview(self._buf)[:min(n, len(self._buf))]
        got = 0
        while got < len(view):
            k = os.readv(self.fd, [view[got:]])
            if k == 0:
                break
            got += k
        self.pos += got
        return view[:got]


def load(reader: Reader, key: bytes, vm: str, generation: int,
         build: Callable[[dict, dict], object], progress: Progress):
    """Open the snapshot; `build(config, state)` makes the machine from the METADATA chunk,
    then each MEMORY chunk is decrypted straight into guest RAM.  Returns the machine once
    the manifest checked out; on any refusal the half-built machine is closed."""
    built: list = []
    try:
        return build_from(reader, key, vm, generation, build, progress, built)
    except SL.SealError as e:
        error = SnapshotError(f"snapshot refused ({e.kind}): {e}")
    except SnapshotError as e:
        error = SnapshotError(str(e))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        error = SnapshotError(f"snapshot metadata malformed: {e!r}")
    # Out of the handler: the failed frames (and their views of guest RAM) are gone, so
    # the RAM mapping can be closed.
    for machine in built:
        machine.close()
    raise error


def build_from(reader: Reader, key: bytes, vm: str, generation: int,
               build: Callable[[dict, dict], object], progress: Progress, built: list):
    op = SL.Opener(key, vm, generation, PURPOSE, exact=True)
    recs = SL.chunk_records(op, reader.read)
    first = next(recs, None)
    kind, meta = op.open_chunk(first)[1:] if first is not None else (None, b"")
    if kind != ChunkKind.METADATA:
        raise SnapshotError("the snapshot does not start with its metadata")
    meta = json.loads(meta)
    machine = build(meta["config"], vmstate.from_bytes(meta["state"].encode()))
    built.append(machine)
    ram = memoryview(machine.memory.buffer)
    want = list(pieces(check_ranges(meta["ranges"], machine.memory.size)))
    got = 0
    for i, rec in enumerate(recs):
        if i >= len(want):
            raise SL.ExtraError("more memory chunks than the metadata lists")
        off, n = want[i]
        if op.open_chunk_into(rec, ram[off:off + n])[1] != ChunkKind.MEMORY:
            raise SnapshotError(f"chunk {i + 2} is not guest memory")
        got += 1
        progress(reader.pos, reader.size)
    if got != len(want):
        raise SL.TruncatedError("fewer memory chunks than the metadata lists")
    if reader.read(1):
        raise SL.ExtraError("bytes after the snapshot's manifest")
    ram.release()
    return machine


def check_ranges(ranges, size: int) -> list[tuple[int, int]]:
    """The METADATA chunk's populated ranges: page-aligned, ascending, inside RAM."""
    out, last = [], 0
    for start, end in ranges:
        if not (type(start) is int and type(end) is int and last <= start < end <= size
                and start % 4096 == 0 and end % 4096 == 0):
            raise SnapshotError(f"memory range {start!r}..{end!r} does not fit this VM")
        out.append((start, end))
        last = end
    return out

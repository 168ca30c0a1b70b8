"""The launcher's witness of each sealed disk's newest committed generation.

The host can restore every file its daemon's uid can write (the image, both
metadata copies, any counter file) to an earlier copy together; a core starts
with no memory of its own, so it cannot tell.  The launcher (root, measured,
trusted) keeps for each disk id the newest generation a core committed, where
the daemon's uid cannot write: one file per disk in a root-only directory.
Each core gets a private socket to it at spawn (`--witness-fd`), which the host
never holds.  A core reads the record when it opens a disk (an older disk is a
rollback) and advances it after every commit, before it acknowledges the
guest's FLUSH (docs/sealed-disk.md).

Limits: host root can still roll this directory back (as it could swtpm's NV
state, which also lives in host files); a hardware TPM's NV counter would not
be.  The record is per host: a disk that moves hosts is protected by the
migration stream's generation floor and the owner's record.

Requests (little-endian, fixed size): op 'R' or 'A' | disk id 16 | generation u64.
Answer: the recorded generation u64 (after an 'A', at least the one asked for).
"""
from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path

REQUEST = struct.Struct("<c16sQ")
ANSWER = struct.Struct("<Q")


class Store:
    """One file per disk id under `directory` (created 0700); writes are atomic."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, disk_id: bytes) -> Path:
        return self.dir / disk_id.hex()

    def read(self, disk_id: bytes) -> int:
        try:
            return int(self._path(disk_id).read_text())
        except FileNotFoundError:
            return 0

    def advance(self, disk_id: bytes, generation: int) -> int:
        with self._lock:
            current = self.read(disk_id)
            if generation <= current:
                return current
            tmp = self._path(disk_id).with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, str(generation).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._path(disk_id))
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return generation


def default_store(run_dir: str | os.PathLike) -> Store:
    """Root: the launcher's own directory; without root (development only): the run dir."""
    if os.geteuid() == 0:
        from .attest_boot import launcher_dir
        return Store(launcher_dir() / "disk-generations")
    return Store(Path(run_dir) / "disk-generations")


def serve(sock: socket.socket, store: Store) -> None:
    """Answer one core's requests until it closes its end (its process ended)."""
    with sock:
        while True:
            data = b""
            while len(data) < REQUEST.size:
                try:
                    chunk = sock.recv(REQUEST.size - len(data))
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            op, disk_id, generation = REQUEST.unpack(data)
            try:
                if op == b"R":
                    value = store.read(disk_id)
                elif op == b"A":
                    value = store.advance(disk_id, generation)
                else:
                    return                       # a core never sends anything else
            except (OSError, ValueError):
                return                           # the core sees the witness gone: its I/O fails
            try:
                sock.sendall(ANSWER.pack(value))
            except OSError:
                return


def start(run_dir: str | os.PathLike) -> socket.socket:
    """A socketpair: serve one end on a thread, return the core's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    threading.Thread(target=serve, args=(ours, default_store(run_dir)), daemon=True,
                     name="disk-witness").start()
    return theirs

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

With a TPM (SEALVM_TPM=HOST:PORT, as for the launcher's measured boot) the record
is a TPM NV counter per disk instead (`TpmStore`), beside an ordinary NV index
naming the disk and the counter's value at generation 0: the TPM itself refuses
to move a counter backwards.  Limits: host root can roll the directory back, and
swtpm's NV state too (it is a host file); a hardware TPM's counter it cannot.
The record is per host: a disk that moves hosts is protected by the migration
stream's generation floor and the owner's record.

Messages: sealvm/wire/witness.py (after an 'A', the answer is at least the generation
asked for).
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from pathlib import Path

from ..wire.witness import ANSWER, REQUEST


class Store:
    """One file per disk id under `directory` (made 0700 when first needed); writes are atomic."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)          # made at the first commit (a VM without a disk
        self._lock = threading.Lock()       # never needs it)

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
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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


NV_BASE = 0x01D50000          # slot k: counter at NV_BASE + 2k, its label at NV_BASE + 2k + 1
NV_SLOTS = 256
_LABEL = struct.Struct(">16sq")   # disk id, the counter's value at generation 0


class TpmStore:
    """The same record in TPM NV counters (owner hierarchy, empty owner auth)."""

    def __init__(self, address: str):
        self.address = address
        self._lock = threading.Lock()

    def _esapi(self):
        from tpm2_pytss import ESAPI
        from .tpm_boot import split
        host, port = split(self.address)
        return ESAPI(f"swtpm:host={host},port={port}")

    @staticmethod
    def _define(e, index: int, nt: int, size: int):
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import TPM2_ALG, TPMA_NV
        from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC
        attrs = (nt << TPMA_NV.TPM2_NT_SHIFT) | TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | \
            TPMA_NV.NO_DA
        try:
            return e.nv_define_space(b"", TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
                nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=size)))
        except TSS2_Exception:          # left by a definition cut short: use it
            return e.tr_from_tpmpublic(index)

    def _slot(self, e, disk_id: bytes, generation: int | None):
        """(counter handle, baseline) of `disk_id`; made for `generation` if None is found."""
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import ESYS_TR, TPM2_NT
        first = int.from_bytes(hashlib.sha256(disk_id).digest()[:2], "big")
        for k in range(NV_SLOTS):
            slot = NV_BASE + 2 * ((first + k) % NV_SLOTS)
            try:
                label = _LABEL.unpack(bytes(e.nv_read(e.tr_from_tpmpublic(slot + 1), _LABEL.size,
                                                      auth_handle=ESYS_TR.RH_OWNER)))
            except TSS2_Exception:
                if generation is None:
                    return None
                counter = self._define(e, slot, TPM2_NT.COUNTER, 8)
                e.nv_increment(counter, auth_handle=ESYS_TR.RH_OWNER)   # readable from now on
                baseline = self._value(e, counter) - generation
                e.nv_write(self._define(e, slot + 1, TPM2_NT.ORDINARY, _LABEL.size),
                           _LABEL.pack(disk_id, baseline), auth_handle=ESYS_TR.RH_OWNER)
                return counter, baseline
            if label[0] == disk_id:
                return e.tr_from_tpmpublic(slot), label[1]
        raise OSError(f"no free TPM NV slot among {NV_SLOTS} for disk {disk_id.hex()}")

    @staticmethod
    def _value(e, counter) -> int:
        from tpm2_pytss.constants import ESYS_TR
        return int.from_bytes(bytes(e.nv_read(counter, 8, auth_handle=ESYS_TR.RH_OWNER)), "big")

    def _run(self, fn):
        from tpm2_pytss import TSS2_Exception
        with self._lock:
            try:
                e = self._esapi()
            except TSS2_Exception as ex:
                raise OSError(f"TPM at {self.address}: {ex}") from None
            try:
                return fn(e)
            except TSS2_Exception as ex:
                raise OSError(f"TPM at {self.address}: {ex}") from None
            finally:
                e.close()

    def read(self, disk_id: bytes) -> int:
        def op(e):
            found = self._slot(e, disk_id, None)
            return 0 if found is None else self._value(e, found[0]) - found[1]
        return self._run(op)

    def advance(self, disk_id: bytes, generation: int) -> int:
        from tpm2_pytss.constants import ESYS_TR

        def op(e):
            counter, baseline = self._slot(e, disk_id, generation)
            current = self._value(e, counter) - baseline
            for _ in range(generation - current):
                e.nv_increment(counter, auth_handle=ESYS_TR.RH_OWNER)
            return max(current, generation)
        return self._run(op)


def default_store(run_dir: str | os.PathLike):
    """A TPM if the launcher has one; else, as root, the launcher's own directory;
    without root (development only), the run dir."""
    from .tpm_boot import configured
    address = configured()
    if address is not None:
        return TpmStore(address)
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

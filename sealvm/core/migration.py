"""Live migration between two attested cores over a stream the hosts carry (docs/migration.md).

Handshake (both cores hold the VM's snapshot key K, which the owner's broker releases
only to a core whose evidence its policy accepts, so a core that proves K is attested):

    source -> target   hello = {vm, generation G, eph_s, nonce_s}   || HMAC(Kh, "hello" || hello)
    target -> source   reply = {eph_t, nonce_t}                     || HMAC(Kh, "reply" || hello || reply)
    session key        HKDF(K || X25519(eph_s, eph_t), info = "sealvm migration v1" || hello || reply)

The target reads the hello in the clear, attests to the broker naming generation G (the
broker answers only while G is the VM's newest generation), then checks the hello's MAC.
The stream is then one open sealed set (docs/sealed-format.md) for purpose "migration",
generation G+1, under the session key: MEMORY chunks (u64 RAM offset || pages) during the
pre-copy rounds and the stop phase, then one METADATA chunk (configuration and VM
state), then the manifest.  Nothing on the wire is in the clear but the hello.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
from typing import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..wire import sealed as SL
from ..wire.sealed_layout import CHUNK_OVERHEAD, ChunkKind
from . import snapshot as SN
from . import vmstate
from .kvm import state as KS
from .kvm.api import ioctl
from .kvm import state_structs as SS

PURPOSE = "migration"
PAGE = 4096
_LEN = struct.Struct(">I")
_OFF = struct.Struct(">Q")
MAX_HELLO = 1024
MAX_ROUNDS = 30
# Of the downtime budget (300 ms unless the host asks otherwise), the stop-and-copy gets
# half: the target's build, the owner's generation commit and the start take the rest.
STOP_BUDGET_S = 0.15
KVM_GET_TSC_KHZ = 0xAEA3       # _IO(KVMIO, 0xa3): the vCPU's TSC frequency
Progress = Callable[[int, int], None]


class MigrationError(Exception):
    """The migration failed; the message says where and why."""


def _canon(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _mac(key: bytes, label: bytes, data: bytes) -> bytes:
    kh = HKDF(hashes.SHA256(), 32, None, b"sealvm migration handshake").derive(key)
    return hmac.new(kh, label + b"\0" + data, hashlib.sha256).digest()


def _session(key: bytes, shared: bytes, hello: bytes, reply: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, None, b"sealvm migration v1" + hello + reply).derive(
        key + shared)


class Wire:
    """u32-length-prefixed records on the stream socket the host attached."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def send(self, *parts) -> int:
        n = sum(len(p) for p in parts)
        self.sock.sendall(_LEN.pack(n))
        for p in parts:
            self.sock.sendall(p)
        return n + _LEN.size

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if k == 0:
                break
            got += k
        return bytes(buf[:got])

    def recv(self, cap: int) -> bytes:
        rec = SL.read_record(self.read, cap)
        if rec is None:
            raise MigrationError("the stream ended")
        return bytes(rec)


# ---- source ------------------------------------------------------------------------------
class _Throttle:
    """Auto-converge: hold the vCPUs for `share` of every 50 ms while the guest dirties
    memory faster than the stream carries it."""

    def __init__(self, machine):
        self.machine, self.share = machine, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="migration-throttle", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05 * (1 - self.share)):
            if self.share > 0:
                self.machine.pause()
                self.stop.wait(0.05 * self.share)
                self.machine.resume()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class Source:
    """Sends a running machine; `run()` returns with the machine paused, fully sent."""

    def __init__(self, machine, sock: socket.socket, key: bytes, vm: str, generation: int,
                 config: dict, progress: Progress, downtime_s: float = STOP_BUDGET_S):
        self.machine, self.wire, self.key, self.vm = machine, Wire(sock), key, vm
        self.generation, self.config, self.progress = generation, config, progress
        self.downtime_s = downtime_s
        self.report = {"rounds": 0, "pages": 0, "bytes": 0, "throttle": 0.0}
        self.buf = bytearray(CHUNK_OVERHEAD + SN.CHUNK)
        self.payload = bytearray(_OFF.size + SN.PIECE)

    def handshake(self) -> SL.Sealer:
        eph, nonce = X25519PrivateKey.generate(), os.urandom(16)
        hello = _canon({"vm": self.vm, "generation": self.generation, "nonce": nonce.hex(),
                        "eph": eph.public_key().public_bytes_raw().hex()})
        self.wire.send(hello, _mac(self.key, b"hello", hello))
        rec = self.wire.recv(MAX_HELLO)
        reply, mac = rec[:-32], rec[-32:]
        if not hmac.compare_digest(mac, _mac(self.key, b"reply", hello + reply)):
            raise MigrationError("the target did not prove it holds this VM's key: it is not "
                                 "a core the owner's broker attested")
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(json.loads(reply)["eph"]))
        session = _session(self.key, eph.exchange(peer), hello, reply)
        sealer = SL.Sealer(session, self.vm, self.generation + 1, PURPOSE, chunk_size=SN.CHUNK)
        self.report["bytes"] += self.wire.send(sealer.header)
        return sealer

    def _send_run(self, sealer: SL.Sealer, ram, start: int, end: int) -> None:
        for off in range(start, end, SN.PIECE):
            n = min(SN.PIECE, end - off)
            _OFF.pack_into(self.payload, 0, off)
            self.payload[_OFF.size:_OFF.size + n] = ram[off:off + n]
            k = sealer.seal_chunk_into(ChunkKind.MEMORY, memoryview(self.payload)[:_OFF.size + n],
                                       self.buf)
            self.report["bytes"] += self.wire.send(memoryview(self.buf)[:k])
            self.report["pages"] += n // PAGE

    def _dirty(self, log) -> list[tuple[int, int]]:
        """Memfd (start, end) runs of the pages dirtied since the last call: by the guest
        (KVM's log) and by the devices (which KVM's log does not see)."""
        mem = self.machine.memory
        pages = mem.take_written()
        for slot, r in enumerate(mem.regions):
            first = int(r.offset) // PAGE
            pages.update(first + p for p in KS.dirty_pages(log.get_dirty_log(slot)))
        runs: list[tuple[int, int]] = []
        for page in sorted(pages):
            off = page * PAGE
            if runs and runs[-1][1] == off:
                runs[-1] = (runs[-1][0], off + PAGE)
            else:
                runs.append((off, off + PAGE))
        return runs

    def run(self) -> dict:
        m, mem = self.machine, self.machine.memory
        sealer = self.handshake()
        log = KS.DirtyLog(m.vm)
        base = mem.host_address()
        for slot, r in enumerate(mem.regions):
            log.set_user_memory_region(slot, SS.KVM_MEM_LOG_DIRTY_PAGES, int(r.gpa), r.size,
                                       base + int(r.offset))
            log.get_dirty_log(slot)
        ram = memoryview(mem.buffer)
        mem.track_writes(True)
        throttle = _Throttle(m)
        try:
            todo = list(SN.populated(mem.fd, mem.size))
            total = sum(e - s for s, e in todo)
            while True:
                t0, sent0 = time.monotonic(), self.report["bytes"]
                for start, end in todo:
                    self._send_run(sealer, ram, start, end)
                    self.progress(min(self.report["bytes"], total), total)
                self.report["rounds"] += 1
                elapsed = max(time.monotonic() - t0, 1e-3)
                rate = (self.report["bytes"] - sent0) / elapsed       # what the stream carries
                todo = self._dirty(log)
                dirty = sum(e - s for s, e in todo)
                if dirty <= rate * self.downtime_s or self.report["rounds"] >= MAX_ROUNDS:
                    break
                if dirty / elapsed > 0.5 * rate:     # not converging: slow the guest down
                    throttle.share = min(0.95, throttle.share + 0.2)
                    self.report["throttle"] = throttle.share
        except BaseException:
            mem.track_writes(False)
            raise
        finally:
            throttle.close()
        m.pause()
        self.report["stop_pages"] = 0
        t_stop = time.monotonic()
        with m.devices_held():      # requests in flight finish, then no device writes RAM
            try:
                state = vmstate.to_bytes(vmstate.capture_vm(m))
                disk = m.blk.disk if m.blk is not None else None     # committed by the capture
                for start, end in self._dirty(log) + todo:
                    self._send_run(sealer, ram, start, end)
                    self.report["stop_pages"] += (end - start) // PAGE
            finally:
                mem.track_writes(False)
        ram.release()
        meta = _canon({"config": self.config, "state": state.decode(),
                       "disk_generation": disk.generation if disk is not None else 0,
                       "wall_ns": time.time_ns(), "tsc_khz": ioctl(m.vcpus[0].fd.fd, KVM_GET_TSC_KHZ)})
        k = sealer.seal_chunk_into(ChunkKind.METADATA, meta, self.buf)
        self.report["bytes"] += self.wire.send(memoryview(self.buf)[:k])
        self.report["bytes"] += self.wire.send(sealer.finish())
        self.report["stop_ms"] = round((time.monotonic() - t_stop) * 1e3, 1)
        for slot, r in enumerate(mem.regions):              # logging off again
            log.set_user_memory_region(slot, 0, int(r.gpa), r.size, base + int(r.offset))
        return self.report


# ---- target ------------------------------------------------------------------------------
def receive(sock: socket.socket, attest: Callable[[str, int], bytes],
            memory_for: Callable[[], object], build: Callable[[dict, dict, object], object],
            progress: Progress) -> tuple[object, int, int]:
    """Take a migrating VM: `attest(vm, G)` returns the snapshot key (after the broker
    released it for generation G), `memory_for()` the new VM's RAM, `build(config, state,
    memory)` the machine.  Returns (machine, generation G, the disk's committed generation at
    the stop) once the manifest checked out."""
    wire = Wire(sock)
    rec = wire.recv(MAX_HELLO)
    hello, mac = rec[:-32], rec[-32:]
    try:
        h = json.loads(hello)
        vm, generation = str(h["vm"]), int(h["generation"])
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(h["eph"]))
    except (ValueError, KeyError, TypeError) as e:
        raise MigrationError(f"malformed migration hello: {e}") from None
    key = attest(vm, generation)
    if not hmac.compare_digest(mac, _mac(key, b"hello", hello)):
        raise MigrationError("the source did not prove it holds this VM's key")
    eph = X25519PrivateKey.generate()
    reply = _canon({"eph": eph.public_key().public_bytes_raw().hex(),
                    "nonce": os.urandom(16).hex()})
    wire.send(reply, _mac(key, b"reply", hello + reply))
    session = _session(key, eph.exchange(peer), hello, reply)
    op = SL.Opener(session, vm, generation + 1, PURPOSE, exact=True)
    memory = memory_for()
    meta, received = None, 0
    for kind, payload in SL.open_records(op, wire.read):
        if meta is not None:
            raise SL.ExtraError("a chunk after the VM state")
        if kind == ChunkKind.METADATA:
            meta = payload
            continue
        if kind != ChunkKind.MEMORY or len(payload) < _OFF.size:
            raise MigrationError(f"a chunk of kind {int(kind)}, {len(payload)} bytes, is not memory")
        (off,) = _OFF.unpack_from(payload)
        n = len(payload) - _OFF.size
        if off % PAGE or n % PAGE or off + n > memory.size:
            raise MigrationError(f"memory chunk at {off:#x} of {n} bytes does not fit")
        memory.buffer[off:off + n] = memoryview(payload)[_OFF.size:]
        received += n
        progress(received, memory.size)
    if meta is None:
        raise SL.TruncatedError("the stream ended without the VM state")
    try:   # sealed by a core holding the key; still checked, every error a MigrationError
        meta = json.loads(meta)
        state, config = vmstate.from_bytes(meta["state"].encode()), meta["config"]
        disk_generation = int(meta.get("disk_generation", 0))
        # The guest's clocks go on with the wall clock, so the guest sees the switch-over
        # as the gap it is (the downtime a guest can measure), as after any pause of a
        # real CPU: up to now, and from its build to its first instruction (the owner's
        # receipt comes between; vmstate.restart_clock then writes `state`).
        khz, gap_ns = int(meta["tsc_khz"]), max(0, time.time_ns() - int(meta["wall_ns"]))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise MigrationError(f"malformed VM state in the stream: {e!r}") from None
    _advance(state, gap_ns, khz)
    machine, built = build(config, state, memory), time.monotonic_ns()
    machine.before_run.insert(0, lambda: _advance(state, time.monotonic_ns() - built, khz))
    return machine, generation, disk_generation


def _advance(state: dict, gap_ns: int, tsc_khz: int) -> None:
    """Move a captured state's kvmclock and TSCs gap_ns on."""
    state["clock"] = (state["clock"] + gap_ns) % (1 << 64)
    for rec in state["vcpus"]:
        rec["msrs"] = [[i, (v + gap_ns * tsc_khz // 1_000_000) % (1 << 64)
                        if i == vmstate.MSR_IA32_TSC else v] for i, v in rec["msrs"]]

"""The sealed network tunnel between a VM's core and its owner's gateway.

Handshake: Noise NNpsk0 (Noise_NNpsk0_25519_ChaChaPoly_SHA256), authenticated
by the owner's 32-byte per-VM "net" key as the pre-shared key.  Only the core
(initiator) and the gateway (responder) hold it, so each side knows the other
holds it; the ephemeral-ephemeral X25519 exchange gives every session fresh
keys, so a counter restarting at 0 after a core restart or a snapshot restore
never reuses a (key, nonce) pair.  docs/sealed-network.md argues the design.

Messages (little-endian; the host relays them as opaque datagrams):
  INIT  1|0|0|0 sender:u32 e:32 enc(timestamp:u64 generation:u64)+tag:16 (72 bytes)
  RESP  2|0|0|0 sender:u32 receiver:u32 e:32 enc(empty)+tag:16          (60 bytes)
  DATA  4|0|0|0 receiver:u32 counter:u64 ChaCha20-Poly1305(frame)+tag   (header = AAD)
An empty DATA payload is a keepalive; the initiator sends one at once to
confirm a new session (the responder switches to it only then).

Fencing: the INIT carries, sealed, the owner's generation of the copy of the VM
that sends it.  The gateway refuses (`drop_fenced`) an INIT from a generation
older than the owner's newest, so once a VM was restored or migrated elsewhere
its old copy can make no new session, and the new copy's session replaces its
current one.

Receive checks, each counted when it drops: the type and length, a known
receiver index, the counter inside the sliding window and not seen before
(2048-bit bitmap, as WireGuard), the AEAD tag; the window moves only after
the tag verified.  The initiator rekeys after `rekey_after_messages` messages
in either direction or `rekey_after_time` seconds, and a session is refused
altogether past the reject limits.
"""
from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"
PROLOGUE = b"sealvm net tunnel v1"
MSG_INIT, MSG_RESP, MSG_DATA = 1, 2, 4
INIT_LEN, RESP_LEN, DATA_HDR, TAG = 72, 60, 16, 16
WINDOW = 2048
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
KEEPALIVE_TIMEOUT = 10.0          # responder: answer traffic with a keepalive at least this often
REHANDSHAKE_TIMEOUT = 15.0        # initiator: sent, heard nothing back this long: handshake again
_DATA = struct.Struct("<B3xIQ")
_RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class HandshakeError(Exception):
    """A handshake message failed its checks (dropped and counted, never fatal)."""


def _hkdf(ck: bytes, ikm: bytes, n: int) -> list[bytes]:
    out = HKDF(hashes.SHA256(), 32 * n, salt=ck, info=b"").derive(ikm)
    return [out[i:i + 32] for i in range(0, 32 * n, 32)]


def _nonce(n: int) -> bytes:
    return b"\0\0\0\0" + n.to_bytes(8, "little")


class _Symmetric:
    """Noise's SymmetricState: chaining key, handshake hash, current cipher key."""

    def __init__(self, psk: bytes):
        self.h = hashlib.sha256(PROTOCOL).digest()
        self.ck = self.h
        self.k: bytes | None = None
        self.n = 0
        self.mix_hash(PROLOGUE)
        self.ck, temp_h, temp_k = _hkdf(self.ck, psk, 3)   # MixKeyAndHash(psk)
        self.mix_hash(temp_h)
        self.k, self.n = temp_k, 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        c = ChaCha20Poly1305(self.k).encrypt(_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(c)
        return c

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            p = ChaCha20Poly1305(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("handshake tag does not verify (wrong key or altered)") from None
        self.n += 1
        self.mix_hash(ciphertext)
        return p

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _pub(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(*_RAW)


class ReplayWindow:
    """Sliding window of received counters: bit i of `bits` = counter top-i was seen."""

    def __init__(self, size: int = WINDOW):
        self.size = size
        self.top = -1
        self.bits = 0

    def fresh(self, counter: int) -> bool:
        if counter > self.top:
            return True
        off = self.top - counter
        return off < self.size and not (self.bits >> off) & 1

    def mark(self, counter: int) -> None:
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << self.size) - 1) if shift < self.size else 1
            self.top = counter
        else:
            self.bits |= 1 << (self.top - counter)


class Session:
    def __init__(self, local: int, remote: int, send_key: bytes, recv_key: bytes, now: float):
        self.local, self.remote = local, remote
        self.send = ChaCha20Poly1305(send_key)
        self.recv = ChaCha20Poly1305(recv_key)
        self.counter = 0
        self.window = ReplayWindow()
        self.created = now
        self.confirmed = False
        self.generation = 0          # responder: what the INIT named


class Tunnel:
    """One end of the tunnel.  Thread-safe: seal() and receive() may run concurrently.

    `replay_check` and `seal_frames` exist only for the paired security controls
    (test mode): off, they show the attack the defence stops.
    """

    def __init__(self, psk: bytes, *, initiator: bool, clock: Callable[[], float] = time.monotonic,
                 rekey_after_messages: int = REKEY_AFTER_MESSAGES,
                 rekey_after_time: float = REKEY_AFTER_TIME,
                 replay_check: bool = True, seal_frames: bool = True,
                 generation: Callable[[], int] = lambda: 0,
                 min_generation: Callable[[], int] | None = None):
        if len(psk) != 32:
            raise ValueError("the tunnel key must be 32 bytes")
        self._psk = bytes(psk)
        self.initiator = initiator
        self._clock = clock
        self.rekey_after_messages = rekey_after_messages
        self.rekey_after_time = rekey_after_time
        self.replay_check = replay_check
        self.seal_frames = seal_frames
        self.generation, self.min_generation = generation, min_generation
        self._lock = threading.Lock()
        self.sessions: dict[int, Session] = {}   # by our receiver index
        self.current: Session | None = None      # what we send with
        self.next: Session | None = None         # responder: waiting for the first DATA
        self._pending: tuple[int, X25519PrivateKey, _Symmetric] | None = None
        self._last_timestamp = 0
        self.last_init = -1e9
        self.last_rx = self.last_tx = -1e9   # last authenticated DATA in, last frame out
        self.stats = dict(rx=0, tx=0, keepalive=0, handshakes=0, drop_malformed=0,
                          drop_session=0, drop_replay=0, drop_auth=0, drop_handshake=0, drop_fenced=0,
                          drop_nosession=0)

    # ---- handshake ---------------------------------------------------------
    def _new_index(self) -> int:
        while True:
            i = int.from_bytes(os.urandom(4), "little")
            if i and i not in self.sessions:
                return i

    def initiate(self) -> bytes:
        """A fresh INIT (new ephemeral key); a previous unanswered one is forgotten."""
        with self._lock:
            sym = _Symmetric(self._psk)
            e = X25519PrivateKey.generate()
            epub = _pub(e)
            sym.mix_hash(epub)
            sym.mix_key(epub)
            ts = max(time.time_ns(), self._last_timestamp + 1)
            self._last_timestamp = ts
            payload = sym.encrypt_and_hash(struct.pack("<QQ", ts, self.generation()))
            local = self._new_index()
            self._pending = (local, e, sym)
            self.last_init = self._clock()
            return bytes([MSG_INIT, 0, 0, 0]) + local.to_bytes(4, "little") + epub + payload

    def _respond(self, msg: bytes) -> bytes:
        sym = _Symmetric(self._psk)
        repub = msg[8:40]
        sym.mix_hash(repub)
        sym.mix_key(repub)
        ts, generation = struct.unpack("<QQ", sym.decrypt_and_hash(msg[40:INIT_LEN]))
        if ts <= self._last_timestamp:
            raise HandshakeError("INIT timestamp not newer than the last one (replayed INIT)")
        if self.min_generation is not None and generation < self.min_generation():
            self.stats["drop_fenced"] += 1
            raise HandshakeError(f"INIT from generation {generation}: a fenced copy")
        e = X25519PrivateKey.generate()
        epub = _pub(e)
        sym.mix_hash(epub)
        sym.mix_key(epub)
        sym.mix_key(e.exchange(X25519PublicKey.from_public_bytes(repub)))
        tag = sym.encrypt_and_hash(b"")
        k_init, k_resp = sym.split()
        remote = int.from_bytes(msg[4:8], "little")
        local = self._new_index()
        s = Session(local, remote, k_resp, k_init, self._clock())
        s.generation = generation
        self._last_timestamp = ts
        self.last_tx = self._clock()          # the RESP counts as a sign of life
        if self.next is not None:
            self.sessions.pop(self.next.local, None)
        self.next = s
        self.sessions[local] = s
        self.stats["handshakes"] += 1
        return (bytes([MSG_RESP, 0, 0, 0]) + local.to_bytes(4, "little")
                + remote.to_bytes(4, "little") + epub + tag)

    def _complete(self, msg: bytes) -> None:
        if self._pending is None or int.from_bytes(msg[8:12], "little") != self._pending[0]:
            raise HandshakeError("RESP for no handshake of ours")
        local, e, sym = self._pending
        repub = msg[12:44]
        sym.mix_hash(repub)
        sym.mix_key(repub)
        try:
            sym.mix_key(e.exchange(X25519PublicKey.from_public_bytes(repub)))
        except ValueError as ex:
            raise HandshakeError(f"bad ephemeral key: {ex}") from None
        sym.decrypt_and_hash(msg[44:60])
        k_init, k_resp = sym.split()
        s = Session(local, int.from_bytes(msg[4:8], "little"), k_init, k_resp, self._clock())
        s.confirmed = True
        self.last_rx = self._clock()
        self._pending = None
        self._install(s)
        self.stats["handshakes"] += 1

    def _install(self, s: Session) -> None:
        """`s` becomes the sending session; the one before it stays for in-flight packets."""
        old = self.current
        keep = {s.local: s}
        if old is not None and not (self.min_generation is not None
                                    and s.generation > old.generation):   # not a fenced copy's
            keep[old.local] = old
        if self.next is not None and self.next is not s:
            keep[self.next.local] = self.next
        self.sessions = keep
        self.current = s
        if self.next is s:
            self.next = None

    # ---- data ----------------------------------------------------------------
    def seal(self, frame: bytes) -> bytes | None:
        """The DATA datagram carrying `frame`, or None when there is no usable session."""
        with self._lock:
            s = self.current
            if s is None or s.counter >= REJECT_AFTER_MESSAGES or \
                    self._clock() - s.created > REJECT_AFTER_TIME:
                return None
            n = s.counter
            s.counter += 1
            self.stats["tx"] += 1
            if frame:
                self.last_tx = self._clock()
        hdr = _DATA.pack(MSG_DATA, s.remote, n)
        if not self.seal_frames:
            return hdr + frame
        return hdr + s.send.encrypt(_nonce(n), frame, hdr)

    def needs_handshake(self) -> bool:
        """Initiator: no session, or the current one is due for a rekey (and none is under way)."""
        now = self._clock()
        with self._lock:
            s = self.current
            if s is None:
                return now - self.last_init >= 1.0
            # The gateway answers traffic at least every KEEPALIVE_TIMEOUT; silence after
            # we sent means it lost the session (restarted): handshake again.
            due = (max(s.counter, s.window.top) >= self.rekey_after_messages
                   or now - s.created >= self.rekey_after_time
                   or self.last_tx - self.last_rx >= REHANDSHAKE_TIMEOUT)
            return due and (self._pending is None or now - self.last_init >= 1.0)

    def receive(self, dgram: bytes) -> tuple[bytes | None, bytes | None]:
        """(frame for the guest or None, datagram to send back or None); drops are counted."""
        t = dgram[0] if dgram else 0
        try:
            if t == MSG_DATA and len(dgram) >= DATA_HDR + (TAG if self.seal_frames else 0):
                frame = self._data(dgram)
                quiet = self._clock() - self.last_tx >= KEEPALIVE_TIMEOUT
                if not self.initiator and quiet and frame:
                    return frame, self.seal(b"")   # tell the core we still know its session
                return frame, None
            if t == MSG_INIT and len(dgram) == INIT_LEN and not self.initiator:
                with self._lock:
                    return None, self._respond(dgram)
            if t == MSG_RESP and len(dgram) == RESP_LEN and self.initiator:
                with self._lock:
                    self._complete(dgram)
                return None, self.seal(b"")        # keepalive: confirms the session
        except HandshakeError:
            self.stats["drop_handshake"] += 1
            return None, None
        self.stats["drop_malformed"] += 1
        return None, None

    def _data(self, dgram: bytes) -> bytes | None:
        _, idx, n = _DATA.unpack_from(dgram)
        hdr = dgram[:DATA_HDR]
        with self._lock:
            s = self.sessions.get(idx)
            if s is None:
                self.stats["drop_session"] += 1
                return None
            if self.replay_check and (n >= REJECT_AFTER_MESSAGES or not s.window.fresh(n)):
                self.stats["drop_replay"] += 1
                return None
        if self.seal_frames:
            try:
                frame = s.recv.decrypt(_nonce(n), dgram[DATA_HDR:], hdr)
            except InvalidTag:
                self.stats["drop_auth"] += 1
                return None
        else:
            frame = dgram[DATA_HDR:]
        with self._lock:
            if self.replay_check and not s.window.fresh(n):   # raced with a duplicate
                self.stats["drop_replay"] += 1
                return None
            s.window.mark(n)
            if self.next is s:                 # first DATA under a new session: switch
                self._install(s)
            s.confirmed = True
            self.stats["rx"] += 1
            self.last_rx = self._clock()
        if not frame:
            self.stats["keepalive"] += 1
            return None
        return frame


def self_test() -> None:
    """One handshake and a frame each way, in memory, with a throwaway key.

    Proves the primitives work, and loads every part of `cryptography` that is
    imported lazily, while the core may still open files (before seccomp).
    """
    key = os.urandom(32)
    i, r = Tunnel(key, initiator=True), Tunnel(key, initiator=False)
    _, resp = r.receive(i.initiate())
    _, confirm = i.receive(resp or b"")
    r.receive(confirm or b"")
    if r.receive(i.seal(b"ping") or b"")[0] != b"ping" or \
            i.receive(r.seal(b"pong") or b"")[0] != b"pong":
        raise RuntimeError("network tunnel self-test failed")

"""The two-step preboot stage: attest to the owner's broker, hand the keys to the core, exit.

BitVisor's two-step execution: this process does the security work before the
guest's first instruction, with the HTTP client (and TPM stack) the runtime
core must not carry, and is gone before the guest runs.  The core drives it:

  core -> preboot  {"vm", "broker"}            (or {"skip": true}: no attestation)
                   + {"tpm", "entries", "ak_pub", "ephemeral_pub"} with a TPM
  preboot -> core  {"nonce"} (+ {"root"} with a TPM)   after POST /v1/challenge
  core -> preboot  {"evidence", "signature"}   evidence signed with the core's AK
  preboot -> core  {"wrapped", "salt"} | {"error"}   after POST /v1/attest
The preboot stage never sees a key in the clear: the broker seals the keys to
the core's ephemeral key, and only the core opens them.

With a TPM (`tpm` is HOST:PORT, from the launcher's bundle): the launcher has
reset PCR 23 and extended its entries, and handed this process the host-wide
TPM lock (`--tpm-lock-fd`).  Here the core's entries (core-config, guest) are
extended too, so PCR 23 is the replay of the whole log; the quote's
qualifying data is sha256(nonce || ak_pub || ephemeral_pub); the lock is let
go right after the quote (or after LOCK_HOLD_MAX seconds, or at exit).
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading

from ..wire import bootchannel as channel

LOCK_HOLD_MAX = 60.0        # a VM created and not started lets other attested launches go
TEST_EXTEND = "SEALVM_PREBOOT_TEST_EXTEND"     # test only: "extra" | "twice" (a lying host)


def parse_args(argv: list[str]) -> tuple[int, int]:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(args) != len(argv) or "--core-fd" not in args or \
            not set(args) <= {"--core-fd", "--tpm-lock-fd"}:
        raise SystemExit("sealvm-preboot: usage: --core-fd=N [--tpm-lock-fd=N]")
    return int(args["--core-fd"]), int(args.get("--tpm-lock-fd", -1))


class TpmLock:
    """The launcher's flock on PCR 23, inherited as an fd; released once (quote, timer, exit)."""

    def __init__(self, fd: int):
        self.fd, self._mutex = fd, threading.Lock()
        if fd >= 0:
            timer = threading.Timer(LOCK_HOLD_MAX, self.release)
            timer.daemon = True
            timer.start()

    def release(self) -> None:
        with self._mutex:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _test_extend() -> str:
    if os.environ.get("SEALVM_TEST_MODE") != "1":
        return ""
    return os.environ.get(TEST_EXTEND, "")


def open_tpm(request: dict):
    """Connect to the TPM and extend the core's entries into PCR 23 (after the launcher's)."""
    from .tpm import Tpm
    host, _, port = str(request["tpm"]).rpartition(":")
    digests = [bytes.fromhex(e["digest"]) for e in request["entries"]]
    tpm = Tpm(host, int(port))
    try:
        how = _test_extend()
        if how == "twice" and digests:       # a host extending one entry a second time
            digests.insert(0, digests[0])
        for d in digests:
            tpm.extend(23, d)
        if how == "extra":                   # a host extending something unmeasured
            tpm.extend(23, hashlib.sha256(b"unmeasured host code").digest())
    except BaseException:
        tpm.close()
        raise
    return tpm


def run(core: socket.socket, lock: TpmLock | None = None) -> int:
    lock = lock or TpmLock(-1)
    request = channel.recv(core)
    if request.get("skip"):
        return 0
    from ..owner.client import BrokerRefused, BrokerUnavailable, attest
    from ..wire import attest as A
    try:
        tpm = open_tpm(request) if "tpm" in request else None
    except Exception as e:         # TpmError, a bad address or entry: no quote, no keys
        lock.release()
        channel.send(core, {"error": f"TPM: {e}"[:2000]})
        return 1

    def make_evidence(nonce: bytes) -> tuple[bytes, bytes]:
        answer = {"nonce": nonce.hex()}
        if tpm is not None:
            qd = A.qualifying_data(nonce, bytes.fromhex(request["ak_pub"]),
                                   bytes.fromhex(request["ephemeral_pub"]))
            try:
                answer["root"] = tpm.tpm_root(qd)
            finally:
                tpm.close()
                lock.release()
        channel.send(core, answer)
        answer = channel.recv(core)
        return answer["evidence"].encode(), bytes.fromhex(answer["signature"])

    try:
        wrapped, salt = attest(str(request["broker"]), str(request["vm"]), make_evidence)
    except (BrokerRefused, BrokerUnavailable, channel.ChannelError, KeyError, ValueError,
            RuntimeError) as e:
        channel.send(core, {"error": str(e)[:2000]})
        return 1
    finally:
        if tpm is not None:
            tpm.close()
        lock.release()
    channel.send(core, {"wrapped": wrapped.hex(), "salt": salt.hex()})
    return 0


def main(argv: list[str] | None = None) -> int:
    fd, lock_fd = parse_args(sys.argv[1:] if argv is None else argv)
    core = socket.socket(fileno=fd)
    lock = TpmLock(lock_fd)
    try:
        return run(core, lock)
    except channel.ChannelError:
        return 2
    finally:
        lock.release()
        core.close()

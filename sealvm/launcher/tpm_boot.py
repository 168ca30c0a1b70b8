"""The launcher's half of the TPM root: PCR 23 holds the measurement log, one launch at a time.

With `SEALVM_TPM=HOST:PORT` set, the launcher, after measuring a core and
before starting it, takes a host-wide lock (flock on LAUNCHER_DIR/tpm.lock),
resets PCR 23 and extends into it the digest of every entry it made (code
entries, then the attestation-key entry), in order.  The bundle then names
the TPM instead of carrying a software root; the core passes the address to
its preboot stage, which extends the core's own entries (core-config and
guest), quotes PCR 23 and only then lets the lock go.

The lock travels with the preboot stage: the launcher hands its locked file
descriptor to that process and closes its own copy, so the lock is released
when the preboot stage closes it after the quote, or exits (or after
preboot.main.LOCK_HOLD_MAX seconds, so a VM created and never started does not
hold every other attested launch up).  PCR 23 is reset per launch, so attested
launches are serialised host-wide.  The lock is for liveness only: a launch
that interleaves with another is refused by the broker (the quoted PCR is not
the replay of its log), never wrongly accepted, because the log holds that
VM's own attestation key.
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

ENV = "SEALVM_TPM"
PCR = 23
LOCK_FILE = "tpm.lock"
LOCK_WAIT = 75.0            # longer than the preboot stage may hold it (60 s)


class TpmBootError(Exception):
    """The TPM named by SEALVM_TPM cannot be used for this launch (the message says why)."""


def configured() -> str | None:
    """The TPM address `HOST:PORT` from SEALVM_TPM, or None (no TPM: software root)."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TpmBootError(f"{ENV}={text!r}: expected HOST:PORT, say 127.0.0.1:2321")
    return f"{host}:{int(port)}"


def split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def take_lock(directory: Path, wait: float = LOCK_WAIT) -> int:
    """An fd holding an exclusive flock on DIR/tpm.lock (close it to release)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise TpmBootError(f"another attested launch has held {directory / LOCK_FILE} "
                                   f"for over {wait:.0f} s (PCR 23 serves one launch at a time)")
            time.sleep(0.05)


def extend_launch(address: str, log: list[dict]) -> None:
    """Reset PCR 23 and extend every entry of `log` into it, in order; check the result."""
    from ..preboot.tpm import Tpm, TpmError
    from ..wire.attest import replay
    try:
        with Tpm(*split(address)) as tpm:
            tpm.reset_debug_pcr(PCR)
            for e in log:
                tpm.extend(PCR, bytes.fromhex(e["digest"]))
            value = tpm.read_pcr(PCR)
    except (TpmError, ValueError) as e:
        raise TpmBootError(f"TPM at {address}: {e}") from None
    if value != replay(log):
        raise TpmBootError(f"TPM at {address}: PCR {PCR} is not the replay of the launcher's log "
                           "(something else extended it meanwhile)")


def attestation_key(address: str) -> str:
    """The TPM's attestation key (DER SubjectPublicKeyInfo, hex) for the owner's policy."""
    from ..preboot.tpm import Tpm, TpmError
    try:
        with Tpm(*split(address)) as tpm:
            return tpm.attestation_key().hex()
    except TpmError as e:
        raise TpmBootError(f"TPM at {address}: {e}") from None

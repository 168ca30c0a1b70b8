"""The launcher's part of attestation: the boot bundle handed to each new core.

For every core it starts, the launcher measures the code the core will run
(measure.py), makes a fresh per-VM attestation key (Ed25519; never shared by
two cores, so a guest that escapes into one core cannot speak for another
VM), appends that key's entry to the log, and signs the log up to it with the
host's software root key.  The core receives the log, the key and the root
over a pipe only it holds; the host daemon never sees the key.

With SEALVM_TPM set, PCR 23 of that TPM takes the software root's place
(tpm_boot.py).  Without a TPM the evidence says "software" as its root, so a verifier always
knows no TPM vouched for it.  The host root key lives in a root-only file in
LAUNCHER_DIR (default /var/lib/sealvm-launcher, or $SEALVM_LAUNCHER_DIR).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

from ..wire.attest import ak_entry, core_measurement, sign_log, software_root
from .measure import measure_core

DEFAULT_DIR = "/var/lib/sealvm-launcher"
HOST_KEY = "host-root.key"


class BootKeyError(Exception):
    """The host root key cannot be used (its file is missing, unreadable or exposed)."""


def launcher_dir() -> Path:
    return Path(os.environ.get("SEALVM_LAUNCHER_DIR", DEFAULT_DIR))


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def host_root_key(directory: Path | None = None) -> Ed25519PrivateKey:
    """The host's software root key, created (0600, in a 0700 directory) on first use."""
    d = Path(directory or launcher_dir())
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / HOST_KEY
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_raw_private(Ed25519PrivateKey.generate()))
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO) or st.st_uid != os.geteuid():
        raise BootKeyError(f"{path}: mode {stat.S_IMODE(st.st_mode):o}, owner {st.st_uid}: the "
                           "host root key must be 0600 and owned by the launcher's user")
    data = path.read_bytes()
    if len(data) != 32:
        raise BootKeyError(f"{path}: expected a raw 32-byte Ed25519 key, found {len(data)} bytes")
    return Ed25519PrivateKey.from_private_bytes(data)


def boot_bundle(python: str, directory: Path | None = None, tpm: str | None = None) -> bytes:
    """JSON for a new core: its measured log, its attestation key and the signed root.

    With `tpm` (HOST:PORT; the caller holds tpm_boot's lock) the log goes into
    PCR 23 instead and the bundle names the TPM: the preboot stage quotes it."""
    ak = Ed25519PrivateKey.generate()
    log = measure_core(python)
    log.append(ak_entry(ak.public_key()))
    bundle = {"log": log, "ak": _raw_private(ak).hex()}
    if tpm is not None:
        from .tpm_boot import extend_launch
        extend_launch(tpm, log)
        bundle["tpm"] = tpm
    else:
        host = host_root_key(directory)
        bundle["root"] = software_root(host.public_key(), sign_log(host, log))
    return json.dumps(bundle).encode()


def describe(python: str, directory: Path | None = None) -> dict:
    """What an owner puts in policy for this host: its root key and the core measurement
    (and, with SEALVM_TPM set, the TPM's attestation key for `policy add tpm`)."""
    out = {"host_pub": _raw_public(host_root_key(directory).public_key()).hex(),
           "core_measurement": core_measurement(measure_core(python)).hex()}
    from .tpm_boot import attestation_key, configured
    tpm = configured()
    if tpm is not None:
        out["tpm_ak_pub"] = attestation_key(tpm)
    return out

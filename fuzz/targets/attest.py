"""Attestation evidence and key-release payloads (sealvm/wire/attest.py).

Byte 0 picks the parser, the rest is its input:
* 0: evidence.json bytes (parse_evidence: strict canonical JSON, fields, log order);
* 1: patches to valid evidence, re-signed with the attestation key (a core impostor
  with its own key): verify_evidence, then the log's restore/migration/config/guest
  values, as the broker reads them;
* 2: a release payload (parse_release), as the core reads what the broker wrapped;
* 3: wrapped keys (unwrap_keys for a fixed core key, salt and nonce);
* 4: a generation ticket/receipt (check_ticket, check_receipt);
* 5: a manifest (check_manifest on canonical JSON).
Refusal: AttestError.
"""
from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fuzz.target import Violation
from fuzz.targets import _evidence as E
from sealvm.wire import attest as A

MODULES = ["sealvm.wire.attest"]
EXPECTED = (A.AttestError,)
MAX_LEN = 8192
OWNER_WRAP = X25519PrivateKey.from_private_bytes(b"\4" * 32)
OWNER_PUB = OWNER_WRAP.public_key().public_bytes_raw()
SNAP = bytes(range(32))
NONCE = bytes(32)
base = b""


def setup() -> None:
    global base
    base = E.evidence(NONCE, OWNER_PUB)


def one(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 6, data[1:]
    if mode == 0:
        A.parse_evidence(rest)
    elif mode == 1:
        ev_bytes = E.patch(base, rest)
        ev = A.verify_evidence(ev_bytes, E.AK.sign(ev_bytes))
        A.restore_values(ev["log"])
        A.migrate_in_values(ev["log"])
        A.core_config(ev["log"])
        A.guest_values(ev["log"])
        A.core_measurement(ev["log"])
    elif mode == 2:
        keys, gen = A.parse_release(rest)
        if set(keys) != set(A.VM_KEY_NAMES) or any(len(v) != 32 for v in keys.values()) \
                or not 1 <= gen <= A.MAX_GENERATION:
            raise Violation(f"release payload accepted out of bounds: {keys}, {gen}")
    elif mode == 3:
        A.unwrap_keys(rest, bytes(32), E.EPH, NONCE, OWNER_PUB)
        raise Violation("wrapped keys the broker never made opened")
    elif mode == 4:
        t = A.check_ticket(SNAP, rest)
        A.check_receipt(SNAP, A.advance_receipt(SNAP, t), rest)
    else:
        A.check_manifest(A.loads_canonical(rest, "manifest"))


def seeds() -> list[bytes]:
    keys = A.canonical({k: "ab" * 32 for k in A.VM_KEY_NAMES})
    manifest = {"cmdline": "", "devices": ["rng"], "entry": "pvh", "image_sha256": "00" * 32,
                "memory_mib": 256, "min_core_version": 1, "name": "web1", "vcpus": 1,
                "version": 1}
    return [b"\0" + base, b"\1", b"\1" + (10).to_bytes(2, "little") + b"\1x",
            b"\2" + A.release_payload(keys, 3), b"\3" + bytes(80),
            b"\4" + A.advance_ticket(SNAP, "web1", 2, bytes(16), bytes(16)),
            b"\5" + A.canonical(manifest)]

"""Fleet evidence from a neighbour host's agent (sealvm/fleet/evidence.py: appraise).

Byte 0 picks the mode:
* 0: the rest is the evidence JSON as it arrives (unsigned or signed by anyone);
* 1: the rest is JSON for the measurement log; the harness plays a compromised host
  that holds its genuine agent key and TPM: it signs the body with the enrolled agent
  key and quotes (software P-256 AK, TPMS_ATTEST as the TPM marshals it) the PCR 23 that
  replaying that log gives, so the appraisal reaches the measurements themselves.
`appraise` never raises: every bad input is a "fail" verdict.  A pass needs every
measurement golden.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fuzz.target import Violation
from sealvm.fleet import evidence as FE
from sealvm.fleet.measure import measurement_digest
from sealvm.owner import tpm_verify as TV

MODULES = ["sealvm.fleet.evidence", "sealvm.fleet.measure", "sealvm.owner.tpm_verify"]
EXPECTED = ()
MAX_LEN = 8192
AGENT = Ed25519PrivateKey.from_private_bytes(b"\5" * 32)
AK = ec.derive_private_key(12345, ec.SECP256R1())
AK_DER = AK.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
NONCE = bytes(range(32))
GOLDEN = {"name": "h1", "agent_pub": AGENT.public_key().public_bytes_raw().hex(),
          "tpm_ak_pub": AK_DER.hex(), "uid_range": [100000, 165535],
          "values": {"code": "c" * 64, "config": "d" * 64}}


def _tpm2b(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def quote_root(log: list) -> dict:
    pcr = TV.replay_pcr([measurement_digest(m) for m in log])
    extra = FE.quote_data(NONCE, AK_DER, AGENT.public_key().public_bytes_raw())
    quote = (struct.pack(">IH", TV.TPM_GENERATED_VALUE, TV.TPM_ST_ATTEST_QUOTE) + _tpm2b(b"\0\x0b" + bytes(32))
             + _tpm2b(extra) + struct.pack(">QIIBQ", 1, 0, 0, 1, 0) + struct.pack(">IHB", 1, TV.TPM_ALG_SHA256, 3)
             + b"\0\0\x80" + _tpm2b(hashlib.sha256(pcr).digest()))
    sig = AK.sign(quote, ec.ECDSA(hashes.SHA256()))
    return {"kind": "tpm", "quote": quote.hex(), "quote_sig": sig.hex(), "tpm_ak_pub": AK_DER.hex(),
            "pcrs": {"23": pcr.hex()}}


def setup() -> None:
    pass


def one(data: bytes) -> None:
    if not data:
        return
    try:
        obj = json.loads(data[1:])
    except (ValueError, RecursionError):
        return                                   # the agent's HTTP client refuses non-JSON
    if data[0] % 2 == 0:
        ev = obj
    else:
        try:
            root = quote_root(obj if isinstance(obj, list) else [obj])
        except (TypeError, ValueError, RecursionError):
            return                               # the host could not have extended this log
        body = {"host": "h1", "nonce": NONCE.hex(), "agent_pub": GOLDEN["agent_pub"],
                "log": obj, "root": root}
        ev = FE.sign(AGENT, body)
    a = FE.appraise(ev, NONCE, GOLDEN, max_age=1e12)
    if a.verdict == "pass":
        t = a.latest.get("time", 0) if isinstance(a.latest, dict) else None
        if type(t) not in (int, float) or not math.isfinite(t):
            raise Violation(f"evidence passed with newest measurement time {t!r}")


def seeds() -> list[bytes]:
    m = {"code": "c" * 64, "config": "d" * 64, "cores": [{"pid": 5, "uid": 100001, "vm": "a"}],
         "time": 1.0}
    body = {"host": "h1", "nonce": NONCE.hex(), "agent_pub": GOLDEN["agent_pub"], "log": [m],
            "root": quote_root([m])}
    return [b"\1" + json.dumps([m]).encode(), b"\1" + json.dumps([m, {**m, "cores": []}]).encode(),
            b"\0" + json.dumps(FE.sign(AGENT, body)).encode(), b"\0{}"]

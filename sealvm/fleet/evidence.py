"""Evidence an agent gives a challenger, and the appraisal a neighbour makes of it.

Evidence (JSON), answered to `POST /v1/challenge {"nonce": hex}`:

    {"body": {"host": NAME, "nonce": hex, "agent_pub": hex (Ed25519 raw),
              "log": [measurement, ...],       every measurement since the agent started
              "root": {"kind": "tpm", "quote", "quote_sig", "tpm_ak_pub", "pcrs": {"23"}}},
     "sig": hex Ed25519 signature by the agent's key over canonical(body)}

The agent extends sha256(canonical(measurement)) into PCR 23 of its host's TPM for
every measurement it logs, and quotes PCR 23 with qualifying data
sha256(nonce || tpm_ak_pub || agent_pub). An appraiser therefore knows the log is
the whole log (replayed, it must give the quoted PCR), fresh (its nonce), from the
enrolled TPM (AK) and agent (key), and then checks every entry against the golden
values the controller keeps for that host.

Reports from an appraiser to the controller are signed by the appraiser's agent key
and carry a counter that only grows, so neither a host nor the network can make up
or replay a verdict.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (Encoding, NoEncryption, PrivateFormat,
                                                          PublicFormat)

from ..owner.tpm_verify import QuoteError, replay_pcr, verify_quote
from .measure import appraise_measurement, canonical, measurement_digest
from .testmode import test_disabled

PCR = 23
MAX_LOG = 100_000


def load_or_create_key(path) -> Ed25519PrivateKey:
    from pathlib import Path
    path = Path(path)
    if path.exists():
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(path.read_text().strip()))
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(raw.hex() + "\n")
    return key


def pub_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def sign(key: Ed25519PrivateKey, body: dict) -> dict:
    return {"body": body, "sig": key.sign(canonical(body)).hex()}


def signature_ok(signed: dict, pub: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(pub)).verify(
            bytes.fromhex(signed["sig"]), canonical(signed["body"]))
        return True
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False


def quote_data(nonce: bytes, ak_pub: bytes, agent_pub: bytes) -> bytes:
    return hashlib.sha256(nonce + ak_pub + agent_pub).digest()


@dataclass
class Appraisal:
    verdict: str                 # "pass" or "fail"
    reason: str
    latest: dict | None = None   # the newest measurement, when the evidence held one

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason}


def appraise(evidence: dict, nonce: bytes, golden: dict, max_age: float) -> Appraisal:
    """Check evidence answered to `nonce` against the host's golden record:
    {"name", "agent_pub", "tpm_ak_pub", "uid_range": [lo, hi], "values": {...}}."""
    def fail(reason: str, latest=None) -> Appraisal:
        return Appraisal("fail", reason, latest)
    if not isinstance(evidence, dict) or not isinstance(evidence.get("body"), dict):
        return fail("evidence is not a signed object")
    body = evidence["body"]
    agent_pub = golden["agent_pub"]
    if test_disabled("agent-key"):          # control: whatever key the evidence names
        agent_pub = str(body.get("agent_pub", ""))
    elif not signature_ok(evidence, agent_pub):
        return fail("signature: evidence is not signed by the host's enrolled agent key")
    if body.get("host") != golden["name"]:
        return fail(f"evidence names host {body.get('host')!r}, not {golden['name']!r}")
    try:
        got_nonce = bytes.fromhex(body.get("nonce", ""))
    except (TypeError, ValueError):
        return fail("nonce: not hex")
    if not test_disabled("nonce") and got_nonce != nonce:
        return fail("nonce: evidence answers another challenge (replayed or stale)")
    log = body.get("log")
    if not isinstance(log, list) or not log or len(log) > MAX_LOG:
        return fail("log: missing, empty or too long")
    try:
        pcr = replay_pcr([measurement_digest(m) for m in log])
        root = body.get("root")
        verify_quote(root, pcr, quote_data(got_nonce, bytes.fromhex(golden["tpm_ak_pub"]),
                                           bytes.fromhex(agent_pub)),
                     [golden["tpm_ak_pub"]])
    except QuoteError as e:
        return fail(f"quote: {e}")
    except (TypeError, ValueError, AttributeError) as e:
        return fail(f"quote: malformed evidence ({e})")
    latest = log[-1]
    uid_range = tuple(golden["uid_range"])
    for i, m in enumerate(log):
        problems = appraise_measurement(m, golden["values"], uid_range)
        if problems:
            return fail(f"measurement {i}: " + "; ".join(problems), latest)
    try:
        age = time.time() - float(latest.get("time", 0))
    except (TypeError, ValueError):
        return fail("time: the newest measurement carries no usable time", latest)
    if not age <= max_age and not test_disabled("stale"):      # NaN is no time either
        return fail(f"stale: newest measurement is {age:.1f} s old (agent stopped measuring)",
                    latest)
    return Appraisal("pass", f"{len(log)} measurements golden, quote verified", latest)

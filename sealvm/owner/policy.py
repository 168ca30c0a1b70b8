"""The owner's appraisal policy: what core code, which hosts and TPMs, which versions to trust.

`policy.json` is canonical JSON, 0600, with `policy.json.sig`, the owner's Ed25519
signature over its exact bytes (docs/attestation.md, "Policy"):

    {"version": 1, "core_measurements": [hex...], "min_core_version": int,
     "trusted_hosts": [hex(ed25519)...], "trusted_tpms": [hex(DER)...],
     "require_tpm": bool}

Every load checks the signature against the owner's own signing key and the structure
field by field, so a policy edited outside `sealvm owner policy` (or by someone
without the owner's key) is refused rather than trusted.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (Encoding, PublicFormat,
                                                          load_der_public_key, load_pem_public_key)

from ..wire import attest as A
from .keys import OwnerError, load_sign_key, write_file

POLICY_FILE = "policy.json"
POLICY_SIG = "policy.json.sig"
FIELDS = ("core_measurements", "min_core_version", "require_tpm", "trusted_hosts",
          "trusted_tpms", "version")
LISTS = {"core": "core_measurements", "host": "trusted_hosts", "tpm": "trusted_tpms"}
MAX_LIST = 1024


def default_policy() -> dict:
    """Trusts nothing yet: no core measurement, no host, no TPM."""
    return {"version": 1, "core_measurements": [], "min_core_version": 1, "trusted_hosts": [],
            "trusted_tpms": [], "require_tpm": False}


def _hex_list(value: Any, where: str, n: int | None) -> None:
    if type(value) is not list or len(value) > MAX_LIST:
        raise OwnerError(f"policy {where}: expected a list of at most {MAX_LIST} hex strings")
    for i, v in enumerate(value):
        try:
            A.check_hex(v, f"{where}[{i}]", n, max_n=A.MAX_TPM_FIELD)
        except A.AttestError as e:
            raise OwnerError(f"policy {e}") from None
    if len(set(value)) != len(value):
        raise OwnerError(f"policy {where}: has repeated entries")


def check_policy(p: Any) -> dict:
    """Raise OwnerError naming the field unless `p` is a well-formed policy."""
    if type(p) is not dict or set(p) != set(FIELDS):
        got = sorted(p) if type(p) is dict else type(p).__name__
        raise OwnerError(f"policy: expected exactly the fields {list(FIELDS)}, got {got}")
    if p["version"] != 1 or type(p["version"]) is not int:
        raise OwnerError(f"policy version: expected 1, got {p['version']!r}")
    if type(p["min_core_version"]) is not int or not 0 <= p["min_core_version"] < 1 << 31:
        raise OwnerError(f"policy min_core_version: not a version: {p['min_core_version']!r}")
    if type(p["require_tpm"]) is not bool:
        raise OwnerError(f"policy require_tpm: expected true or false, got {p['require_tpm']!r}")
    _hex_list(p["core_measurements"], "core_measurements", 32)
    _hex_list(p["trusted_hosts"], "trusted_hosts", 32)
    _hex_list(p["trusted_tpms"], "trusted_tpms", None)
    return p


def save_policy(directory: str | Path, policy: dict, sign_key: Ed25519PrivateKey) -> None:
    data = A.canonical(check_policy(policy))
    d = Path(directory)
    write_file(d / POLICY_FILE, data, 0o600, force=True)
    write_file(d / POLICY_SIG, sign_key.sign(data), 0o600, force=True)


def load_policy(directory: str | Path, sign_pub: Ed25519PublicKey | bytes | None = None) -> dict:
    """The verified policy; `sign_pub` defaults to the public half of DIR's signing key."""
    d = Path(directory)
    if sign_pub is None:
        sign_pub = load_sign_key(d).public_key()
    try:
        data, sig = (d / POLICY_FILE).read_bytes(), (d / POLICY_SIG).read_bytes()
    except OSError as e:
        raise OwnerError(f"{e.filename}: cannot read the signed policy: {e.strerror}") from None
    try:
        A.ed25519_verify(sign_pub, sig, data, "signature")
    except A.AttestError:
        raise OwnerError(f"{d / POLICY_FILE}: does not match its signature {POLICY_SIG} by the "
                         "owner key; edited outside `sealvm owner policy`? refusing it") from None
    try:
        return check_policy(A.loads_canonical(data, POLICY_FILE))
    except A.AttestError as e:
        raise OwnerError(f"{d / POLICY_FILE}: {e}") from None


def normalize(kind: str, value: str) -> str:
    """The policy's spelling of a core measurement, host key or TPM key given on the CLI.

    A TPM key may be hex DER or `@FILE` holding a DER or PEM public key."""
    if kind not in LISTS:
        raise OwnerError(f"unknown policy list {kind!r}: one of {', '.join(LISTS)}")
    if kind == "tpm":
        if value.startswith("@"):
            try:
                raw = Path(value[1:]).read_bytes()
            except OSError as e:
                raise OwnerError(f"{value[1:]}: {e.strerror}") from None
        else:
            try:
                raw = bytes.fromhex(value.strip())
            except ValueError:
                raise OwnerError("tpm: expected hex DER or @FILE (DER or PEM)") from None
        try:
            key = load_pem_public_key(raw) if raw.lstrip().startswith(b"-----") \
                else load_der_public_key(raw)
        except ValueError as e:
            raise OwnerError(f"tpm: not a public key: {e}") from None
        der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if len(der) > A.MAX_TPM_FIELD:
            raise OwnerError(f"tpm: key is {len(der)} bytes DER, at most {A.MAX_TPM_FIELD}")
        return der.hex()
    v = value.strip().lower()
    try:
        raw = bytes.fromhex(v)
    except ValueError:
        raise OwnerError(f"{kind}: {value!r} is not hex") from None
    if len(raw) != 32:
        raise OwnerError(f"{kind}: expected 32 bytes (64 hex digits), got {len(raw)} bytes")
    if kind == "host":
        try:
            Ed25519PublicKey.from_public_bytes(raw)
        except ValueError as e:
            raise OwnerError(f"host: not an Ed25519 public key: {e}") from None
    return v


def edit(directory: str | Path, action: str, kind: str = "", value: Any = None) -> dict:
    """Apply one change, re-sign, and return the new policy.

    action: "add"/"remove" (kind core|host|tpm, a value), "min-version" (an int),
    "require-tpm" (a bool)."""
    key = load_sign_key(directory)
    policy = load_policy(directory, key.public_key())
    if action in ("add", "remove"):
        field, item = LISTS.get(kind), normalize(kind, str(value))
        if action == "add":
            if item in policy[field]:
                raise OwnerError(f"{field} already lists {item[:16]}...")
            policy[field].append(item)
        else:
            if item not in policy[field]:
                raise OwnerError(f"{field} does not list {item[:16]}...")
            policy[field].remove(item)
    elif action == "min-version":
        policy["min_core_version"] = value
    elif action == "require-tpm":
        policy["require_tpm"] = value
    else:
        raise OwnerError(f"unknown policy action {action!r}")
    save_policy(directory, policy, key)
    return policy


def describe(policy: dict) -> str:
    """The policy for people: one item a line."""
    lines = [f"min_core_version: {policy['min_core_version']}",
             f"require_tpm: {'yes' if policy['require_tpm'] else 'no (software roots accepted)'}"]
    for kind, field in LISTS.items():
        lines.append(f"{field}: {len(policy[field])}")
        lines += [f"  {v if kind != 'tpm' else v[:32] + '... (' + str(len(v) // 2) + ' bytes DER)'}"
                  for v in policy[field]]
    return "\n".join(lines)

"""Attestation formats: canonical JSON, the measurement log, evidence, key release, manifests.

docs/attestation.md is the contract; this module is its one implementation, shared by
the trusted core (makes evidence, opens released keys), the launcher (measures and
signs the log), the preboot stage and the owner's key broker.  It is pure: standard
library and `cryptography` only, no files, no network.  Every check raises
`AttestError` naming the field that is wrong and how; nothing here is an `assert`.
Keys may be passed as `cryptography` key objects or as raw 32-byte public keys.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PCR = 23
MAX_EVIDENCE = 4 << 20          # bytes of evidence.json
MAX_LOG_ENTRIES = 20_000
MAX_NAME = 4096                 # characters in one log entry's name
MAX_TPM_FIELD = 4096            # bytes in a quote, its signature, a TPM AK's DER
MAX_WRAPPED = 64 << 10
MAX_MEMORY_MIB, MAX_VCPUS, MAX_CMDLINE = 1 << 20, 256, 4095
CODE_KINDS = ("interpreter", "core-file", "stdlib-file", "library-file", "pth-file")
GUEST_KINDS = ("guest-image", "guest-cmdline", "guest-config")
KINDS = CODE_KINDS + ("core-config", "attestation-key") + GUEST_KINDS + ("vm-restore",
                                                                          "vm-migrate-in")
ENTRY_MODES = ("pvh", "long", "linux")
RELEASE_INFO = b"sealvm key release v2"
VM_KEY_NAMES = ("disk", "net", "snapshot")
MANIFEST_FIELDS = ("cmdline", "devices", "entry", "image_sha256", "memory_mib",
                   "min_core_version", "name", "vcpus", "version")
VM_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEVICE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_HEX_RE = re.compile(r"[0-9a-f]*")

class AttestError(ValueError):
    """Evidence, a log, a manifest or a key blob failed a check; the message says which."""

def canonical(obj: Any) -> bytes:
    """The one byte form of `obj` that gets signed: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()

def linux_image_sha256(kernel: bytes, initrd: bytes | None) -> bytes:
    """A Linux guest's one measured image: its kernel and its initrd (none: empty) together."""
    return sha256(b"sealvm linux image v1\0" + sha256(kernel) + sha256(initrd or b""))

def _show(v: Any) -> str:
    return t if len(t := repr(v)) <= 40 else t[:37] + "..."

def _no_dups(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise AttestError(f"duplicate key {k!r}")
        out[k] = v
    return out

def _no_float(text: str) -> Any:
    raise AttestError(f"number {text[:20]!r} is not an integer")

def loads_canonical(data: bytes, what: str) -> Any:
    """Parse JSON that must be canonical: no duplicate keys, floats, NaN or other spellings."""
    if not isinstance(data, (bytes, bytearray)):
        raise AttestError(f"{what}: expected bytes, got {type(data).__name__}")
    try:
        obj = json.loads(bytes(data).decode("utf-8"), object_pairs_hook=_no_dups,
                         parse_float=_no_float, parse_constant=_no_float)
        again = canonical(obj)
    except (ValueError, RecursionError) as e:
        raise AttestError(f"{what}: not valid JSON: {e}") from None
    if again != data:
        raise AttestError(f"{what}: not in canonical form (sorted keys, no spaces, ASCII)")
    return obj

def check_hex(v: Any, where: str, n: int | None = None, max_n: int | None = None) -> bytes:
    if type(v) is not str:
        raise AttestError(f"{where}: expected a hex string, got {type(v).__name__}")
    if n is not None and len(v) != 2 * n:
        raise AttestError(f"{where}: expected {n} bytes ({2 * n} hex digits), got {len(v)} digits")
    if max_n is not None and len(v) > 2 * max_n:
        raise AttestError(f"{where}: at most {max_n} bytes, got {len(v) // 2}")
    if len(v) % 2 or not _HEX_RE.fullmatch(v):
        raise AttestError(f"{where}: not lowercase hex of whole bytes: {_show(v)}")
    return bytes.fromhex(v)

def _fields(obj: Any, keys: tuple[str, ...] | set[str], where: str) -> dict:
    if type(obj) is not dict:
        raise AttestError(f"{where}: expected an object, got {type(obj).__name__}")
    missing, extra = sorted(set(keys) - obj.keys()), sorted(obj.keys() - set(keys))
    if missing or extra:
        raise AttestError(f"{where}: missing fields {missing}, unexpected fields {extra}")
    return obj

def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise AttestError(f"{where}: expected an integer in [{lo}, {hi}], got {_show(v)}")
    return v

def _str(v: Any, where: str, max_len: int, pattern: re.Pattern | None = None) -> str:
    if type(v) is not str or len(v) > max_len or (pattern is not None and not pattern.fullmatch(v)):
        rule = f"matching {pattern.pattern}" if pattern is not None else f"<= {max_len} chars"
        raise AttestError(f"{where}: expected a string {rule}, got {_show(v)}")
    return v

def _raw(key: Any) -> bytes:
    if isinstance(key, (bytes, bytearray)):
        return bytes(key)
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)

def _pub(cls: type, key: Any, where: str) -> Any:
    """`key` as a public key of class `cls` (Ed25519PublicKey or X25519PublicKey)."""
    if isinstance(key, cls):
        return key
    try:
        return cls.from_public_bytes(bytes(key))
    except (ValueError, TypeError) as e:
        raise AttestError(f"{where}: not a {cls.__name__[:-9]} public key: {e}") from None

def ed25519_verify(pub: Any, sig: bytes, data: bytes, where: str) -> None:
    if not isinstance(sig, (bytes, bytearray)) or len(sig) != 64:
        raise AttestError(f"{where}: a signature is 64 bytes")
    try:
        _pub(Ed25519PublicKey, pub, where).verify(bytes(sig), data)
    except InvalidSignature:
        raise AttestError(f"{where} does not verify") from None

# ---- the measurement log -------------------------------------------------------------

def make_entry(kind: str, name: str, digest: bytes) -> dict:
    return check_entry({"pcr": PCR, "kind": kind, "name": name, "digest": digest.hex()}, "entry")

def data_entry(kind: str, text: str) -> dict:
    """An entry whose name is the measured data itself; digest = sha256(name)."""
    return make_entry(kind, text, sha256(text.encode()))

def check_entry(e: Any, where: str) -> dict:
    _fields(e, ("digest", "kind", "name", "pcr"), where)
    _int(e["pcr"], f"{where}.pcr", PCR, PCR)
    if e["kind"] not in KINDS:
        raise AttestError(f"{where}.kind: {_show(e['kind'])} is not one of {', '.join(KINDS)}")
    _str(e["name"], f"{where}.name", MAX_NAME)
    check_hex(e["digest"], f"{where}.digest", 32)
    return e

def check_log(entries: Any, where: str = "log") -> list:
    if type(entries) is not list:
        raise AttestError(f"{where}: expected a list, got {type(entries).__name__}")
    if len(entries) > MAX_LOG_ENTRIES:
        raise AttestError(f"{where}: {len(entries)} entries, at most {MAX_LOG_ENTRIES}")
    for i, e in enumerate(entries):
        check_entry(e, f"{where}[{i}]")
    return entries

def replay(entries: list) -> bytes:
    """PCR 23 after extending it from zero with every entry's digest in order."""
    pcr = bytes(32)
    for e in check_log(entries):
        pcr = sha256(pcr + bytes.fromhex(e["digest"]))
    return pcr

def core_measurement(entries: list) -> bytes:
    """The replayed value over the code entries only (interpreter, core/stdlib/pth files)."""
    return replay([e for e in check_log(entries) if e["kind"] in CODE_KINDS])

def ak_entry(ak_pub: Any) -> dict:
    return make_entry("attestation-key", "ed25519", sha256(_raw(ak_pub)))

def core_config_entry(core_version: int, owner_wrap_pub: Any) -> dict:
    return data_entry("core-config", canonical(
        {"core_version": core_version, "owner_wrap": _raw(owner_wrap_pub).hex()}).decode())

def guest_config(memory_mib: int, vcpus: int, entry: str, devices: list[str]) -> dict:
    """The guest-config object, checked, devices sorted and without repeats."""
    _int(memory_mib, "memory_mib", 1, MAX_MEMORY_MIB)
    _int(vcpus, "vcpus", 1, MAX_VCPUS)
    if entry not in ENTRY_MODES:
        raise AttestError(f"entry: {_show(entry)} is not one of {', '.join(ENTRY_MODES)}")
    if type(devices) is not list or len(devices) > 32:
        raise AttestError(f"devices: expected a list of at most 32 names, got {_show(devices)}")
    for d in devices:
        _str(d, "devices[]", 32, DEVICE_RE)
    return {"devices": sorted(set(devices)), "entry": entry, "memory_mib": memory_mib,
            "vcpus": vcpus}

def guest_entries(image_sha256: bytes, cmdline: str, memory_mib: int, vcpus: int, entry: str,
                  devices: list[str]) -> list[dict]:
    _str(cmdline, "cmdline", MAX_CMDLINE)
    return [make_entry("guest-image", "image", image_sha256),
            data_entry("guest-cmdline", cmdline),
            data_entry("guest-config", canonical(guest_config(memory_mib, vcpus, entry,
                                                              devices)).decode())]

def _single(entries: list, kind: str) -> tuple[int, dict]:
    found = [(i, e) for i, e in enumerate(entries) if e["kind"] == kind]
    if len(found) != 1:
        raise AttestError(f"log: expected exactly one {kind} entry, found {len(found)}")
    return found[0]

def _data(e: dict, kind: str) -> Any:
    if sha256(e["name"].encode()) != bytes.fromhex(e["digest"]):
        raise AttestError(f"log: the {kind} entry's digest is not sha256 of its name")
    try:
        return json.loads(e["name"], object_pairs_hook=_no_dups, parse_float=_no_float,
                          parse_constant=_no_float) if kind != "guest-cmdline" else e["name"]
    except (ValueError, RecursionError) as err:
        raise AttestError(f"log: the {kind} entry's name is not JSON: {err}") from None

def core_config(entries: list) -> dict:
    """{"core_version": int, "owner_wrap": bytes} from the one core-config entry."""
    cfg = _fields(_data(_single(check_log(entries), "core-config")[1], "core-config"),
                  ("core_version", "owner_wrap"), "log core-config")
    return {"core_version": _int(cfg["core_version"], "core-config.core_version", 0, 1 << 31),
            "owner_wrap": check_hex(cfg["owner_wrap"], "core-config.owner_wrap", 32)}

def guest_values(entries: list) -> dict:
    """image_sha256 (hex), cmdline, memory_mib, vcpus, entry, devices as the log measured them."""
    check_log(entries)
    cfg = _fields(_data(_single(entries, "guest-config")[1], "guest-config"),
                  ("devices", "entry", "memory_mib", "vcpus"), "log guest-config")
    guest_config(cfg["memory_mib"], cfg["vcpus"], cfg["entry"], cfg["devices"])
    return {"image_sha256": _single(entries, "guest-image")[1]["digest"],
            "cmdline": _data(_single(entries, "guest-cmdline")[1], "guest-cmdline"), **cfg}

# ---- the software root: the launcher's host key signs the log up to the AK entry -------

def log_prefix_digest(entries: list) -> bytes:
    i, _ = _single(check_log(entries), "attestation-key")
    return sha256(canonical(entries[: i + 1]))

def sign_log(host_private: Ed25519PrivateKey, entries: list) -> bytes:
    return host_private.sign(log_prefix_digest(entries))

def verify_log_sig(host_pub: Any, entries: list, sig: bytes) -> None:
    ed25519_verify(host_pub, sig, log_prefix_digest(entries), "log signature by host_pub")

def software_root(host_pub: Any, log_sig: bytes) -> dict:
    return {"kind": "software", "host_pub": _raw(host_pub).hex(), "log_sig": bytes(log_sig).hex()}

# ---- evidence --------------------------------------------------------------------------

EVIDENCE_FIELDS = ("ak_pub", "ephemeral_pub", "log", "nonce", "root", "version", "vm")

def _check_root(root: Any) -> None:
    kind = root.get("kind") if type(root) is dict else None
    if kind == "software":
        _fields(root, ("host_pub", "kind", "log_sig"), "root")
        check_hex(root["host_pub"], "root.host_pub", 32)
        check_hex(root["log_sig"], "root.log_sig", 64)
    elif kind == "tpm":
        _fields(root, ("kind", "pcrs", "quote", "quote_sig", "tpm_ak_pub"), "root")
        for f in ("quote", "quote_sig", "tpm_ak_pub"):
            check_hex(root[f], f"root.{f}", max_n=MAX_TPM_FIELD)
        check_hex(_fields(root["pcrs"], ("23",), "root.pcrs")["23"], "root.pcrs.23", 32)
    else:
        raise AttestError(f"root.kind: expected 'software' or 'tpm', got {_show(kind)}")

def check_evidence(ev: Any) -> dict:
    """Structure of an evidence object, and its log's order: code before the AK entry."""
    _fields(ev, EVIDENCE_FIELDS, "evidence")
    _int(ev["version"], "version", 1, 1)
    _str(ev["vm"], "vm", 63, VM_NAME_RE)
    check_hex(ev["nonce"], "nonce", 32)
    ak_pub = check_hex(ev["ak_pub"], "ak_pub", 32)
    check_hex(ev["ephemeral_pub"], "ephemeral_pub", 32)
    log = check_log(ev["log"])
    _check_root(ev["root"])
    i, ak = _single(log, "attestation-key")
    if bytes.fromhex(ak["digest"]) != sha256(ak_pub):
        raise AttestError(f"log[{i}]: the attestation-key entry is not sha256(ak_pub)")
    # Code entries precede the AK entry (the launcher measured them before the core
    # existed); core-config and guest entries follow it: the measured core records them
    # and the AK's signature over the evidence covers them.
    late = [j for j, e in enumerate(log[i:], i) if e["kind"] in CODE_KINDS]
    if late:
        raise AttestError(f"log[{late[0]}]: code entries must precede the "
                          f"attestation-key entry (log[{i}])")
    return ev

def parse_evidence(data: bytes) -> dict:
    """Structure only (bounded size, canonical JSON, strict fields); no signature check."""
    if not isinstance(data, (bytes, bytearray)) or len(data) > MAX_EVIDENCE:
        raise AttestError(f"evidence: at most {MAX_EVIDENCE} bytes, got "
                          f"{len(data) if isinstance(data, (bytes, bytearray)) else '?'}")
    return check_evidence(loads_canonical(bytes(data), "evidence"))

def check_evidence_signature(data: bytes, evidence: dict, signature: bytes) -> None:
    ed25519_verify(bytes.fromhex(evidence["ak_pub"]), signature, bytes(data),
               "evidence signature by ak_pub")

def verify_evidence(data: bytes, signature: bytes) -> dict:
    """Parse evidence and check the attestation key's signature over its exact bytes."""
    ev = parse_evidence(data)
    check_evidence_signature(data, ev, signature)
    return ev

def make_evidence(vm: str, nonce: bytes, log: list, ak_private: Ed25519PrivateKey,
                  ephemeral_pub: Any, root: dict) -> tuple[bytes, bytes]:
    """(evidence.json bytes, Ed25519 signature by the AK); refuses to make malformed evidence."""
    ev = {"version": 1, "vm": vm, "nonce": bytes(nonce).hex(), "log": log,
          "ak_pub": _raw(ak_private.public_key()).hex(),
          "ephemeral_pub": _raw(ephemeral_pub).hex(), "root": root}
    data = canonical(check_evidence(ev))
    if len(data) > MAX_EVIDENCE:
        raise AttestError(f"evidence: {len(data)} bytes, at most {MAX_EVIDENCE}")
    return data, ak_private.sign(data)

def qualifying_data(nonce: bytes, ak_pub: bytes, ephemeral_pub: bytes) -> bytes:
    """What a TPM quote's extraData must be: sha256(nonce || ak_pub || ephemeral_pub)."""
    return sha256(bytes(nonce) + bytes(ak_pub) + bytes(ephemeral_pub))

# ---- key release -------------------------------------------------------------------------

def _release_aead(ikm: bytes, salt: bytes, nonce: bytes, core_pub: bytes, broker_pub: bytes,
                  owner_pub: bytes) -> AESGCM:
    info = RELEASE_INFO + nonce + core_pub + broker_pub + owner_pub
    return AESGCM(HKDF(hashes.SHA256(), 32, salt, info).derive(ikm))

def wrap_keys(payload: bytes, core_ephemeral_pub: Any, nonce: bytes,
              owner_wrap_private: X25519PrivateKey) -> tuple[bytes, bytes]:
    """Seal to the core's ephemeral key with the owner's wrap key: (broker pub || ct, salt)."""
    core_pub = _pub(X25519PublicKey, core_ephemeral_pub, "core ephemeral key")
    if len(nonce := bytes(nonce)) != 32:
        raise AttestError("nonce: expected 32 bytes")
    eph, salt = X25519PrivateKey.generate(), secrets.token_bytes(32)
    try:
        ikm = eph.exchange(core_pub) + owner_wrap_private.exchange(core_pub)
    except ValueError as e:
        raise AttestError(f"core ephemeral key is unusable (low order?): {e}") from None
    broker_pub, core_raw = _raw(eph.public_key()), _raw(core_pub)
    aead = _release_aead(ikm, salt, nonce, core_raw, broker_pub,
                         _raw(owner_wrap_private.public_key()))
    return broker_pub + aead.encrypt(bytes(12), bytes(payload), nonce + core_raw), salt

def unwrap_keys(wrapped: bytes, salt: bytes, core_ephemeral_private: X25519PrivateKey,
                nonce: bytes, owner_wrap_pub: Any) -> bytes:
    """Open what `wrap_keys` sealed; fails unless made for this key, nonce and owner."""
    wrapped, salt, nonce = bytes(wrapped), bytes(salt), bytes(nonce)
    if not 32 + 16 <= len(wrapped) <= MAX_WRAPPED:
        raise AttestError(f"wrapped keys: {len(wrapped)} bytes, expected 48..{MAX_WRAPPED}")
    if len(salt) != 32 or len(nonce) != 32:
        raise AttestError("wrapped keys: salt and nonce are 32 bytes each")
    broker_pub = _pub(X25519PublicKey, wrapped[:32], "wrapped keys: broker ephemeral key")
    owner = _pub(X25519PublicKey, owner_wrap_pub, "owner wrap key")
    try:
        ikm = core_ephemeral_private.exchange(broker_pub) + core_ephemeral_private.exchange(owner)
    except ValueError as e:
        raise AttestError(f"wrapped keys: unusable broker ephemeral key: {e}") from None
    core_raw = _raw(core_ephemeral_private.public_key())
    aead = _release_aead(ikm, salt, nonce, core_raw, wrapped[:32], _raw(owner))
    try:
        return aead.decrypt(bytes(12), wrapped[32:], nonce + core_raw)
    except InvalidTag:
        raise AttestError("wrapped keys do not open: not sealed by the owner's broker for this "
                          "core's ephemeral key and nonce, or altered on the way") from None

def parse_vm_keys(payload: bytes) -> dict[str, bytes]:
    """keys.json -> {"disk", "net", "snapshot"}: 32 bytes each."""
    keys = _fields(loads_canonical(payload, "keys.json"), VM_KEY_NAMES, "keys.json")
    return {k: check_hex(keys[k], f"keys.json {k}", 32) for k in VM_KEY_NAMES}

# ---- generations: which copy of a VM is the newest (docs/snapshots.md) --------------------

MAX_GENERATION = (1 << 63) - 1
_SET_RE = re.compile(r"[0-9a-f]{32}")

def release_payload(keys_json: bytes, generation: int) -> bytes:
    """What the broker wraps: the VM's keys and the generation the released core runs as."""
    keys = parse_vm_keys(keys_json)
    return canonical({**{k: v.hex() for k, v in keys.items()},
                      "generation": _int(generation, "generation", 1, MAX_GENERATION)})

def parse_release(payload: bytes) -> tuple[dict[str, bytes], int]:
    obj = _fields(loads_canonical(payload, "released keys"), VM_KEY_NAMES + ("generation",),
                  "released keys")
    generation = _int(obj.pop("generation"), "released generation", 1, MAX_GENERATION)
    return parse_vm_keys(canonical(obj)), generation

def restore_entry(generation: int, set_id: bytes) -> dict:
    """The log entry of a core that restores snapshot `set_id` of `generation`."""
    return data_entry("vm-restore", canonical({"generation": generation,
                                               "set": bytes(set_id).hex()}).decode())

def restore_values(entries: list) -> dict | None:
    """{"generation", "set"} of the one vm-restore entry, or None for a fresh boot."""
    if not any(e["kind"] == "vm-restore" for e in check_log(entries)):
        return None
    r = _fields(_data(_single(entries, "vm-restore")[1], "vm-restore"), ("generation", "set"),
                "log vm-restore")
    return {"generation": _int(r["generation"], "vm-restore.generation", 1, MAX_GENERATION),
            "set": _str(r["set"], "vm-restore.set", 32, _SET_RE)}

def migrate_in_entry(generation: int) -> dict:
    """The log entry of a core that takes over a migrating VM now at `generation`."""
    return data_entry("vm-migrate-in", canonical({"generation": generation}).decode())

def migrate_in_values(entries: list) -> dict | None:
    if not any(e["kind"] == "vm-migrate-in" for e in check_log(entries)):
        return None
    r = _fields(_data(_single(entries, "vm-migrate-in")[1], "vm-migrate-in"), ("generation",),
                "log vm-migrate-in")
    return {"generation": _int(r["generation"], "vm-migrate-in.generation", 1, MAX_GENERATION)}

def _generation_mac(snapshot_key: bytes, label: bytes, body: bytes) -> bytes:
    key = HKDF(hashes.SHA256(), 32, None, b"sealvm generation v1").derive(bytes(snapshot_key))
    return hmac.new(key, label + b"\0" + body, hashlib.sha256).digest()

def _signed(snapshot_key: bytes, label: bytes, obj: dict) -> bytes:
    body = canonical(obj)
    return canonical({"body": body.decode(), "mac": _generation_mac(snapshot_key, label,
                                                                   body).hex()})

def _open_signed(snapshot_key: bytes, label: bytes, data: bytes, fields: tuple) -> dict:
    outer = _fields(loads_canonical(bytes(data), label.decode()), ("body", "mac"), label.decode())
    body = _str(outer["body"], f"{label.decode()}.body", 1024).encode()
    mac = check_hex(outer["mac"], f"{label.decode()}.mac", 32)
    if not hmac.compare_digest(mac, _generation_mac(snapshot_key, label, body)):
        raise AttestError(f"{label.decode()}: MAC does not verify (not made with this VM's key)")
    obj = _fields(loads_canonical(body, label.decode()), fields, label.decode())
    _str(obj["vm"], f"{label.decode()}.vm", 63, VM_NAME_RE)
    _str(obj["set"], f"{label.decode()}.set", 32, _SET_RE)
    _str(obj["nonce"], f"{label.decode()}.nonce", 32, _SET_RE)
    return obj

def advance_ticket(snapshot_key: bytes, vm: str, current: int, set_id: bytes,
                   nonce: bytes) -> bytes:
    """The core asks the broker to make snapshot `set_id` generation current+1."""
    return _signed(snapshot_key, b"ticket", {"vm": vm, "from": current, "to": current + 1,
                                             "set": bytes(set_id).hex(), "nonce": nonce.hex()})

def check_ticket(snapshot_key: bytes, data: bytes) -> dict:
    t = _open_signed(snapshot_key, b"ticket", data, ("vm", "from", "to", "set", "nonce"))
    _int(t["from"], "ticket.from", 1, MAX_GENERATION - 1)
    if t["to"] != t["from"] + 1:
        raise AttestError("ticket: 'to' must be 'from' + 1")
    return t

def advance_receipt(snapshot_key: bytes, ticket: dict) -> bytes:
    """The broker's answer: the ticket's snapshot is now the newest generation."""
    return _signed(snapshot_key, b"receipt", {k: ticket[k] for k in ("vm", "to", "set", "nonce")})

def check_receipt(snapshot_key: bytes, data: bytes, ticket: bytes) -> int:
    """The new generation, if `data` is the broker's receipt for exactly `ticket`."""
    r = _open_signed(snapshot_key, b"receipt", data, ("vm", "to", "set", "nonce"))
    t = json.loads(json.loads(ticket)["body"])
    if any(r[k] != t[k] for k in r):
        raise AttestError("receipt: answers another ticket")
    return r["to"]

# ---- manifests -----------------------------------------------------------------------------

def check_manifest(m: Any) -> dict:
    _fields(m, MANIFEST_FIELDS, "manifest")
    _int(m["version"], "manifest.version", 1, 1)
    _str(m["name"], "manifest.name", 63, VM_NAME_RE)
    check_hex(m["image_sha256"], "manifest.image_sha256", 32)
    _str(m["cmdline"], "manifest.cmdline", MAX_CMDLINE)
    _int(m["min_core_version"], "manifest.min_core_version", 0, 1 << 31)
    if guest_config(m["memory_mib"], m["vcpus"], m["entry"], m["devices"])["devices"] \
            != m["devices"]:
        raise AttestError("manifest.devices: must be sorted and without repeats")
    return m

def manifest_bytes(manifest: dict) -> bytes:
    return canonical(check_manifest(manifest))

def sign_manifest(private: Ed25519PrivateKey, manifest: dict) -> bytes:
    return private.sign(manifest_bytes(manifest))

def verify_manifest(pub: Any, data: bytes, sig: bytes) -> dict:
    """Check the owner's signature over the exact bytes, then the manifest's structure."""
    ed25519_verify(pub, sig, bytes(data), "manifest signature by the owner key")
    return check_manifest(loads_canonical(bytes(data), "manifest"))

def compare_manifest(manifest: dict, image_sha256: str | bytes, cmdline: str, memory_mib: int,
                     vcpus: int, entry: str, devices: list[str]) -> list[str]:
    """One line per item that differs from the signed manifest, each starting with its name."""
    image = image_sha256.hex() if isinstance(image_sha256, (bytes, bytearray)) else image_sha256
    got = {"image_sha256": image, "cmdline": cmdline, "memory_mib": memory_mib, "vcpus": vcpus,
           "entry": entry,
           "devices": sorted(set(devices)) if isinstance(devices, list) else devices}
    return [f"{k}: signed {_show(manifest.get(k))}, measured {_show(v)}"
            for k, v in got.items() if manifest.get(k) != v]

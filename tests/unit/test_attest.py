"""sealvm.wire.attest: canonical JSON, log replay, evidence, key release and manifests.

Every malformed-evidence class is built by changing one thing in good evidence and
signing the result again with the right attestation key, so the refusal comes from
the structure check and not from the signature; `test_good_evidence_passes` is the
paired control for all of them.
"""
from __future__ import annotations

import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealvm.wire import attest as A


def h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def pub(key) -> bytes:
    return A._raw(key.public_key())


HOST = Ed25519PrivateKey.generate()
AK = Ed25519PrivateKey.generate()
OWNER_WRAP = X25519PrivateKey.generate()
NONCE = bytes(range(32))


def make_log(ak=AK, image=b"guest image", cmdline="console=hvc0") -> list[dict]:
    return [A.make_entry("interpreter", "/usr/bin/python3", h(b"python")),
            A.make_entry("core-file", "sealvm/core/main.py", h(b"main")),
            A.make_entry("stdlib-file", "json/__init__.py", h(b"json")),
            A.core_config_entry(1, OWNER_WRAP.public_key()),
            A.ak_entry(ak.public_key()),
            *A.guest_entries(h(image), cmdline, 256, 1, "pvh", ["rng"])]


def good_dict() -> dict:
    log = make_log()
    eph = X25519PrivateKey.generate()
    data, _ = A.make_evidence("web1", NONCE, log, AK, eph.public_key(),
                              A.software_root(HOST.public_key(), A.sign_log(HOST, log)))
    return json.loads(data)


# ---- canonical JSON and replay -------------------------------------------------------

def test_canonical_json_is_stable():
    assert A.canonical({"b": 1, "a": [1, "é", {"z": None, "y": True}]}) == \
        b'{"a":[1,"\\u00e9",{"y":true,"z":null}],"b":1}'
    assert A.canonical({"x": 1, "a": 2}) == A.canonical({"a": 2, "x": 1})
    with pytest.raises(ValueError):
        A.canonical({"x": float("nan")})


@pytest.mark.parametrize("text, why", [
    (b'{"a": 1}', "canonical"), (b'{"a":1,"a":2}', "duplicate"), (b'{"a":1.5}', "integer"),
    (b'{"a":NaN}', "integer"), (b'\xff', "JSON"), (b'[' * 100000, "JSON")])
def test_loads_canonical_refuses(text, why):
    with pytest.raises(A.AttestError, match=why):
        A.loads_canonical(text, "x")


def test_replay_and_core_measurement_vectors():
    log = [A.make_entry("interpreter", "/usr/bin/python3", h(b"a")),
           A.make_entry("guest-image", "image", h(b"b")),
           A.make_entry("core-file", "x.py", h(b"c"))]
    assert A.replay([]) == bytes(32)
    pcr = bytes(32)
    for d in (h(b"a"), h(b"b"), h(b"c")):
        pcr = h(pcr + d)
    assert A.replay(log) == pcr
    assert pcr.hex() == "202baab0d9ef5820d6d9c8d82fb5c7a18bb9fa436d42bc0961ed55c3f3f36b17"
    core = A.core_measurement(log)
    assert core == h(h(bytes(32) + h(b"a")) + h(b"c"))
    assert core.hex() == "1a918d3c87f4707d9edcd2d6a2f4d6f9acd72e2409868d42d08feaebcdefce64"
    assert A.core_measurement(log[::-1]) != core, "order must matter"
    assert A.core_measurement(log + [A.make_entry("guest-cmdline", "x", h(b"x"))]) == core


def test_entry_helpers_round_trip():
    log = make_log()
    assert A.core_config(log) == {"core_version": 1, "owner_wrap": pub(OWNER_WRAP)}
    assert A.guest_values(log) == {"image_sha256": h(b"guest image").hex(),
                                   "cmdline": "console=hvc0", "memory_mib": 256, "vcpus": 1,
                                   "entry": "pvh", "devices": ["rng"]}
    bad = [dict(e) for e in log]
    bad[-2]["name"] = "console=hvc0 init=/bin/sh"          # digest no longer sha256(name)
    with pytest.raises(A.AttestError, match="digest is not sha256 of its name"):
        A.guest_values(bad)
    with pytest.raises(A.AttestError, match="exactly one guest-config"):
        A.guest_values(log[:-1])


# ---- software root ---------------------------------------------------------------------

def test_log_signature_covers_entries_up_to_the_ak_entry():
    log = make_log()
    sig = A.sign_log(HOST, log)
    A.verify_log_sig(HOST.public_key(), log, sig)
    A.verify_log_sig(pub(HOST), log, sig)
    altered = [dict(e) for e in log]
    altered[1]["digest"] = h(b"evil").hex()
    with pytest.raises(A.AttestError, match="log signature by host_pub does not verify"):
        A.verify_log_sig(HOST.public_key(), altered, sig)
    with pytest.raises(A.AttestError, match="does not verify"):
        A.verify_log_sig(Ed25519PrivateKey.generate().public_key(), log, sig)
    other_ak = [dict(e) for e in log]
    other_ak[4] = A.ak_entry(Ed25519PrivateKey.generate().public_key())
    with pytest.raises(A.AttestError, match="does not verify"):
        A.verify_log_sig(HOST.public_key(), other_ak, sig)
    with pytest.raises(A.AttestError, match="exactly one attestation-key"):
        A.sign_log(HOST, log[:4])


# ---- evidence ------------------------------------------------------------------------------

def test_good_evidence_passes():
    d = good_dict()
    data = A.canonical(d)
    ev = A.verify_evidence(data, AK.sign(data))
    assert ev == d and ev["root"]["kind"] == "software"


def test_evidence_round_trip_and_tpm_root_shape():
    eph = X25519PrivateKey.generate()
    root = {"kind": "tpm", "quote": "ff54", "quote_sig": "3045", "tpm_ak_pub": "3059",
            "pcrs": {"23": A.replay(make_log()).hex()}}
    data, sig = A.make_evidence("vm-2", NONCE, make_log(), AK, eph.public_key(), root)
    ev = A.verify_evidence(data, sig)
    assert (ev["vm"], ev["nonce"], ev["ephemeral_pub"]) == ("vm-2", NONCE.hex(), pub(eph).hex())
    assert A.qualifying_data(NONCE, pub(AK), pub(eph)) == h(NONCE + pub(AK) + pub(eph))


def _set(path: str, value):
    def change(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is KeyError:
            del d[last]
        elif isinstance(d, list):
            d[int(last)] = value
        else:
            d[last] = value
    return change


MALFORMED = {
    "nonce-uppercase-hex": (_set("nonce", NONCE.hex().upper()), "nonce: not lowercase hex"),
    "nonce-not-hex": (_set("nonce", "zz" * 32), "nonce: not lowercase hex"),
    "nonce-odd-length": (_set("nonce", "a" * 63), "nonce: expected 32 bytes"),
    "nonce-short": (_set("nonce", "00" * 31), "nonce: expected 32 bytes"),
    "ak-pub-long": (_set("ak_pub", "00" * 33), "ak_pub: expected 32 bytes"),
    "ephemeral-short": (_set("ephemeral_pub", "00" * 16), "ephemeral_pub: expected 32"),
    "log-sig-short": (_set("root.log_sig", "00" * 63), "root.log_sig: expected 64 bytes"),
    "host-pub-int": (_set("root.host_pub", 5), "root.host_pub: expected a hex string"),
    "digest-short": (_set("log.0.digest", "00" * 31), r"log\[0\].digest: expected 32"),
    "missing-field": (_set("ephemeral_pub", KeyError), "missing fields \\['ephemeral_pub'\\]"),
    "extra-field": (_set("extra", 1), "unexpected fields \\['extra'\\]"),
    "extra-root-field": (_set("root.quote", "00"), "root: missing fields \\[\\], unexpected"),
    "extra-entry-field": (_set("log.0.note", "x"), r"log\[0\]: missing fields \[\], unexpected"),
    "version-string": (_set("version", "1"), "version: expected an integer"),
    "version-2": (_set("version", 2), "version: expected an integer in \\[1, 1\\]"),
    "pcr-bool": (_set("log.0.pcr", True), r"log\[0\].pcr"),
    "pcr-22": (_set("log.0.pcr", 22), r"log\[0\].pcr"),
    "unknown-kind": (_set("log.0.kind", "kernel"), r"log\[0\].kind: 'kernel' is not one of"),
    "name-too-long": (_set("log.0.name", "x" * 4097), r"log\[0\].name"),
    "bad-vm-name": (_set("vm", "../etc"), "vm: expected a string matching"),
    "root-kind": (_set("root.kind", "sgx"), "root.kind: expected 'software' or 'tpm'"),
    "log-not-list": (_set("log", {}), "log: expected a list"),
    "ak-entry-mismatch": (_set("ak_pub", pub(Ed25519PrivateKey.generate()).hex()),
                          "attestation-key entry is not sha256\\(ak_pub\\)"),
    "no-ak-entry": (_set("log.4", A.make_entry("guest-image", "image", bytes(32))),
                    "exactly one attestation-key entry, found 0"),
    "code-after-ak": (_set("log.5", A.make_entry("core-file", "late.py", bytes(32))),
                      "must precede the attestation-key entry"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_evidence_is_refused(case):
    change, why = MALFORMED[case]
    d = good_dict()
    change(d)
    data = A.canonical(d)
    with pytest.raises(A.AttestError, match=why):
        A.verify_evidence(data, AK.sign(data))


def test_malformed_encodings_are_refused():
    d = good_dict()
    data = A.canonical(d)
    spaced = json.dumps(d, sort_keys=True).encode()
    with pytest.raises(A.AttestError, match="canonical form"):
        A.verify_evidence(spaced, AK.sign(spaced))
    dup = data[:-1] + b',"vm":"web1"}'
    with pytest.raises(A.AttestError, match="duplicate key"):
        A.verify_evidence(dup, AK.sign(dup))
    big = data + b" " * (A.MAX_EVIDENCE - len(data) + 1)
    with pytest.raises(A.AttestError, match="at most 4194304 bytes"):
        A.parse_evidence(big)
    d["log"] = d["log"] * (A.MAX_LOG_ENTRIES // len(d["log"]) + 1)
    many = A.canonical(d)
    with pytest.raises(A.AttestError, match="at most 20000"):
        A.parse_evidence(many)


def test_bad_ak_signatures_are_refused():
    data = A.canonical(good_dict())
    good = AK.sign(data)
    for sig in (Ed25519PrivateKey.generate().sign(data), bytes([good[0] ^ 1]) + good[1:],
                good[:63], bytes(64)):
        with pytest.raises(A.AttestError, match="evidence signature by ak_pub"):
            A.verify_evidence(data, sig)
    altered = data.replace(b"console=hvc0", b"console=hvc1")
    with pytest.raises(A.AttestError, match="does not verify"):
        A.verify_evidence(altered, good)


def test_make_evidence_refuses_to_make_malformed_evidence():
    with pytest.raises(A.AttestError, match="vm"):
        A.make_evidence("Bad Name", NONCE, make_log(), AK, bytes(32), {"kind": "software",
                        "host_pub": "00" * 32, "log_sig": "00" * 64})
    with pytest.raises(A.AttestError, match="attestation-key entry is not"):
        A.make_evidence("web1", NONCE, make_log(ak=Ed25519PrivateKey.generate()), AK, bytes(32),
                        {"kind": "software", "host_pub": "00" * 32, "log_sig": "00" * 64})


# ---- key release --------------------------------------------------------------------------

PAYLOAD = A.canonical({"disk": "11" * 32, "net": "22" * 32, "snapshot": "33" * 32})


def test_wrap_unwrap_round_trip():
    core = X25519PrivateKey.generate()
    wrapped, salt = A.wrap_keys(PAYLOAD, core.public_key(), NONCE, OWNER_WRAP)
    assert len(salt) == 32 and len(wrapped) == 32 + len(PAYLOAD) + 16
    assert A.unwrap_keys(wrapped, salt, core, NONCE, OWNER_WRAP.public_key()) == PAYLOAD
    assert A.unwrap_keys(wrapped, salt, core, NONCE, pub(OWNER_WRAP)) == PAYLOAD
    assert A.parse_vm_keys(PAYLOAD)["net"] == b"\x22" * 32
    again, salt2 = A.wrap_keys(PAYLOAD, core.public_key(), NONCE, OWNER_WRAP)
    assert again[:32] != wrapped[:32] and salt2 != salt, "fresh broker key and salt each time"


def _flip(b: bytes, i: int) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]


def test_unwrap_fails_on_every_mismatch():
    core, other = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    wrapped, salt = A.wrap_keys(PAYLOAD, core.public_key(), NONCE, OWNER_WRAP)
    owner = OWNER_WRAP.public_key()
    cases = {
        "wrong core key": (wrapped, salt, other, NONCE, owner),
        "wrong nonce": (wrapped, salt, core, bytes(32), owner),
        "wrong salt": (wrapped, bytes(32), core, NONCE, owner),
        "altered ciphertext": (_flip(wrapped, 40), salt, core, NONCE, owner),
        "altered tag": (_flip(wrapped, len(wrapped) - 1), salt, core, NONCE, owner),
        "altered broker key": (_flip(wrapped, 3), salt, core, NONCE, owner),
        "wrong owner": (wrapped, salt, core, NONCE, X25519PrivateKey.generate().public_key()),
    }
    for name, args in cases.items():
        with pytest.raises(A.AttestError, match="do not open"):
            A.unwrap_keys(*args)
            pytest.fail(name)
    with pytest.raises(A.AttestError, match="48"):
        A.unwrap_keys(wrapped[:40], salt, core, NONCE, owner)


def test_swapped_ephemeral_key_does_not_open_at_the_core():
    """Keys wrapped to an attacker's ephemeral key do not open with the core's."""
    core, attacker = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    wrapped, salt = A.wrap_keys(PAYLOAD, attacker.public_key(), NONCE, OWNER_WRAP)
    with pytest.raises(A.AttestError, match="do not open"):
        A.unwrap_keys(wrapped, salt, core, NONCE, OWNER_WRAP.public_key())
    assert A.unwrap_keys(wrapped, salt, attacker, NONCE, OWNER_WRAP.public_key()) == PAYLOAD


def test_blob_made_without_the_owner_wrap_key_does_not_open():
    """The core's ephemeral key and the nonce are public: only the owner key authenticates."""
    core = X25519PrivateKey.generate()
    forged, salt = A.wrap_keys(b'{"disk":"known"}', core.public_key(), NONCE,
                               X25519PrivateKey.generate())
    with pytest.raises(A.AttestError, match="do not open"):
        A.unwrap_keys(forged, salt, core, NONCE, OWNER_WRAP.public_key())


# ---- manifests ---------------------------------------------------------------------------

MANIFEST = {"version": 1, "name": "web1", "image_sha256": h(b"img").hex(), "cmdline": "quiet",
            "memory_mib": 256, "vcpus": 2, "entry": "pvh", "devices": ["net", "rng"],
            "min_core_version": 1}
MEASURED = dict(image_sha256=h(b"img").hex(), cmdline="quiet", memory_mib=256, vcpus=2,
                entry="pvh", devices=["rng", "net"])


def test_manifest_sign_verify():
    owner = Ed25519PrivateKey.generate()
    data = A.manifest_bytes(MANIFEST)
    sig = A.sign_manifest(owner, MANIFEST)
    assert A.verify_manifest(owner.public_key(), data, sig) == MANIFEST
    with pytest.raises(A.AttestError, match="manifest signature"):
        A.verify_manifest(owner.public_key(), data.replace(b"quiet", b"quieT"), sig)
    with pytest.raises(A.AttestError, match="manifest signature"):
        A.verify_manifest(Ed25519PrivateKey.generate().public_key(), data, sig)
    for bad in ({**MANIFEST, "devices": ["rng", "net"]}, {**MANIFEST, "vcpus": 0},
                {**MANIFEST, "entry": "real"}, {k: v for k, v in MANIFEST.items() if k != "name"}):
        with pytest.raises(A.AttestError):
            A.manifest_bytes(bad)


def test_compare_manifest_matches_and_ignores_device_order():
    assert A.compare_manifest(MANIFEST, **MEASURED) == []
    assert A.compare_manifest(MANIFEST, **{**MEASURED, "image_sha256": h(b"img")}) == []


@pytest.mark.parametrize("item, value", [
    ("image_sha256", h(b"other").hex()), ("cmdline", "quiet init=/bin/sh"), ("memory_mib", 512),
    ("vcpus", 1), ("entry", "long"), ("devices", ["rng"])])
def test_compare_manifest_names_each_differing_item(item, value):
    diffs = A.compare_manifest(MANIFEST, **{**MEASURED, item: value})
    assert len(diffs) == 1 and diffs[0].startswith(f"{item}: signed ")


def test_compare_manifest_names_every_item_at_once():
    diffs = A.compare_manifest(MANIFEST, h(b"x"), "", 1, 1, "long", [])
    assert [d.split(":")[0] for d in diffs] == ["image_sha256", "cmdline", "memory_mib", "vcpus",
                                                "entry", "devices"]

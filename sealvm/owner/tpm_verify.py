"""The owner's check of a TPM root of trust: a TPM2 quote over PCR 23.

Standard library and `cryptography` only, so an owner (or the key broker)
verifies evidence without any TPM library.  The quote is the marshalled
TPMS_ATTEST a TPM2_Quote returns and is parsed here by hand, every length
checked against what is left and against the TPM 2.0 structure limits, before
anything is compared.  See docs/attestation.md ("TPM root") for the encoding:

    root = {"kind": "tpm",
            "quote": hex(TPMS_ATTEST),
            "quote_sig": hex(DER ECDSA-Sig-Value, P-256, SHA-256 over the quote),
            "tpm_ak_pub": hex(DER SubjectPublicKeyInfo of the TPM's AK),
            "pcrs": {"23": hex(PCR 23, SHA-256 bank)}}

`verify_quote` raises `QuoteError` (a `ValueError`) whose `check` names the
check that failed and whose message says why.  It does not check that the AK
is a restricted TPM key: that is what enrolling it in `trusted_tpms` asserts.
"""
from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_SHA256 = 0x000B
QUOTED_PCR = 23
DIGEST_SIZE = 32
# Structure limits (TPM 2.0 Part 2, for an implementation with SHA-512 at most).
MAX_NAME = 2 + 64            # TPM2B_NAME: sizeof(TPMU_NAME)
MAX_DATA = 2 + 64            # TPM2B_DATA: sizeof(TPMT_HA)
MAX_DIGEST = 64              # TPM2B_DIGEST: sizeof(TPMU_HA)
MAX_HASH_COUNT = 16          # TPML_PCR_SELECTION.count
MAX_SIZEOF_SELECT = 32       # 256 PCRs, far above any TPM's PCR_SELECT_MAX
MAX_QUOTE = 1024             # a one-bank quote is about 145 bytes
MAX_SIG_DER = 72             # DER ECDSA-Sig-Value for P-256
MAX_AK_DER = 512
_HEX = re.compile(r"[0-9a-f]*")
ROOT_KEYS = {"kind", "quote", "quote_sig", "tpm_ak_pub", "pcrs"}
_FORMATS = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}     # TPM structures are big-endian


class QuoteError(ValueError):
    """A TPM root that does not verify; `check` names the failed check."""

    def __init__(self, check: str, reason: str):
        super().__init__(f"tpm {check}: {reason}")
        self.check = check


@dataclass(frozen=True)
class QuoteInfo:
    """A parsed TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE."""
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    selections: tuple[tuple[int, bytes], ...]     # (hash algorithm, pcrSelect bitmap)
    pcr_digest: bytes


class _Reader:
    """Big-endian reads from a byte string; every read is checked against what is left."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int, what: str) -> bytes:
        left = len(self.data) - self.pos
        if n > left:
            raise QuoteError("format", f"TPMS_ATTEST truncated in {what}: needs {n} bytes at "
                                       f"offset {self.pos}, {left} left")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int, what: str) -> int:
        return struct.unpack(_FORMATS[size], self.take(size, what))[0]

    def tpm2b(self, what: str, limit: int) -> bytes:
        size = self.uint(2, f"{what}.size")
        if size > limit:
            raise QuoteError("format", f"TPMS_ATTEST {what}.size {size} exceeds its maximum {limit}")
        return self.take(size, what)


def parse_attest(quote: bytes) -> QuoteInfo:
    """Parse a marshalled TPMS_ATTEST that must be a TPM-generated quote."""
    if len(quote) > MAX_QUOTE:
        raise QuoteError("format", f"quote is {len(quote)} bytes, more than {MAX_QUOTE}")
    r = _Reader(bytes(quote))
    magic = r.uint(4, "magic")
    if magic != TPM_GENERATED_VALUE:
        raise QuoteError("format", f"magic {magic:#010x} is not TPM_GENERATED_VALUE "
                                   f"{TPM_GENERATED_VALUE:#010x}")
    st = r.uint(2, "type")
    if st != TPM_ST_ATTEST_QUOTE:
        raise QuoteError("format", f"type {st:#06x} is not TPM_ST_ATTEST_QUOTE {TPM_ST_ATTEST_QUOTE:#06x}")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock = r.uint(8, "clockInfo.clock")
    reset_count = r.uint(4, "clockInfo.resetCount")
    restart_count = r.uint(4, "clockInfo.restartCount")
    safe = r.uint(1, "clockInfo.safe")
    if safe > 1:
        raise QuoteError("format", f"clockInfo.safe is {safe}, not a TPMI_YES_NO")
    firmware = r.uint(8, "firmwareVersion")
    count = r.uint(4, "pcrSelect.count")
    if count > MAX_HASH_COUNT:
        raise QuoteError("format", f"pcrSelect.count {count} exceeds its maximum {MAX_HASH_COUNT}")
    selections = []
    for i in range(count):
        alg = r.uint(2, f"pcrSelections[{i}].hash")
        size = r.uint(1, f"pcrSelections[{i}].sizeofSelect")
        if size > MAX_SIZEOF_SELECT:
            raise QuoteError("format", f"pcrSelections[{i}].sizeofSelect {size} exceeds "
                                       f"{MAX_SIZEOF_SELECT}")
        selections.append((alg, r.take(size, f"pcrSelections[{i}].pcrSelect")))
    pcr_digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    if r.pos != len(r.data):
        raise QuoteError("format", f"{len(r.data) - r.pos} trailing bytes after the TPMS_ATTEST")
    return QuoteInfo(signer, extra, clock, reset_count, restart_count, bool(safe), firmware,
                     tuple(selections), pcr_digest)


def _selects_only(bitmap: bytes, pcr: int) -> bool:
    want = bytearray(max(len(bitmap), pcr // 8 + 1))
    want[pcr // 8] = 1 << (pcr % 8)
    return len(bitmap) > pcr // 8 and bitmap == bytes(want)


def _hex_field(root: dict, key: str, limit: int) -> bytes:
    value = root.get(key)
    if not isinstance(value, str):
        raise QuoteError("root", f"root[{key!r}] is missing or not a string")
    if len(value) > 2 * limit:
        raise QuoteError("root", f"root[{key!r}] is longer than {limit} bytes")
    if len(value) % 2 or not _HEX.fullmatch(value):
        raise QuoteError("root", f"root[{key!r}] is not lowercase hex")
    return bytes.fromhex(value)


def _trusted_keys(trusted_tpms) -> set[bytes]:
    if isinstance(trusted_tpms, (str, bytes)) or not hasattr(trusted_tpms, "__iter__"):
        raise QuoteError("trust", "trusted_tpms is not a list of hex DER keys")
    keys = set()
    for i, entry in enumerate(trusted_tpms):
        if not isinstance(entry, str) or len(entry) % 2 or not _HEX.fullmatch(entry.lower()):
            raise QuoteError("trust", f"trusted_tpms[{i}] is not a hex string")
        keys.add(bytes.fromhex(entry))
    return keys


def _load_ak(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise QuoteError("key", f"tpm_ak_pub is not a DER SubjectPublicKeyInfo: {e}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise QuoteError("key", "tpm_ak_pub is not an ECC NIST P-256 key")
    return key


def _check_signature(key: ec.EllipticCurvePublicKey, quote: bytes, sig: bytes) -> None:
    try:
        r, s = decode_dss_signature(sig)
    except ValueError:
        raise QuoteError("signature", "quote_sig is not a DER ECDSA-Sig-Value") from None
    if encode_dss_signature(r, s) != sig:
        raise QuoteError("signature", "quote_sig is not canonical DER")
    try:
        key.verify(sig, quote, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise QuoteError("signature", "quote signature does not verify with tpm_ak_pub") from None


def verify_quote(root: dict, expected_pcr23: bytes, qualifying_data: bytes,
                 trusted_tpms: list[str]) -> None:
    """Accept `root` only if a trusted TPM quoted PCR 23 == expected_pcr23 over qualifying_data.

    Raises QuoteError (a ValueError) naming the first check that failed.
    """
    for value, check in ((expected_pcr23, "pcr-value"), (qualifying_data, "nonce")):
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise QuoteError(check, f"expected bytes for the {check} check, got {type(value).__name__}")
    expected_pcr23, qualifying_data = bytes(expected_pcr23), bytes(qualifying_data)
    if len(expected_pcr23) != DIGEST_SIZE:
        raise QuoteError("pcr-value", f"expected PCR 23 value is {len(expected_pcr23)} bytes, "
                                      f"not {DIGEST_SIZE}")
    if not isinstance(root, dict):
        raise QuoteError("root", "root is not an object")
    if root.get("kind") != "tpm":
        raise QuoteError("root", f"root kind is {root.get('kind')!r}, not 'tpm'")
    if set(root) != ROOT_KEYS:
        raise QuoteError("root", f"root keys are {sorted(map(str, root))}, want {sorted(ROOT_KEYS)}")
    quote = _hex_field(root, "quote", MAX_QUOTE)
    sig = _hex_field(root, "quote_sig", MAX_SIG_DER)
    ak_der = _hex_field(root, "tpm_ak_pub", MAX_AK_DER)
    pcrs = root["pcrs"]
    if not isinstance(pcrs, dict) or set(pcrs) != {str(QUOTED_PCR)}:
        raise QuoteError("root", "root['pcrs'] must hold exactly PCR '23'")
    reported = _hex_field(pcrs, str(QUOTED_PCR), DIGEST_SIZE)

    if ak_der not in _trusted_keys(trusted_tpms):
        raise QuoteError("trust", "tpm_ak_pub is not in the policy's trusted_tpms")
    _check_signature(_load_ak(ak_der), quote, sig)

    info = parse_attest(quote)
    if info.extra_data != qualifying_data:
        raise QuoteError("nonce", "quote extraData does not match the qualifying data "
                                  "(stale or replayed nonce, or another key/ephemeral)")
    if (len(info.selections) != 1 or info.selections[0][0] != TPM_ALG_SHA256
            or not _selects_only(info.selections[0][1], QUOTED_PCR)):
        raise QuoteError("selection", "quote does not select exactly the SHA-256 bank of PCR 23")
    if info.pcr_digest != hashlib.sha256(expected_pcr23).digest():
        raise QuoteError("pcr-digest", "quoted PCR 23 does not match the replayed log "
                                       "(an entry altered, dropped, added or reordered)")
    if reported != expected_pcr23:
        raise QuoteError("pcr-value", "root pcrs['23'] does not match the replayed log")


def replay_pcr(digests: list[bytes]) -> bytes:
    """The SHA-256 PCR value after extending each digest in order from 32 zero bytes."""
    pcr = bytes(DIGEST_SIZE)
    for i, d in enumerate(digests):
        if not isinstance(d, (bytes, bytearray, memoryview)) or len(d) != DIGEST_SIZE:
            raise ValueError(f"log digest {i} is not {DIGEST_SIZE} bytes")
        pcr = hashlib.sha256(pcr + bytes(d)).digest()
    return pcr


def qualifying_data(nonce: bytes, ak_pub: bytes, ephemeral_pub: bytes) -> bytes:
    """The quote's qualifying data for evidence: sha256(nonce || ak_pub || ephemeral_pub)."""
    return hashlib.sha256(bytes(nonce) + bytes(ak_pub) + bytes(ephemeral_pub)).digest()


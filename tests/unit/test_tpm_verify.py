"""The owner's TPM quote verifier on synthetic quotes (no TPM needed).

Quotes are built field by field and signed with a software P-256 key that the
tests list in trusted_tpms, so every check after the signature is reached:
each refusal names its check, every truncation and oversize length is a
format error, and hostile bytes (mutated or generated, then re-signed) only
ever raise ValueError.  tests/unit/test_tpm_swtpm.py does the same against a
real (software) TPM.
"""
from __future__ import annotations

import ast
import hashlib
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sealvm.owner.tpm_verify import (MAX_DATA, MAX_DIGEST, MAX_HASH_COUNT, MAX_NAME,
                                     MAX_SIZEOF_SELECT, QuoteError, parse_attest,
                                     qualifying_data, replay_pcr, verify_quote)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY = ec.generate_private_key(ec.SECP256R1())
KEY_DER = KEY.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
TRUSTED = [KEY_DER.hex()]
LOG = [hashlib.sha256(b"entry %d" % i).digest() for i in range(5)]
PCR = replay_pcr(LOG)
QD = qualifying_data(b"n" * 32, b"a" * 32, b"e" * 32)
SHA256, SHA1 = 0x000B, 0x0004
PCR23 = b"\x00\x00\x80"


def attest(*, magic=0xFF544347, st_type=0x8018, signer=b"\x00\x0b" + b"s" * 32, extra=QD,
           clock=(1234, 1, 0, 1), firmware=0x2019102300163636,
           selections=((SHA256, PCR23),), count=None, pcr_digest=None, trailing=b"") -> bytes:
    """A marshalled TPMS_ATTEST (quote) with each field settable."""
    pcr_digest = hashlib.sha256(PCR).digest() if pcr_digest is None else pcr_digest
    out = struct.pack(">IH", magic, st_type)
    out += struct.pack(">H", len(signer)) + signer + struct.pack(">H", len(extra)) + extra
    out += struct.pack(">QIIB", *clock) + struct.pack(">Q", firmware)
    out += struct.pack(">I", len(selections) if count is None else count)
    for alg, bitmap in selections:
        out += struct.pack(">HB", alg, len(bitmap)) + bitmap
    return out + struct.pack(">H", len(pcr_digest)) + pcr_digest + trailing


def root_for(quote: bytes, *, key=KEY, pcr=PCR, sig=None) -> dict:
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = key.sign(quote, ec.ECDSA(hashes.SHA256())) if sig is None else sig
    return {"kind": "tpm", "quote": quote.hex(), "quote_sig": sig.hex(),
            "tpm_ak_pub": der.hex(), "pcrs": {"23": pcr.hex()}}


def refused(root, check, *, pcr=PCR, qd=QD, trusted=TRUSTED) -> QuoteError:
    with pytest.raises(QuoteError) as info:
        verify_quote(root, pcr, qd, trusted)
    assert info.value.check == check, str(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


# -- the happy path and the helpers ---------------------------------------------

def test_a_well_formed_signed_quote_verifies():
    verify_quote(root_for(attest()), PCR, QD, TRUSTED)


def test_replay_pcr_extends_from_zero():
    assert replay_pcr([]) == bytes(32)
    one = hashlib.sha256(bytes(32) + LOG[0]).digest()
    assert replay_pcr(LOG[:1]) == one
    assert replay_pcr(LOG[:2]) == hashlib.sha256(one + LOG[1]).digest()
    with pytest.raises(ValueError):
        replay_pcr([b"short"])


def test_qualifying_data_binds_nonce_ak_and_ephemeral():
    assert qualifying_data(b"n", b"a", b"e") == hashlib.sha256(b"nae").digest()


def test_parse_attest_reads_every_field():
    info = parse_attest(attest())
    assert info.extra_data == QD and info.clock == 1234 and info.reset_count == 1
    assert info.safe is True and info.firmware_version == 0x2019102300163636
    assert info.selections == ((SHA256, PCR23),)
    assert info.pcr_digest == hashlib.sha256(PCR).digest()
    assert info.qualified_signer == b"\x00\x0b" + b"s" * 32


def test_the_verifier_needs_no_tpm_library():
    """Owners verify with the standard library and `cryptography` alone."""
    import sealvm.owner.tpm_verify as mod
    tree = ast.parse(Path(mod.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    outside = {n.split(".")[0] for n in names} - set(sys.stdlib_module_names) - {"cryptography"}
    assert not outside, f"tpm_verify imports {outside}"


# -- each check refuses with its own reason --------------------------------------

def test_refuses_an_old_nonce():
    err = refused(root_for(attest(extra=qualifying_data(b"o" * 32, b"a" * 32, b"e" * 32))), "nonce")
    assert "extraData" in str(err)


@pytest.mark.parametrize("log", [LOG[:-1], LOG[1:], LOG[::-1], LOG + [LOG[0]],
                                 [LOG[0], hashlib.sha256(b"evil").digest(), *LOG[2:]]],
                         ids=["dropped-last", "dropped-first", "reordered", "added", "altered"])
def test_refuses_a_log_that_does_not_replay_to_the_quoted_pcr(log):
    refused(root_for(attest()), "pcr-digest", pcr=replay_pcr(log))


def test_refuses_a_root_that_misreports_pcr23():
    refused(root_for(attest(), pcr=replay_pcr(LOG[:1])), "pcr-value")


def test_refuses_a_key_not_in_trusted_tpms():
    other = ec.generate_private_key(ec.SECP256R1())
    refused(root_for(attest(), key=other), "trust")
    refused(root_for(attest()), "trust", trusted=[])


def test_refuses_a_quote_signed_by_another_key_under_a_trusted_name():
    other = ec.generate_private_key(ec.SECP256R1())
    root = root_for(attest())
    root["quote_sig"] = other.sign(attest(), ec.ECDSA(hashes.SHA256())).hex()
    refused(root, "signature")


@pytest.mark.parametrize("offset", [0, 4, 10, 50, 80, -1])
def test_refuses_an_altered_quote_byte(offset):
    quote = bytearray(attest())
    root = root_for(bytes(quote))
    quote[offset] ^= 0x01
    root["quote"] = quote.hex()
    refused(root, "signature")


def test_refuses_an_altered_or_malformed_signature():
    root = root_for(attest())
    sig = bytearray.fromhex(root["quote_sig"])
    trailing = bytes(sig) + b"\x00" if len(sig) < 72 else bytes(sig[:-1]) + b"\x00"
    for bad in (bytes(sig[:-1]) + bytes([sig[-1] ^ 1]), bytes(sig[:-1]), trailing,
                b"", b"\x30\x00", b"\xff" * 72):
        root["quote_sig"] = bad.hex()
        refused(root, "signature")
    root["quote_sig"] = (bytes(sig) + b"\x00" * 8).hex()         # longer than any P-256 DER
    refused(root, "root")


@pytest.mark.parametrize("selections", [
    ((SHA256, b"\x00\x00\x40"),),                               # PCR 22
    ((SHA256, b"\x00\x00\xc0"),),                               # PCRs 22 and 23
    ((SHA256, b"\x01\x00\x80"),),                               # PCRs 0 and 23
    ((SHA1, PCR23),),                                           # SHA-1 bank
    ((SHA256, PCR23), (SHA1, PCR23)),                           # two banks
    ((SHA256, b"\x00\x00"),),                                   # too short to name PCR 23
    ((SHA256, b"\x00\x00\x80\x01"),),                           # PCR 23 and PCR 24
    (),                                                         # nothing
], ids=["pcr22", "pcr22+23", "pcr0+23", "sha1", "two-banks", "short-bitmap", "pcr24", "empty"])
def test_refuses_any_selection_but_sha256_pcr23(selections):
    refused(root_for(attest(selections=selections)), "selection")


def test_accepts_a_longer_bitmap_that_selects_only_pcr23():
    verify_quote(root_for(attest(selections=((SHA256, PCR23 + b"\x00"),))), PCR, QD, TRUSTED)


@pytest.mark.parametrize("kw,reason", [
    ({"magic": 0xFF544348}, "magic"),
    ({"st_type": 0x8014}, "type"),                              # a certify, not a quote
    ({"signer": b"x" * (MAX_NAME + 1)}, "qualifiedSigner"),
    ({"extra": b"x" * (MAX_DATA + 1)}, "extraData"),
    ({"pcr_digest": b"x" * (MAX_DIGEST + 1)}, "pcrDigest"),
    ({"count": MAX_HASH_COUNT + 1}, "count"),
    ({"count": 2}, "pcrSelections[1]"),                         # reads pcrDigest as a selection
    ({"selections": ((SHA256, b"\x00" * (MAX_SIZEOF_SELECT + 1)),)}, "sizeofSelect"),
    ({"clock": (1, 1, 1, 2)}, "safe"),
    ({"trailing": b"\x00"}, "trailing"),
])
def test_refuses_malformed_structures(kw, reason):
    err = refused(root_for(attest(**kw)), "format")
    assert reason in str(err)


def test_every_truncation_is_a_format_error():
    quote = attest()
    for n in range(len(quote)):
        refused(root_for(quote[:n]), "format")


@pytest.mark.parametrize("field", ["qualifiedSigner", "extraData", "pcrDigest"])
def test_a_length_running_past_the_end_is_refused(field):
    """A TPM2B whose size is within its limit but more than the bytes that follow."""
    quote = attest()
    offsets = {"qualifiedSigner": 6, "extraData": 6 + 2 + 34, "pcrDigest": len(quote) - 34}
    at = offsets[field]
    claimed = struct.unpack(">H", quote[at:at + 2])[0]
    cut = quote[:at] + struct.pack(">H", claimed + 1) + quote[at + 2:at + 2 + claimed]
    err = refused(root_for(cut), "format")
    assert f"truncated in {field}" in str(err)


# -- the root's shape ------------------------------------------------------------

def _mutate_root(**changes):
    root = root_for(attest())
    for k, v in changes.items():
        if v is KeyError:
            del root[k]
        else:
            root[k] = v
    return root


@pytest.mark.parametrize("root", [
    None, [], "tpm",
    _mutate_root(kind="software"),
    _mutate_root(quote=KeyError),
    _mutate_root(extra="x"),
    _mutate_root(quote=attest().hex().upper()),
    _mutate_root(quote=attest().hex()[:-1]),
    _mutate_root(quote=" " + attest().hex()[1:]),
    _mutate_root(quote="00" * 5000),
    _mutate_root(quote_sig=7),
    _mutate_root(tpm_ak_pub=None),
    _mutate_root(pcrs={"23": PCR.hex(), "0": PCR.hex()}),
    _mutate_root(pcrs={23: PCR.hex()}),
    _mutate_root(pcrs=[PCR.hex()]),
    _mutate_root(pcrs={"23": PCR.hex() + "00"}),
], ids=lambda r: "case")
def test_refuses_a_malformed_root(root):
    refused(root, "root")


def test_refuses_a_trusted_key_that_is_not_p256():
    for key in (ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP384R1())):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        root = root_for(attest())
        root["tpm_ak_pub"] = der.hex()
        refused(root, "key", trusted=TRUSTED + [der.hex()])
    root = root_for(attest())
    root["tpm_ak_pub"] = "00ff"
    refused(root, "key", trusted=["00ff"])


def test_refuses_a_malformed_trust_list():
    for trusted in ("ab", None, [1], ["xyz"]):
        refused(root_for(attest()), "trust", trusted=trusted)


def test_trusted_keys_match_in_either_hex_case():
    verify_quote(root_for(attest()), PCR, QD, [KEY_DER.hex().upper()])


def test_refuses_an_expected_pcr_of_the_wrong_size_or_type():
    refused(root_for(attest()), "pcr-value", pcr=PCR[:31])
    refused(root_for(attest()), "pcr-value", pcr=32)            # bytes(32) would be zeros
    refused(root_for(attest()), "nonce", qd=QD.hex())


# -- hostile bytes, re-signed so the parser sees them ----------------------------

def _mutations():
    byte = st.integers(0, 255)
    return st.lists(st.one_of(
        st.tuples(st.just("set"), st.integers(0, 400), byte),
        st.tuples(st.just("cut"), st.integers(0, 400), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 400), byte),
        st.tuples(st.just("delete"), st.integers(0, 400), st.integers(1, 8)),
        st.tuples(st.just("len16"), st.integers(0, 400), st.integers(0, 0xFFFF)),
    ), min_size=1, max_size=6)


def mutate(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, pos, val in ops:
        pos = pos % (len(out) + 1)
        if op == "set" and pos < len(out):
            out[pos] = val
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out.insert(pos, val)
        elif op == "delete":
            del out[pos:pos + val]
        elif op == "len16":
            out[pos:pos + 2] = struct.pack(">H", val)
    return bytes(out)


def check_resigned(original: bytes, quote: bytes) -> None:
    """Verify a re-signed mutant: only ValueError, and a pass only with the checked fields intact."""
    try:
        verify_quote(root_for(quote), PCR, QD, TRUSTED)
    except ValueError:
        return
    info, want = parse_attest(quote), parse_attest(original)
    assert (info.extra_data, info.selections, info.pcr_digest) == \
           (want.extra_data, want.selections, want.pcr_digest)


@FUZZ
@given(_mutations())
def test_mutated_resigned_quotes_only_raise_value_error(ops):
    check_resigned(attest(), mutate(attest(), ops))


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_resigned_only_raise_value_error(data):
    check_resigned(attest(), data)


@FUZZ
@given(signer=st.binary(max_size=80), extra=st.binary(max_size=80), digest=st.binary(max_size=80),
       sels=st.lists(st.tuples(st.sampled_from([SHA1, SHA256, 0x000C, 0xFFFF]),
                               st.binary(max_size=40)), max_size=20),
       count=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       safe=st.integers(0, 255), trailing=st.binary(max_size=4))
def test_generated_structures_only_raise_value_error(signer, extra, digest, sels, count, safe,
                                                     trailing):
    quote = attest(signer=signer, extra=extra, pcr_digest=digest, selections=tuple(sels),
                   count=count, clock=(0, 0, 0, safe), trailing=trailing)
    check_resigned(attest(), quote)

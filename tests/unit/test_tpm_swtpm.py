"""The TPM root of trust end to end against a real software TPM (swtpm).

A private swtpm per module (tmp state, a free loopback port pair) and a second
one standing for another machine's TPM.  The boot side (`sealvm.preboot.tpm`)
extends, reads and quotes PCR 23; the owner side (`sealvm.owner.tpm_verify`,
no TPM library) accepts the genuine quote and refuses each forgery with its own
reason.  tpm2-tools, when installed, cross-checks both directions.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from sealvm.owner.tpm_verify import (QuoteError, parse_attest, qualifying_data, replay_pcr,
                                     verify_quote)
from sealvm.tools import swtpm

if shutil.which("swtpm") is None:
    pytest.skip("swtpm is not installed (apt-get install -y swtpm swtpm-tools)",
                allow_module_level=True)
pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is not installed: apt-get install -y "
                    "libtss2-dev pkg-config; pip install tpm2-pytss")

from tpm2_pytss import ESAPI                                   # noqa: E402
from tpm2_pytss.constants import ESYS_TR                       # noqa: E402
from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMT_PUBLIC  # noqa: E402

from sealvm.preboot.tpm import AK_HANDLE, Tpm, TpmError        # noqa: E402

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
LOG = [hashlib.sha256(b"measured thing %d" % i).digest() for i in range(6)]
NONCE = bytes(range(32))
QD = qualifying_data(NONCE, b"A" * 32, b"E" * 32)


@pytest.fixture(scope="module")
def tpm_port(tmp_path_factory):
    state = tmp_path_factory.mktemp("swtpm")
    port = swtpm.start_on_free_port(state)
    yield port
    swtpm.stop(state)


@pytest.fixture(scope="module")
def other_tpm_port(tmp_path_factory):
    state = tmp_path_factory.mktemp("swtpm-other")
    port = swtpm.start_on_free_port(state)
    yield port
    swtpm.stop(state)


@pytest.fixture
def tpm(tpm_port):
    with Tpm(port=tpm_port) as t:
        yield t


def measured(tpm: Tpm, log=LOG) -> bytes:
    tpm.reset_debug_pcr(23)
    for d in log:
        tpm.extend(23, d)
    return replay_pcr(log)


@pytest.fixture
def genuine(tpm):
    """(root, trusted) for a quote of the measured LOG with QD."""
    measured(tpm)
    root = tpm.tpm_root(QD)
    return root, [tpm.attestation_key().hex()]


def refused(root, check, *, pcr=None, qd=QD, trusted) -> QuoteError:
    with pytest.raises(QuoteError) as info:
        verify_quote(root, replay_pcr(LOG) if pcr is None else pcr, qd, trusted)
    assert info.value.check == check, str(info.value)
    return info.value


# -- PCRs -------------------------------------------------------------------------

def test_reset_then_extend_matches_the_replayed_log(tpm):
    tpm.reset_debug_pcr(23)
    assert tpm.read_pcr(23) == bytes(32)
    for i, d in enumerate(LOG):
        tpm.extend(23, d)
        assert tpm.read_pcr(23) == replay_pcr(LOG[:i + 1])


def test_extend_and_reset_check_their_arguments(tpm):
    with pytest.raises(ValueError):
        tpm.extend(23, b"short")
    with pytest.raises(ValueError):
        tpm.extend(24, bytes(32))
    with pytest.raises(ValueError):
        tpm.reset_debug_pcr(0)


def test_pcr0_is_not_resettable_by_the_tpm_either(tpm):
    with pytest.raises(TpmError):
        tpm._call("PCR_Reset", tpm._esys.pcr_reset, ESYS_TR.PCR0)


# -- the genuine quote ------------------------------------------------------------

def test_a_genuine_quote_verifies(genuine):
    root, trusted = genuine
    verify_quote(root, replay_pcr(LOG), QD, trusted)
    info = parse_attest(bytes.fromhex(root["quote"]))
    assert info.extra_data == QD and info.pcr_digest == hashlib.sha256(replay_pcr(LOG)).digest()
    assert root["pcrs"] == {"23": replay_pcr(LOG).hex()}


def test_quote_returns_tpms_attest_and_a_der_signature(tpm):
    measured(tpm)
    quote, sig = tpm.quote([23], QD)
    assert quote[:6] == bytes.fromhex("ff5443478018")
    decode_dss_signature(sig)                                   # DER ECDSA-Sig-Value
    key = serialization.load_der_public_key(tpm.attestation_key())
    key.verify(sig, quote, ec.ECDSA(hashes.SHA256()))


# -- refusals, each with its reason -------------------------------------------------

def test_refuses_a_replayed_nonce(genuine):
    root, trusted = genuine
    fresh = qualifying_data(b"\x01" * 32, b"A" * 32, b"E" * 32)
    err = refused(root, "nonce", qd=fresh, trusted=trusted)
    assert "replayed" in str(err)


@pytest.mark.parametrize("log", [LOG[:-1], LOG[1:], [LOG[1], LOG[0], *LOG[2:]],
                                 [*LOG[:3], hashlib.sha256(b"swapped core").digest(), *LOG[4:]]],
                         ids=["dropped-last", "dropped-first", "reordered", "altered"])
def test_refuses_a_log_that_does_not_match_the_quoted_pcr(genuine, log):
    root, trusted = genuine
    refused(root, "pcr-digest", pcr=replay_pcr(log), trusted=trusted)


def test_refuses_a_tpm_that_measured_something_else(tpm):
    measured(tpm, LOG[:-1])                                     # the TPM saw one entry fewer
    root = tpm.tpm_root(QD)
    refused(root, "pcr-digest", trusted=[tpm.attestation_key().hex()])


def test_refuses_a_root_that_misreports_pcr23(genuine):
    root, trusted = genuine
    root["pcrs"]["23"] = replay_pcr(LOG[:1]).hex()
    refused(root, "pcr-value", trusted=trusted)


def test_refuses_a_quote_from_an_untrusted_tpm(genuine, other_tpm_port):
    _root, trusted = genuine
    with Tpm(port=other_tpm_port) as other:
        measured(other)
        foreign = other.tpm_root(QD)
        assert other.attestation_key().hex() not in trusted
    refused(foreign, "trust", trusted=trusted)
    foreign["tpm_ak_pub"] = trusted[0]                          # claim the trusted TPM's key
    refused(foreign, "signature", trusted=trusted)


@pytest.mark.parametrize("offset", [0, 5, 12, 45, 90, -1],
                         ids=["magic", "type", "signer", "extraData", "clock", "pcrDigest"])
def test_refuses_an_altered_quote_byte(genuine, offset):
    root, trusted = genuine
    quote = bytearray.fromhex(root["quote"])
    quote[offset] ^= 0x40
    root["quote"] = quote.hex()
    refused(root, "signature", trusted=trusted)


def test_refuses_an_altered_signature(genuine):
    root, trusted = genuine
    r, s = decode_dss_signature(bytes.fromhex(root["quote_sig"]))
    for bad in (encode_dss_signature(r ^ 1, s), encode_dss_signature(r, s + 1),
                bytes.fromhex(root["quote_sig"])[:-1]):
        root["quote_sig"] = bad.hex()
        refused(root, "signature", trusted=trusted)


@pytest.mark.parametrize("pcrs", [[22], [16, 23], [0, 23]])
def test_refuses_a_quote_over_another_pcr_selection(tpm, pcrs):
    expected = measured(tpm)
    quote, sig = tpm.quote(pcrs, QD)
    root = {"kind": "tpm", "quote": quote.hex(), "quote_sig": sig.hex(),
            "tpm_ak_pub": tpm.attestation_key().hex(), "pcrs": {"23": expected.hex()}}
    refused(root, "selection", trusted=[tpm.attestation_key().hex()])


# -- hostile bytes ---------------------------------------------------------------

def _flip(data: bytes, ops) -> bytes:
    out = bytearray(data)
    for op, pos, val in ops:
        pos %= len(out) + 1
        if op == "set" and pos < len(out):
            out[pos] = val & 0xFF
        elif op == "cut":
            del out[pos:]
        elif op == "insert":
            out.insert(pos, val & 0xFF)
        elif op == "len16":
            out[pos:pos + 2] = val.to_bytes(2, "big")
    return bytes(out)


# (operation, position, value): set/insert a byte (value & 0xff), cut the tail, or write a
# 16-bit big-endian length anywhere.
MUTATIONS = st.lists(st.tuples(st.sampled_from(["set", "cut", "insert", "len16"]),
                               st.integers(0, 200), st.integers(0, 0xFFFF)), max_size=5)


@pytest.fixture(scope="module")
def module_quote(tpm_port):
    with Tpm(port=tpm_port) as t:
        measured(t)
        return t.tpm_root(QD)


@FUZZ
@given(ops=MUTATIONS)
def test_mutated_tpm_quotes_fail_with_value_error_unless_untouched(module_quote, ops):
    original = bytes.fromhex(module_quote["quote"])
    quote = _flip(original, ops)
    root = {**module_quote, "quote": quote.hex()}
    trusted = [module_quote["tpm_ak_pub"]]
    if quote == original:
        verify_quote(root, replay_pcr(LOG), QD, trusted)
        return
    with pytest.raises(ValueError):
        verify_quote(root, replay_pcr(LOG), QD, trusted)


SOFT_KEY = ec.generate_private_key(ec.SECP256R1())
SOFT_DER = SOFT_KEY.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)


@FUZZ
@given(ops=MUTATIONS)
def test_mutated_tpm_quotes_resigned_reach_the_parser_and_only_raise_value_error(module_quote, ops):
    """Re-signed with a trusted software key, so the parser and field checks see the mutant."""
    original = bytes.fromhex(module_quote["quote"])
    quote = _flip(original, ops)
    root = {**module_quote, "quote": quote.hex(), "tpm_ak_pub": SOFT_DER.hex(),
            "quote_sig": SOFT_KEY.sign(quote, ec.ECDSA(hashes.SHA256())).hex()}
    try:
        verify_quote(root, replay_pcr(LOG), QD, [SOFT_DER.hex()])
    except ValueError:
        return
    got, want = parse_attest(quote), parse_attest(original)
    assert (got.extra_data, got.selections, got.pcr_digest) == \
           (want.extra_data, want.selections, want.pcr_digest)


# -- the attestation key ---------------------------------------------------------

def test_the_ak_is_a_stable_p256_key_across_sessions(tpm_port):
    with Tpm(port=tpm_port) as a:
        first = a.attestation_key()
    with Tpm(port=tpm_port) as b:
        second = b.attestation_key()
    assert first == second
    key = serialization.load_der_public_key(first)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"


def test_the_ak_is_rederived_identically_when_its_persistent_copy_is_gone(tpm_port):
    with Tpm(port=tpm_port) as t:
        before = t.attestation_key()
    with ESAPI(f"swtpm:host=127.0.0.1,port={tpm_port}") as esys:
        esys.evict_control(ESYS_TR.OWNER, esys.tr_from_tpmpublic(AK_HANDLE), AK_HANDLE)
    with Tpm(port=tpm_port) as t:
        assert t.attestation_key() == before


def test_the_ak_survives_a_swtpm_restart(tmp_path):
    port = swtpm.start_on_free_port(tmp_path)
    try:
        with Tpm(port=port) as t:
            before = t.attestation_key()
        assert swtpm.stop(tmp_path)
        assert swtpm.start(tmp_path, port)
        with Tpm(port=port) as t:
            assert t.attestation_key() == before
    finally:
        swtpm.stop(tmp_path)


@pytest.mark.parametrize("hierarchy,attrs,problem", [
    (ESYS_TR.OWNER, "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign", "template"),
    (ESYS_TR.OWNER, "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
     "endorsement"),
], ids=["unrestricted", "owner-hierarchy"])
def test_a_foreign_object_at_the_ak_handle_is_refused(tmp_path, hierarchy, attrs, problem):
    port = swtpm.start_on_free_port(tmp_path)
    try:
        with ESAPI(f"swtpm:host=127.0.0.1,port={port}") as esys:
            other = TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", nameAlg="sha256",
                                      objectAttributes=attrs)
            handle, *_ = esys.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=other),
                                             hierarchy)
            esys.evict_control(ESYS_TR.OWNER, handle, AK_HANDLE)
            esys.flush_context(handle)
        with Tpm(port=port) as t, pytest.raises(TpmError, match=f"not the sealvm AK.*{problem}"):
            t.attestation_key()
    finally:
        swtpm.stop(tmp_path)


def test_an_unreachable_tpm_is_a_clear_error():
    port = swtpm.free_port_pair()
    with pytest.raises(TpmError, match="cannot reach a TPM"):
        Tpm(port=port)


# -- the swtpm tool ----------------------------------------------------------------

def test_swtpm_start_and_stop_are_idempotent(tmp_path):
    port = swtpm.start_on_free_port(tmp_path)
    try:
        pid = swtpm.status(tmp_path)[0]
        assert swtpm.start(tmp_path, port) == pid               # already running: same one
        with pytest.raises(swtpm.SwtpmError, match="already serves"):
            swtpm.start(tmp_path, port + 2)
    finally:
        assert swtpm.stop(tmp_path) is True
    assert swtpm.stop(tmp_path) is False
    assert swtpm.status(tmp_path) is None and not swtpm.answers(port)


def test_swtpm_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(swtpm.SwtpmError, match="swtpm is not installed"):
        swtpm.start(tmp_path / "state", swtpm.free_port_pair())


# -- independent cross-checks with tpm2-tools ----------------------------------------

needs_tools = pytest.mark.skipif(shutil.which("tpm2_checkquote") is None,
                                 reason="tpm2-tools is not installed")


@needs_tools
def test_tpm2_checkquote_accepts_our_quote(tpm_port, tmp_path):
    with Tpm(port=tpm_port) as t:
        expected = measured(t)
        quote, sig = t.quote([23], QD)
        ak = serialization.load_der_public_key(t.attestation_key())
    (tmp_path / "ak.pem").write_bytes(ak.public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "msg").write_bytes(quote)
    (tmp_path / "sig").write_bytes(sig)
    (tmp_path / "pcr").write_bytes(expected)
    argv = ["tpm2_checkquote", "-u", "ak.pem", "-m", "msg", "-s", "sig", "-f", "pcr",
            "-l", "sha256:23", "-g", "sha256", "-q"]
    ok = subprocess.run(argv + [QD.hex()], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(argv + [bytes(32).hex()], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0


@needs_tools
def test_we_accept_a_quote_made_by_tpm2_quote(tpm_port, tmp_path):
    with Tpm(port=tpm_port) as t:
        expected = measured(t)
        ak = t.attestation_key()
    env = {"TPM2TOOLS_TCTI": f"swtpm:host=127.0.0.1,port={tpm_port}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(["tpm2_quote", "-c", hex(AK_HANDLE), "-l", "sha256:23", "-q", QD.hex(),
                           "-m", "msg", "-s", "sig", "-f", "plain", "-g", "sha256"],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    root = {"kind": "tpm", "quote": (tmp_path / "msg").read_bytes().hex(),
            "quote_sig": (tmp_path / "sig").read_bytes().hex(), "tpm_ak_pub": ak.hex(),
            "pcrs": {"23": expected.hex()}}
    verify_quote(root, expected, QD, [ak.hex()])


# ---- the launcher's disk generation witness in TPM NV counters --------------------------
def test_the_disk_witness_keeps_generations_in_tpm_counters(tpm_port, tmp_path):
    """A sealed disk whose commits advance a TPM NV counter (through the launcher's
    witness): an older copy of the whole disk is refused; a second disk gets its own
    counter; the counter never goes back."""
    import os
    import socket
    import threading
    from sealvm.core.diskseal import DiskTamper, FdWitness, SealedDisk, format_disk
    from sealvm.launcher.witness import TpmStore, serve
    from tests.disk_faults import FaultFile
    store = TpmStore(f"127.0.0.1:{tpm_port}")
    ours, theirs = socket.socketpair()
    threading.Thread(target=serve, args=(ours, store), daemon=True).start()
    w = FdWitness(theirs.detach())
    key = os.urandom(32)
    f = FaultFile()
    format_disk(f, key, 64)
    d = SealedDisk(f, key, witness=w)
    earlier = bytes(f.view)
    for i in range(3):
        d.write_block(i, bytes([i + 1]) * 4096)
        d.flush()
    assert store.read(d.disk_id) == d.generation == 4
    assert store.advance(d.disk_id, 2) == 4                   # never backwards
    f.view[:] = earlier
    with pytest.raises(DiskTamper, match="rollback"):
        SealedDisk(f, key, witness=w)
    other = FaultFile()
    format_disk(other, key, 64)
    o = SealedDisk(other, key, witness=w)
    assert store.read(o.disk_id) == 1 and store.read(d.disk_id) == 4
    assert store.read(os.urandom(16)) == 0

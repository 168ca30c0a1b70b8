"""The host/boot side of the TPM root of trust: extend, read, reset PCRs, and quote.

Boot TCB only (tpm2-pytss and the TSS2 C libraries are loaded here, never in the
core).  One `Tpm` is one ESAPI connection to a TPM 2.0 reached through the
`swtpm` TCTI (a TCP socket, normally swtpm on loopback, see
`sealvm.tools.swtpm`).  swtpm serves one connection at a time: close a `Tpm`
(or use it as a context manager) before another process talks to the same TPM.

Attestation key (AK)
--------------------
A restricted ECC NIST P-256 signing key, scheme ECDSA/SHA-256, created as a
*primary* key of the **endorsement hierarchy** from the fixed template
`AK_TEMPLATE` (fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
restricted, sign; nameAlg SHA-256; empty auth and policy).

* Endorsement, because its seed (EPS) is the TPM's identity: it survives
  TPM2_Clear (which replaces the owner hierarchy's seed), so the key the owner
  enrolled in `policy.trusted_tpms` stays valid as long as the TPM does; and a
  TPM does not obfuscate the resetCount, restartCount and firmwareVersion of a
  quote signed by an endorsement-hierarchy key.
* Stable: a primary key is derived from the hierarchy seed and the template, so
  the same TPM state always yields the same key.  It is also made persistent
  with TPM2_EvictControl at `AK_HANDLE` (0x81010023), so it occupies no
  transient slot and survives restarts; a persistent object found there is used
  only if its public area matches the template and its qualified name shows a
  primary of the endorsement hierarchy, and if it is gone (say after
  TPM2_Clear) the key is re-derived, the same key, and persisted again.
* restricted: the TPM signs only structures it made itself (those starting with
  TPM_GENERATED_VALUE), so a quote signed by the AK is a real TPM quote.

Quote encoding
--------------
`quote()` returns `(attest, signature)`:
* `attest`: the marshalled TPMS_ATTEST (the contents of the TPM2B_ATTEST the TPM
  returns, without its 2-byte size), big-endian as the TPM writes it;
* `signature`: the TPM's ECDSA signature (r, s) over `attest` with SHA-256,
  re-encoded as a DER ECDSA-Sig-Value (RFC 3279), the form `cryptography`
  verifies directly.
`sealvm.owner.tpm_verify.verify_quote` checks both without any TPM library.
"""
from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPMA_OBJECT
from tpm2_pytss.types import (TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPML_DIGEST_VALUES,
                              TPML_PCR_SELECTION, TPMT_HA, TPMT_PUBLIC, TPMT_SIG_SCHEME, TPMU_HA)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2321
AK_HANDLE = 0x81010023            # owner-authorised persistent range, endorsement-key block
NUM_PCRS = 24
RESETTABLE_PCRS = (16, 23)        # resettable from locality 0 (debug PCR and application PCR)
DIGEST_SIZE = 32                  # SHA-256 bank
TPM_RH_ENDORSEMENT = 0x4000000B
SHA256_ALG_ID = b"\x00\x0b"
AK_ATTRIBUTES = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
                 | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT)


class TpmError(RuntimeError):
    """The TPM could not be reached, refused a command, or returned something unexpected."""


def ak_template() -> TPMT_PUBLIC:
    """The AK's public template: ECC P-256, ECDSA/SHA-256, restricted signing, no KDF."""
    return TPMT_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=AK_ATTRIBUTES,
                             nameAlg="sha256")


def _template_bytes(public: TPMT_PUBLIC) -> bytes:
    """A public area marshalled with its unique field (the public point) emptied."""
    copy, _ = TPMT_PUBLIC.unmarshal(public.marshal())
    copy.unique.ecc.x = b""
    copy.unique.ecc.y = b""
    return copy.marshal()


def _endorsement_primary_qname(name: bytes) -> bytes:
    """Qualified name of a primary key of the endorsement hierarchy with this (SHA-256) name."""
    return SHA256_ALG_ID + hashlib.sha256(struct.pack(">I", TPM_RH_ENDORSEMENT) + name).digest()


def _pcr_selection(pcrs) -> TPML_PCR_SELECTION:
    pcrs = list(pcrs)
    if not pcrs:
        raise ValueError("PCR selection is empty")
    for p in pcrs:
        _check_pcr(p)
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in sorted(set(pcrs))))


def _check_pcr(pcr) -> None:
    if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr < NUM_PCRS:
        raise ValueError(f"PCR index {pcr!r} out of range 0..{NUM_PCRS - 1}")


def _pcr_handle(pcr: int) -> ESYS_TR:
    _check_pcr(pcr)
    return ESYS_TR(int(ESYS_TR.PCR0) + pcr)


class Tpm:
    """One connection to a TPM 2.0 through the swtpm TCTI (TCP, host:port)."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT):
        self.host, self.port = host, port
        self._ak: ESYS_TR | None = None
        self._ak_der: bytes | None = None
        try:
            self._esys = ESAPI(f"swtpm:host={host},port={port}")
        except TSS2_Exception as e:
            raise TpmError(f"cannot reach a TPM at {host}:{port} (is swtpm running? "
                           f"`python -m sealvm.tools.swtpm start STATE {port}`): {e}") from e

    # -- lifetime ---------------------------------------------------------

    def close(self) -> None:
        if self._esys is not None:
            if self._ak is not None:
                try:
                    self._esys.tr_close(self._ak)       # drops the ESAPI handle, not the key
                except TSS2_Exception:
                    pass
                self._ak = None
            self._esys.close()
            self._esys = None

    def __enter__(self) -> "Tpm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, what: str, fn, *args, **kw):
        if self._esys is None:
            raise TpmError("TPM connection is closed")
        try:
            return fn(*args, **kw)
        except TSS2_Exception as e:
            raise TpmError(f"TPM refused {what}: {e}") from e

    # -- PCRs -------------------------------------------------------------

    def extend(self, pcr: int, digest: bytes) -> None:
        """PCR[pcr] (SHA-256 bank) = sha256(PCR[pcr] || digest)."""
        digest = bytes(digest)
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"digest must be {DIGEST_SIZE} bytes (SHA-256), got {len(digest)}")
        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])
        self._call(f"PCR_Extend of PCR {pcr}", self._esys.pcr_extend, _pcr_handle(pcr), values)

    def read_pcr(self, pcr: int) -> bytes:
        """The SHA-256 bank value of PCR[pcr]."""
        _check_pcr(pcr)
        _counter, selected, digests = self._call(f"PCR_Read of PCR {pcr}", self._esys.pcr_read,
                                                 _pcr_selection([pcr]))
        if len(digests) != 1 or selected.count != 1:
            raise TpmError(f"TPM has no SHA-256 bank value for PCR {pcr}")
        value = bytes(digests[0])
        if len(value) != DIGEST_SIZE:
            raise TpmError(f"TPM returned a {len(value)}-byte SHA-256 PCR value")
        return value

    def reset_debug_pcr(self, pcr: int = 23) -> None:
        """Reset PCR 23 (or 16) to zeros; both are resettable from locality 0."""
        if pcr not in RESETTABLE_PCRS:
            raise ValueError(f"PCR {pcr} is not resettable from locality 0 (only {RESETTABLE_PCRS})")
        self._call(f"PCR_Reset of PCR {pcr}", self._esys.pcr_reset, _pcr_handle(pcr))

    # -- attestation key and quotes ---------------------------------------

    def attestation_key(self) -> bytes:
        """The AK's public key as DER SubjectPublicKeyInfo (creating and persisting it if needed)."""
        if self._ak_der is None:
            self._ak = self._load_persisted_ak()
            if self._ak is None:
                self._ak = self._create_and_persist_ak()
            public, _name, _qname = self._call("ReadPublic of the AK", self._esys.read_public, self._ak)
            self._ak_der = public.publicArea.to_der()
        return self._ak_der

    def _load_persisted_ak(self) -> ESYS_TR | None:
        _more, data = self._call("GetCapability(handles)", self._esys.get_capability,
                                 TPM2_CAP.HANDLES, AK_HANDLE, 1)
        if not list(data.data.handles) or data.data.handles[0] != AK_HANDLE:
            return None                                  # nothing persisted there
        handle = self._call(f"TR_FromTPMPublic of {AK_HANDLE:#x}", self._esys.tr_from_tpmpublic,
                            AK_HANDLE)
        public, name, qualified = self._call("ReadPublic of the AK", self._esys.read_public, handle)
        if _template_bytes(public.publicArea) != _template_bytes(ak_template()):
            problem = "a different template"
        elif bytes(qualified) != _endorsement_primary_qname(bytes(name)):
            problem = "not a primary key of the endorsement hierarchy"
        else:
            return handle
        self._esys.tr_close(handle)
        raise TpmError(f"persistent handle {AK_HANDLE:#x} holds an object that is not the "
                       f"sealvm AK ({problem}); evict it with "
                       f"`tpm2_evictcontrol -C o -c {AK_HANDLE:#x}`")

    def _create_and_persist_ak(self) -> ESYS_TR:
        transient, _public, *_ = self._call(
            "CreatePrimary of the AK (endorsement hierarchy)", self._esys.create_primary,
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=ak_template()), ESYS_TR.ENDORSEMENT)
        try:
            return self._call(f"EvictControl of the AK to {AK_HANDLE:#x}", self._esys.evict_control,
                              ESYS_TR.OWNER, transient, AK_HANDLE)
        finally:
            self._esys.flush_context(transient)

    def quote(self, pcrs=(23,), qualifying_data: bytes = b"") -> tuple[bytes, bytes]:
        """TPM2_Quote over the SHA-256 bank of `pcrs` with the AK.

        Returns (marshalled TPMS_ATTEST, DER ECDSA-Sig-Value over it with SHA-256).
        """
        qualifying_data = bytes(qualifying_data)
        if len(qualifying_data) > 64:
            raise ValueError(f"qualifying data is {len(qualifying_data)} bytes; a TPM takes at most 64")
        selection = _pcr_selection(pcrs)
        self.attestation_key()
        attest, signature = self._call(
            "Quote", self._esys.quote, self._ak, selection, qualifying_data,
            TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))            # NULL: the key's own scheme
        if signature.sigAlg != TPM2_ALG.ECDSA or signature.signature.ecdsa.hash != TPM2_ALG.SHA256:
            raise TpmError(f"TPM signed with {signature.sigAlg!s}, not ECDSA/SHA-256")
        r = int.from_bytes(bytes(signature.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(signature.signature.ecdsa.signatureS), "big")
        return bytes(attest), encode_dss_signature(r, s)

    def tpm_root(self, qualifying_data: bytes, pcr: int = 23) -> dict:
        """The evidence's `root` for a TPM (docs/attestation.md): a quote over `pcr`."""
        quote, signature = self.quote([pcr], qualifying_data)
        return {"kind": "tpm", "quote": quote.hex(), "quote_sig": signature.hex(),
                "tpm_ak_pub": self.attestation_key().hex(),
                "pcrs": {str(pcr): self.read_pcr(pcr).hex()}}


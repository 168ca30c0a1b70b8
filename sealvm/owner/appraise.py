"""Appraisal of attestation evidence against the owner's policy and a VM's signed manifest.

The key broker runs these steps, after its nonce check, in the order of
docs/attestation.md and stops at the first `Refusal`; `sealvm owner verify` runs
them all offline and prints each outcome.  A refusal's reason is the text the
broker returns with HTTP 403, so it names the check and what differs.

Steps: evidence signature (ak_pub) -> root (software host key in trusted_hosts and
its log signature, or a TPM quote by a key in trusted_tpms; require_tpm) -> core
measurement in core_measurements -> core version >= the policy's and manifest's
minimum -> the core serves this owner (core-config owner_wrap) -> guest entries
equal the signed manifest.

`Context.disabled` names defences switched off for paired security tests only; the
broker fills it from SEALVM_BROKER_TEST_DISABLE, and only under SEALVM_TEST_MODE=1.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from ..wire import attest as A

TPM_VERIFIER = "sealvm.owner.tpm_verify"


class Refusal(Exception):
    """The evidence failed a check; `reason` is what the requester is told."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Context:
    policy: dict
    manifest: dict | None
    owner_wrap_pub: bytes
    disabled: frozenset[str] = field(default_factory=frozenset)

    def off(self, defence: str) -> bool:
        return defence in self.disabled


def parse(data: bytes) -> dict:
    try:
        return A.parse_evidence(data)
    except A.AttestError as e:
        raise Refusal(f"malformed evidence: {e}") from None


def check_signature(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    if ctx.off("ak_sig"):
        return "not checked (test switch)"
    try:
        A.check_evidence_signature(data, ev, sig)
    except A.AttestError:
        raise Refusal("evidence signature does not verify with ak_pub") from None
    return f"by ak_pub {ev['ak_pub'][:16]}..."


def _tpm_verify_quote() -> Callable:
    try:
        module = importlib.import_module(TPM_VERIFIER)
    except ModuleNotFoundError as e:
        if e.name != TPM_VERIFIER:
            raise
        raise Refusal("TPM evidence not supported by this broker") from None
    return module.verify_quote


def check_root(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    root, policy = ev["root"], ctx.policy
    if root["kind"] == "software":
        if policy["require_tpm"] and not ctx.off("require_tpm"):
            raise Refusal("policy requires a TPM root; this evidence has a software root")
        host = root["host_pub"]
        if host not in policy["trusted_hosts"] and not ctx.off("root_trust"):
            raise Refusal(f"software root: host key {host} is not in policy trusted_hosts")
        if not ctx.off("root_sig"):
            try:
                A.verify_log_sig(bytes.fromhex(host), ev["log"], bytes.fromhex(root["log_sig"]))
            except A.AttestError:
                raise Refusal("software root: log signature does not verify with host_pub "
                              "(log altered after the launcher signed it?)") from None
        return f"software (no TPM), host key {host[:16]}..."
    verify_quote = _tpm_verify_quote()
    trusted = list(policy["trusted_tpms"])
    if ctx.off("root_trust"):
        trusted.append(root["tpm_ak_pub"])
    if ctx.off("root_sig"):
        if root["tpm_ak_pub"] not in trusted:
            raise Refusal("tpm trust: tpm_ak_pub is not in the policy's trusted_tpms")
        return "tpm, quote not checked (test switch)"
    qd = A.qualifying_data(bytes.fromhex(ev["nonce"]), bytes.fromhex(ev["ak_pub"]),
                           bytes.fromhex(ev["ephemeral_pub"]))
    try:
        verify_quote(root, A.replay(ev["log"]), qd, trusted)
    except ValueError as e:
        raise Refusal(str(e) if str(e).startswith("tpm") else f"tpm: {e}") from None
    return f"tpm, AK {root['tpm_ak_pub'][-16:]}"


def check_core(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    measured = A.core_measurement(ev["log"]).hex()
    if measured not in ctx.policy["core_measurements"] and not ctx.off("core_measurement"):
        raise Refusal(f"core measurement {measured} is not in policy core_measurements")
    return measured


def _core_config(ev: dict) -> dict:
    try:
        return A.core_config(ev["log"])
    except A.AttestError as e:
        raise Refusal(f"core config: {e}") from None


def check_version(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    version = _core_config(ev)["core_version"]
    floor_policy = ctx.policy["min_core_version"]
    floor_manifest = ctx.manifest["min_core_version"] if ctx.manifest else 0
    if version < max(floor_policy, floor_manifest) and not ctx.off("core_version"):
        raise Refusal(f"core version {version} is below the minimum "
                      f"{max(floor_policy, floor_manifest)} (policy {floor_policy}, "
                      f"manifest {floor_manifest})")
    return str(version)


def check_owner(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    theirs = _core_config(ev)["owner_wrap"]
    if theirs != ctx.owner_wrap_pub and not ctx.off("owner_key"):
        raise Refusal(f"core serves another owner: its core-config owner_wrap is "
                      f"{theirs.hex()[:16]}..., this broker's is "
                      f"{ctx.owner_wrap_pub.hex()[:16]}...")
    return f"owner_wrap {theirs.hex()[:16]}..."


def check_manifest(data: bytes, ev: dict, sig: bytes, ctx: Context) -> str:
    if ctx.manifest is None:
        raise Refusal(f"unknown VM {ev['vm']!r}: no signed manifest in the owner's directory")
    if ctx.off("manifest"):
        return "not compared (test switch)"
    try:
        measured = A.guest_values(ev["log"])
    except A.AttestError as e:
        raise Refusal(f"guest entries: {e}") from None
    differs = A.compare_manifest(ctx.manifest, **measured)
    if differs:
        raise Refusal("manifest mismatch: " + "; ".join(differs))
    return f"image {measured['image_sha256'][:16]}..., cmdline, config as signed"


STEPS: tuple[tuple[str, Callable[[bytes, dict, bytes, Context], str]], ...] = (
    ("evidence signature", check_signature),
    ("root", check_root),
    ("core measurement", check_core),
    ("core version", check_version),
    ("owner", check_owner),
    ("manifest", check_manifest),
)


def appraise(data: bytes, ev: dict, sig: bytes, ctx: Context) -> dict[str, str]:
    """Run every step in order; raise the first Refusal; return each step's finding."""
    return {name: step(data, ev, sig, ctx) for name, step in STEPS}


def report(data: bytes, sig: bytes,
           ctx_for: Callable[[dict], Context]) -> list[tuple[str, bool, str]]:
    """Every step's (name, passed, finding or reason), for an offline appraisal.

    `ctx_for(evidence)` builds the context once the evidence names its VM."""
    try:
        ev = parse(data)
    except Refusal as r:
        return [("structure", False, r.reason)]
    out = [("structure", True, f"VM {ev['vm']!r}, {len(ev['log'])} log entries, "
                               f"nonce {ev['nonce'][:16]}... (freshness is not checked offline)")]
    ctx = ctx_for(ev)
    for name, step in STEPS:
        try:
            out.append((name, True, step(data, ev, sig, ctx)))
        except Refusal as r:
            out.append((name, False, r.reason))
    return out

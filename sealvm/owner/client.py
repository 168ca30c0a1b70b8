"""The preboot stage's side of key release: ask the owner's broker for a VM's keys.

    wrapped, salt = attest(broker_url, vm, make_evidence)

does `POST /v1/challenge` for `vm`, calls `make_evidence(nonce)` (the core signs
evidence over that nonce and returns `(evidence_bytes, signature)`), then
`POST /v1/attest`, and returns the wrapped keys and salt for the core to open with
`attest.unwrap_keys`.  Nothing the broker returns is trusted here: only sizes and
hex are checked; the core's unwrap is what proves the keys came from the owner.

A refusal raises `BrokerRefused` carrying the broker's reason; a broker that cannot
be reached or answers nonsense raises `BrokerUnavailable`.

What a caller should do with each outcome:
- success: hand (wrapped, salt) to the core, which opens them with
  `unwrap_keys(wrapped, salt, ephemeral_private, nonce, owner_wrap_pub)`; if that
  fails, the answer was swapped or altered on the way, and the VM must not boot.
- `BrokerRefused`: the owner's policy said no (the reason names the check). Do not
  retry with the same evidence: its nonce is spent. Report the reason and stop.
- `BrokerUnavailable`: nothing was appraised, or the answer was lost. Retrying is
  safe, but always from a fresh challenge with a fresh ephemeral key.
The `make_evidence` callable runs between the two requests, so the nonce's 60 s
cover the core's signing; keep it short.
"""
from __future__ import annotations

from typing import Callable

import httpx

from ..wire import attest as A

DEFAULT_TIMEOUT = 30.0


class BrokerRefused(Exception):
    """The broker appraised the evidence and said no; `reason` is its 403 error text."""

    def __init__(self, reason: str, status: int = 403):
        super().__init__(f"key broker refused (HTTP {status}): {reason}")
        self.reason, self.status = reason, status


class BrokerUnavailable(Exception):
    """The broker could not be reached, or its answer was not in the contract's format."""


def _post(http: httpx.Client, url: str, body: dict) -> dict:
    try:
        r = http.post(url, json=body)
    except httpx.HTTPError as e:
        raise BrokerUnavailable(f"key broker at {url} unreachable: {e}") from None
    try:
        answer = r.json()
    except ValueError:
        raise BrokerUnavailable(f"key broker at {url} answered HTTP {r.status_code} with "
                                f"non-JSON: {r.text[:200]!r}") from None
    if r.status_code != 200:
        reason = answer.get("error") if isinstance(answer, dict) else None
        if not isinstance(reason, str):
            raise BrokerUnavailable(f"key broker at {url} answered HTTP {r.status_code} without "
                                    "an error reason")
        raise BrokerRefused(reason[:2000], r.status_code)
    if not isinstance(answer, dict):
        raise BrokerUnavailable(f"key broker at {url}: answer is not a JSON object")
    return answer


def _field(answer: dict, name: str, n: int | None, max_n: int | None, url: str) -> bytes:
    try:
        return A.check_hex(answer.get(name), name, n, max_n)
    except A.AttestError as e:
        raise BrokerUnavailable(f"key broker at {url}: bad answer: {e}") from None


def challenge(http: httpx.Client, base: str, vm: str) -> bytes:
    """A fresh 32-byte nonce for `vm`."""
    url = f"{base}/v1/challenge"
    return _field(_post(http, url, {"vm": vm}), "nonce", 32, None, url)


def submit(http: httpx.Client, base: str, evidence: bytes, signature: bytes) -> tuple[bytes, bytes]:
    """Send signed evidence; (wrapped, salt) on release."""
    url = f"{base}/v1/attest"
    answer = _post(http, url, {"evidence": bytes(evidence).decode("ascii"),
                               "signature": bytes(signature).hex()})
    return (_field(answer, "wrapped", None, A.MAX_WRAPPED, url),
            _field(answer, "salt", 32, None, url))


def attest(broker_url: str, vm: str,
           make_evidence: Callable[[bytes], tuple[bytes, bytes]],
           timeout: float = DEFAULT_TIMEOUT,
           http: httpx.Client | None = None) -> tuple[bytes, bytes]:
    """Challenge, then attest: returns (wrapped, salt) or raises BrokerRefused/BrokerUnavailable."""
    base = broker_url.rstrip("/")
    own = http is None
    # trust_env off: no proxy, netrc or CA settings from the (host's) environment
    client = http if http is not None else httpx.Client(timeout=timeout, trust_env=False)
    try:
        nonce = challenge(client, base, vm)
        evidence, signature = make_evidence(nonce)
        return submit(client, base, evidence, signature)
    finally:
        if own:
            client.close()

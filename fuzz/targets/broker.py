"""The owner's key broker's request parsing (sealvm/owner/broker.py: challenge, attest, advance).

A real Broker over a real owner directory (keys, signed manifest, signed policy that
trusts the fixed core measurement and host key of fuzz/targets/_evidence.py).
Byte 0 picks the mode:
* 0: the rest is a request body (JSON) for the operation byte 1 names, as the HTTP
  layer hands it over once it parsed as JSON;
* 1: a fresh challenge, then patches to that nonce's valid evidence, re-signed with
  the attestation key, sent to attest;
* 2: patches to a genuine generation ticket, sent to advance.
Refusal: Refusal (HTTP 403).  Anything else, BrokerFault included (HTTP 500), is a
crash: the owner's configuration here is valid.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

from fuzz.targets import _evidence as E
from sealvm.owner import broker as B
from sealvm.owner import keys, manifest, policy
from sealvm.owner.appraise import Refusal
from sealvm.wire import attest as A

MODULES = ["sealvm.owner.broker", "sealvm.owner.appraise"]
EXPECTED = (Refusal,)
MAX_LEN = 8192
broker: B.Broker | None = None
owner: Path | None = None
ticket = b""


def setup() -> None:
    global broker, owner, ticket
    if broker is not None:
        return
    work = tempfile.mkdtemp(prefix="sealvm-fuzz-owner-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    owner = Path(work) / "owner"
    keys.init(owner)
    image = owner.parent / "g.elf"
    image.write_bytes(E.IMAGE)
    manifest.sign_guest(owner, image, E.VM, cmdline=E.CMDLINE)
    wrap = keys.load_public(owner)["wrap"]
    policy.edit(owner, "add", "core", A.core_measurement(E.log(wrap)).hex())
    policy.edit(owner, "add", "host", E.HOST.public_key().public_bytes_raw().hex())
    broker = B.Broker(owner, environ={})
    snap = A.parse_vm_keys(B.load_vm_keys(owner, E.VM))["snapshot"]
    ticket = A.advance_ticket(snap, E.VM, 1, bytes(16), bytes(16))


def _trim_log() -> None:
    log = owner / B.LOG_FILE
    if log.exists() and log.stat().st_size > 4 << 20:
        os.truncate(log, 0)


def one(data: bytes) -> None:
    if len(data) < 2:
        return
    _trim_log()
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        try:
            body = json.loads(rest[1:])
        except (ValueError, RecursionError):
            return                      # the HTTP layer refuses it before the broker
        (broker.challenge, broker.attest, broker.advance)[rest[0] % 3](body, "fuzz")
    elif mode == 1:
        nonce = bytes.fromhex(broker.challenge({"vm": E.VM}, "fuzz")["nonce"])
        ev = E.patch(E.evidence(nonce, keys.load_public(owner)["wrap"]), rest)
        broker.attest({"evidence": ev.decode("utf-8", "replace"),
                       "signature": E.AK.sign(ev).hex()}, "fuzz")
    else:
        broker.advance({"ticket": E.patch(ticket, rest).decode("utf-8", "replace")}, "fuzz")


def seeds() -> list[bytes]:
    return [b"\0\0" + b'{"vm":"web1"}', b"\0\1" + b'{"evidence":"{}","signature":"00"}',
            b"\0\2" + b'{"ticket":"{}"}', b"\1\1", b"\1" + (30).to_bytes(2, "little") + b"\2ab",
            b"\2\0", b"\2" + (12).to_bytes(2, "little") + b"\1x"]

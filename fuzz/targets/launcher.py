"""The root launcher's request parser (sealvm/launcher/protocol.py).

The only code running as root that reads bytes from the untrusted daemon.  Refusal:
LaunchError.  What it accepts must be within the documented bounds: SPAWN with a VM id
of 1-63 of [a-z0-9-] (starting with a letter or digit, nothing else, not even a
newline), 2..65536 MiB and known flags only; PING with no fields.
"""
from __future__ import annotations

import re

from fuzz.target import Violation
from sealvm.launcher import protocol as L
from sealvm.launcher.spawn import MAX_MEMORY_MIB, LaunchError

MODULES = ["sealvm.launcher.protocol"]
EXPECTED = (LaunchError,)
MAX_LEN = L.REQUEST_SIZE + 8
_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def setup() -> None:
    pass


def one(data: bytes) -> None:
    req = L.parse_request(data)
    if req.op == L.OP_PING:
        if (req.vm_id, req.memory_mib, req.flags) != ("", 0, 0):
            raise Violation(f"PING with fields: {req}")
        return
    if req.op != L.OP_SPAWN:
        raise Violation(f"unknown op accepted: {req}")
    if not _ID.fullmatch(req.vm_id):
        raise Violation(f"VM id {req.vm_id!r} accepted")
    if not 2 <= req.memory_mib <= MAX_MEMORY_MIB:
        raise Violation(f"memory {req.memory_mib} MiB accepted")
    if req.flags & ~(L.FLAG_INSECURE_SAME_UID | L.FLAG_ATTEST):
        raise Violation(f"flags {req.flags:#x} accepted")


def seeds() -> list[bytes]:
    return [L.encode_request(L.OP_SPAWN, "vm-1", 256),
            L.encode_request(L.OP_SPAWN, "a" * 63, 65536, L.FLAG_ATTEST),
            L.encode_request(L.OP_PING), bytes(L.REQUEST_SIZE)]

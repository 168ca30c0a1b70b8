"""Valid attestation evidence from fixed keys, and byte patches applied to it."""
from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sealvm.wire import attest as A

AK = Ed25519PrivateKey.from_private_bytes(b"\1" * 32)
HOST = Ed25519PrivateKey.from_private_bytes(b"\2" * 32)
EPH = X25519PrivateKey.from_private_bytes(b"\3" * 32)
VM, CMDLINE, IMAGE = "web1", "console=hvc0", b"\x7fELF guest" * 16
CODE = (("interpreter", "/usr/bin/python3.11", b"py"), ("core-file", "sealvm/core/main.py", b"m"))


def log(owner_wrap: bytes, extra: list | None = None) -> list[dict]:
    h = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    return ([A.make_entry(k, n, h(d)) for k, n, d in CODE]
            + [A.core_config_entry(1, owner_wrap), A.ak_entry(AK.public_key()),
               *A.guest_entries(h(IMAGE), CMDLINE, 256, 1, "pvh", ["rng"]), *(extra or [])])


def evidence(nonce: bytes, owner_wrap: bytes, extra: list | None = None) -> bytes:
    entries = log(owner_wrap, extra)
    root = A.software_root(HOST.public_key(), A.sign_log(HOST, entries))
    return A.make_evidence(VM, nonce, entries, AK, EPH.public_key(), root)[0]


def patch(base: bytes, spec: bytes) -> bytes:
    """{offset u16, length u8, bytes} patches; length 0xFF deletes up to 32 bytes instead."""
    out = bytearray(base)
    pos = 0
    while pos + 3 <= len(spec):
        off = int.from_bytes(spec[pos:pos + 2], "little") % (len(out) + 1)
        n = spec[pos + 2]
        if n == 0xFF:
            del out[off:off + (spec[pos + 3] if pos + 3 < len(spec) else 1) % 33]
            pos += 4
            continue
        out[off:off + n] = spec[pos + 3:pos + 3 + n]
        pos += 3 + n
    return bytes(out)

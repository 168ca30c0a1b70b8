"""The core's portal decoder: request frames from the untrusted host (sealvm/wire/portal*.py).

Modes (first byte): a whole frame; a valid header over fuzzer payload bytes; a byte
stream through FrameReader in fuzzer-chosen pieces.  Refusal: PortalError.  Whatever
decodes must re-encode to the same bytes; the reader never returns a payload longer
than its header or MAX_PAYLOAD.
"""
from __future__ import annotations

from fuzz.targets import _portal
from sealvm.wire.portal_schema import PortalError

MODULES = ["sealvm.wire.portal", "sealvm.wire.portal_schema", "sealvm.wire.portal_io",
           "sealvm.wire.portal_ops"]
EXPECTED = (PortalError,)


def setup() -> None:
    pass


def one(data: bytes) -> None:
    _portal.one(data, core_side=True, kinds=(1,))


def seeds() -> list[bytes]:
    return _portal.seeds(core_side=True)

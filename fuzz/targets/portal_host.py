"""The host's decoder of what the core sends: replies and events (sealvm/wire/portal_client.py).

The host trusts the core no more than the core trusts it: a malformed reply or event
must fail with PortalError, never anything else.  Same three modes as portal_core.
"""
from __future__ import annotations

from fuzz.targets import _portal
from sealvm.wire.portal_schema import PortalError

MODULES = ["sealvm.wire.portal_client", "sealvm.wire.portal", "sealvm.wire.portal_schema",
           "sealvm.wire.portal_io"]
EXPECTED = (PortalError,)


def setup() -> None:
    pass


def one(data: bytes) -> None:
    _portal.one(data, core_side=False, kinds=(2, 3))


def seeds() -> list[bytes]:
    return _portal.seeds(core_side=False)

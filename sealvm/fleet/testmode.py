"""Defences a paired control may switch off (only with SEALVM_TEST_MODE=1).

SEALVM_FLEET_TEST_DISABLE is a comma-separated list of: code, launcher, core, config
(a golden value), tracer (traced cores), agent-key (the evidence's signature and
the quote's binding to the enrolled agent key), nonce, stale (evidence),
report-signature (the controller's check of a neighbour's report).
"""
from __future__ import annotations

import os


def test_disabled(check: str) -> bool:
    if os.environ.get("SEALVM_TEST_MODE") != "1":
        return False
    return check in os.environ.get("SEALVM_FLEET_TEST_DISABLE", "").split(",")

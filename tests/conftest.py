"""Shared test helpers: where the built guests are, and running `sealvm` for real."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUEST_DIR = ROOT / "guests" / "build"
HAVE_KVM = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)

needs_kvm = pytest.mark.skipif(not HAVE_KVM, reason="no usable /dev/kvm on this machine")


@contextlib.contextmanager
def environ(**values: str):
    """These environment variables set for the block (what a daemon or core started in it
    inherits), then put back as they were."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def poll(pred, timeout: float, step: float = 0.1):
    """`pred()`'s first true value within `timeout` seconds, else None (the caller says
    what it was waiting for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    return None


def guest_image(name: str) -> Path:
    path = GUEST_DIR / f"{name}.elf"
    if not path.exists():
        pytest.fail(f"{path} is missing: build the guests with `make guests`")
    return path


def sealvm(*args: str, timeout: float = 120, input: bytes | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the `sealvm` CLI in a fresh interpreter and capture its output."""
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=ROOT,
                          capture_output=True, timeout=timeout, input=input,
                          env={**os.environ, **(env or {})})


def pytest_report_header(config):
    return [f"/dev/kvm: {'present' if HAVE_KVM else 'ABSENT - KVM tests will be skipped'}"]


# The attack catalogue's markers and, with SEALVM_SECURITY_REPORT set, its table.
from tests.security.catalog import (pytest_collection_modifyitems, pytest_configure,  # noqa: E402,F401
                                    pytest_runtest_logreport, pytest_sessionfinish)

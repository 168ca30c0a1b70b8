"""What a fuzz target is, and the oracle every target shares.

A target module in fuzz/targets/ defines:

* `MODULES`: the sealvm modules whose code it exercises (instrumented for the
  coverage-guided fuzzer, and counted for line coverage);
* `EXPECTED`: the exception types that are the code's documented, clean
  refusal of bad input (for example `PortalError`); anything else is a crash;
* `setup()`: builds whatever the input needs (keys, a small disk, guest RAM);
  called once per process, after the instrumented import;
* `one(data)`: feeds one input to the real parser; it may also raise
  `Violation` when the parser *accepted* something it must not (an
  out-of-bounds field, a forged record that opened);
* `seeds()`: small valid inputs, written to fuzz/corpus/<target>/.

`check(target, data)` is the oracle: it runs `one` and turns any exception not
in `EXPECTED` into a `Crash` that names the input.
"""
from __future__ import annotations

import importlib
import traceback
from types import ModuleType

NAMES = [
    "portal_core", "portal_host", "launcher", "virtqueue", "virtio_blk", "virtio_net",
    "virtio_rng", "diskseal", "sealed", "snapshot", "migration", "tunnel", "attest",
    "broker", "fleet_evidence",
]


class Violation(AssertionError):
    """The parser accepted an input it must refuse, or broke one of its own invariants."""


class Crash(Exception):
    """An input made the target raise something its contract does not allow."""

    def __init__(self, target: str, data: bytes, error: BaseException):
        tb = "".join(traceback.format_exception(error)).rstrip()
        super().__init__(f"{target}: {type(error).__name__}: {error}\n"
                         f"input ({len(data)} bytes): {data[:96].hex()}\n{tb}")
        self.error = error
        self.data = data


def load(name: str) -> ModuleType:
    if name not in NAMES:
        raise KeyError(f"unknown fuzz target {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"fuzz.targets.{name}")


def check(name: str, mod: ModuleType, data: bytes) -> None:
    try:
        mod.one(data)
    except mod.EXPECTED:
        pass
    except Exception as e:   # noqa: BLE001 - the oracle: anything else is a crash
        raise Crash(name, data, e) from None

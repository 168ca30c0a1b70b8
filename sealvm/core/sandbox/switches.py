"""Test-only switches that turn single defences off, for paired security tests.

A security test shows an attack failing with the defence on; its paired control
shows the same attack succeeding with exactly that defence off.  Turn one off with

    SEALVM_TEST_MODE=1 SEALVM_INSECURE_TEST_DISABLE=dumpable,seccomp

The variables are read once, when this module is imported.  Without
SEALVM_TEST_MODE=1 the list is ignored (and that is logged), so a stray variable
in production cannot weaken a core.  When honoured, the disabled defences are
announced on stderr at import and again each time one is skipped.  An unknown
name is an error at the first defence that consults the list: a typo must not
leave a test believing a defence is off when it is on.

One coupling comes from the kernel: a process without CAP_SYS_ADMIN may only
install a seccomp filter under no_new_privs, so an unprivileged core with
`no_new_privs` disabled cannot install its filter either (install_core_filter
raises); disable `no_new_privs,seccomp` together for that control.
"""
from __future__ import annotations

import logging
import os
import sys

from .libc import SandboxError

log = logging.getLogger("sealvm.core.sandbox")

DEFENCES: tuple[str, ...] = (
    "dumpable",       # PR_SET_DUMPABLE=0
    "no_new_privs",   # PR_SET_NO_NEW_PRIVS=1
    "memlock_check",  # refusing to start when RLIMIT_MEMLOCK is too low
    "close_fds",      # close_other_fds
    "mlock",          # lock_memory / lock_all_memory
    "dont_dump",      # madvise(MADV_DONTDUMP)
    "seccomp",        # install_core_filter
    "disk_integrity", # sealed disk reads checked against tag, position, version, tree
    "disk_fencing",   # the owner generation stamped on each disk commit (an old copy is fenced)
    "virtio_chain_bound",  # descriptor chains visit each table entry at most once (loops)
    "disk_witness",   # the launcher's record of each disk's newest generation (whole-disk rollback)
)
# Defences of the sealed network (core/net_tunnel.py), switched by the same variable.
NET_DEFENCES: tuple[str, ...] = (
    "net_seal",       # sealing network frames (AEAD): off, they travel in clear, unauthenticated
    "net_replay",     # the tunnel's replay window: off, a replayed datagram is delivered again
)
ENV_DISABLE = "SEALVM_INSECURE_TEST_DISABLE"
ENV_TEST_MODE = "SEALVM_TEST_MODE"
ENV_NET_KEY = "SEALVM_TEST_NET_KEY"          # 64 hex digits: the tunnel key without an owner
ENV_NET_REKEY = "SEALVM_TEST_NET_REKEY"      # rekey after this many messages (default 2**60)


def _shout(text: str) -> None:
    """On stderr always, and to the log too when logging is configured."""
    if log.hasHandlers():
        log.critical(text)
    try:
        sys.stderr.write(f"sealvm: {text}\n")
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):
        pass


def parse(environ: dict[str, str] | os._Environ) -> tuple[frozenset[str], frozenset[str]]:
    """(disabled defences, unknown names) as `environ` asks; empty unless test mode."""
    raw = environ.get(ENV_DISABLE, "")
    names = {n.strip() for n in raw.split(",") if n.strip()}
    if not names:
        return frozenset(), frozenset()
    if environ.get(ENV_TEST_MODE) != "1":
        _shout(f"IGNORING {ENV_DISABLE}={raw!r}: honoured only with {ENV_TEST_MODE}=1; "
               "all defences stay on")
        return frozenset(), frozenset()
    known = set(DEFENCES) | set(NET_DEFENCES)
    unknown = frozenset(names - known)
    disabled = frozenset(names & known)
    if disabled:
        _shout("INSECURE TEST MODE: these defences are DISABLED: " + ", ".join(sorted(disabled))
               + " -- never run a real guest like this")
    return disabled, unknown


_DISABLED, _UNKNOWN = parse(os.environ)


def disabled(defence: str) -> bool:
    """True when `defence` was switched off for a test (and says so loudly)."""
    if defence not in DEFENCES + NET_DEFENCES:
        raise ValueError(f"unknown defence {defence!r}")
    if _UNKNOWN:
        raise SandboxError(0, f"{ENV_DISABLE} names unknown defences {sorted(_UNKNOWN)}; "
                              f"known: {', '.join(DEFENCES + NET_DEFENCES)}")
    if defence in _DISABLED:
        _shout(f"INSECURE TEST MODE: skipping defence {defence!r}")
        return True
    return False


ENV_DISK_KEY = "SEALVM_TEST_DISK_KEY"


def test_disk_key(environ: dict[str, str] | os._Environ = os.environ) -> bytes | None:
    """A disk key given in the environment (64 hex digits): honoured only in test mode.

    An unattested core has no owner to release its disk key; tests hand one in here.
    Outside SEALVM_TEST_MODE=1 the variable is ignored (and that is said loudly).
    """
    raw = environ.get(ENV_DISK_KEY, "")
    if not raw:
        return None
    if environ.get(ENV_TEST_MODE) != "1":
        _shout(f"IGNORING {ENV_DISK_KEY}: honoured only with {ENV_TEST_MODE}=1")
        return None
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise SandboxError(0, f"{ENV_DISK_KEY} must be 64 hex digits")
    _shout("INSECURE TEST MODE: the disk key comes from the environment, not from the owner")
    return key


def disabled_defences() -> frozenset[str]:
    """The defences switched off in this process (empty outside test mode)."""
    return _DISABLED


def test_net_key() -> bytes | None:
    """The tunnel key a test hands a core that has no owner (None outside test mode)."""
    raw = os.environ.get(ENV_NET_KEY, "")
    if not raw or os.environ.get(ENV_TEST_MODE) != "1":
        return None
    key = bytes.fromhex(raw)
    if len(key) != 32:
        raise ValueError(f"{ENV_NET_KEY} must be 64 hex digits")
    _shout("TEST MODE: the network tunnel uses a key from the environment, not the owner's")
    return key


def test_net_options() -> dict:
    """Tunnel options for tests (a low rekey limit); empty outside test mode."""
    raw = os.environ.get(ENV_NET_REKEY, "")
    if not raw or os.environ.get(ENV_TEST_MODE) != "1":
        return {}
    return {"rekey_after_messages": int(raw)}

"""The host daemon's uid attacks a running core's memory and process.

Two defences stand between the daemon's uid and a core: the core runs under a
uid of its own (one per VM), and it is not dumpable (PR_SET_DUMPABLE=0), which
stops even a same-uid process.  Each attack is tried against a core with both
defences; then each defence alone is shown to stop it; and each paired
control switches off exactly the defence under test and shows the attack then
succeeds (reading the guest's secret), so none of these tests can pass vacuously.
"""
from __future__ import annotations

import signal

import pytest

from tests.conftest import needs_kvm
from tests.security.harness import (ATTACKER_UID, as_uid, attack_open_memfd, attack_pidfd_getfd,
                                    attack_proc_mem, attack_process_vm_readv, attack_ptrace,
                                    attack_signal, search_process_memory, search_readable,
                                    start_core)

pytestmark = needs_kvm

CONFIGS = {
    # name: (core under the attacker's uid?, defences switched off)
    "sealed": (False, ()),
    "own-uid-only": (False, ("dumpable",)),       # the per-VM uid alone
    "not-dumpable-only": (True, ()),              # PR_SET_DUMPABLE=0 alone
    "no-defence": (True, ("dumpable",)),          # the control for both
}


@pytest.fixture(scope="module")
def cores():
    started = {}
    try:
        for name, (same_uid, disable) in CONFIGS.items():
            started[name] = start_core(same_uid_as_attacker=same_uid, disable=disable)
        yield started
    finally:
        for c in started.values():
            c.close()


def _memory_attacks(core):
    addr, _ = core.guest_ram()
    ram = addr + 0x200000
    fd = core.memfd_fd_number()
    return {
        "ptrace-attach": (attack_ptrace, (core.pid,)),
        "proc-pid-mem": (attack_proc_mem, (core.pid, ram, 16)),
        "process_vm_readv": (attack_process_vm_readv, (core.pid, ram, 16)),
        "open-memfd-via-proc-fd": (attack_open_memfd, (core.pid, fd, 16)),
        "pidfd_getfd-memfd": (attack_pidfd_getfd, (core.pid, fd, 16)),
    }


def _succeeded(result, secret: bytes) -> bool:
    kind, value = result
    if kind != "ok":
        return False
    return value == "attached" or (isinstance(value, bytes) and secret in value)


ATTACKS = ["ptrace-attach", "proc-pid-mem", "process_vm_readv", "open-memfd-via-proc-fd",
           "pidfd_getfd-memfd"]


@pytest.mark.attack(adversary='host daemon', asset='guest memory',
                    technique="read the core's guest RAM",
                    defence='own uid per core + not dumpable',
                    outcome='EPERM/EACCES for each; the VM keeps running',
                    control='test_control_without_the_defences_the_attack_works', variants='attack')
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("config", ["sealed", "own-uid-only", "not-dumpable-only"])
def test_daemon_uid_cannot_reach_core_memory(cores, attack, config):
    core = cores[config]
    secret = core.read_canary()
    fn, args = _memory_attacks(core)[attack]
    result = as_uid(ATTACKER_UID, fn, *args)
    assert not _succeeded(result, secret), f"{attack} against a {config} core: {result}"
    assert result[0] == "error" or result[1] != "attached"
    assert core.link.query()["state"] == 2, "the VM must keep running"


@pytest.mark.parametrize("attack", ATTACKS)
def test_control_without_the_defences_the_attack_works(cores, attack):
    core = cores["no-defence"]
    secret = core.read_canary()
    fn, args = _memory_attacks(core)[attack]
    result = as_uid(ATTACKER_UID, fn, *args)
    assert _succeeded(result, secret), f"control {attack} should succeed: {result}"


@pytest.mark.attack(adversary='host daemon', asset='vCPU state',
                    technique='SIGSTOP/SIGKILL/SIGTERM/SIGUSR1 the core',
                    defence='own uid per core',
                    outcome='PermissionError; the VM keeps running',
                    control='test_control_same_uid_core_can_be_signalled')
def test_daemon_uid_cannot_signal_the_core(cores):
    for sig in (signal.SIGSTOP, signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
        kind, value = as_uid(ATTACKER_UID, attack_signal, cores["sealed"].pid, sig)
        assert kind == "error" and "PermissionError" in value, (sig, value)
    assert cores["sealed"].link.query()["state"] == 2


def test_control_same_uid_core_can_be_signalled(cores):
    core = cores["no-defence"]
    assert as_uid(ATTACKER_UID, attack_signal, core.pid, signal.SIGSTOP) == ("ok", "delivered")
    assert as_uid(ATTACKER_UID, attack_signal, core.pid, signal.SIGCONT) == ("ok", "delivered")


def _canary_hits(core):
    secret = core.read_canary()
    assert len(secret) == 16 and secret != bytes(16)

    def search():
        hits = search_readable([core.run_dir, "/tmp", "/var/tmp", "/dev/shm"], secret)
        for pid in [p for p in __import__("os").listdir("/proc") if p.isdigit()]:
            hits += [f"pid {pid}: {h}" for h in search_process_memory(int(pid), secret)]
        return hits
    return as_uid(ATTACKER_UID, search, timeout=120)


@pytest.mark.attack(adversary='host daemon', asset='guest memory',
                    technique="search every file and process memory the daemon uid can read for the guest's secret",
                    defence='own uid + not dumpable + memfd not shared',
                    outcome='zero occurrences',
                    control='test_control_guest_secret_found_without_the_defences')
def test_guest_secret_is_nowhere_the_daemon_uid_can_read(cores):
    kind, hits = _canary_hits(cores["sealed"])
    assert kind == "ok" and hits == [], hits


def test_control_guest_secret_found_without_the_defences(cores):
    kind, hits = _canary_hits(cores["no-defence"])
    assert kind == "ok" and any(f"pid {cores['no-defence'].pid}" in h for h in hits), hits

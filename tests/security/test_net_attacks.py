"""Attacks by the host's relay on a VM's sealed network, against the running system.

A real core (real launcher, seccomp, its own uid) runs the netecho guest; the
owner's gateway (sealvm.owner.gateway, in the owner's namespace, with a TAP
device) ends the tunnel; the host's relay (sealvm.host.netrelay, in the host's
namespace) is made hostile through its `tamper` hook: it alters, injects,
replays, reorders and truncates datagrams.  Each attack is dropped and counted
(the core reports its counters in LOG events, the gateway keeps its own), and
afterwards the guest still answers on the same session.  The guest sends a
canary every second; a raw capture on the host's interface never sees it.

Paired controls switch off one defence in the core (SEALVM_INSECURE_TEST_DISABLE
net_replay / net_seal) and in the gateway alike, and the attack then succeeds.
"""
from __future__ import annotations

import os
import re
import tempfile
import time

import pytest

from sealvm.host.corelink import CoreLink
from sealvm.host.netrelay import Relay
from sealvm.launcher.spawn import spawn_core
from sealvm.owner.gateway import Gateway, open_tap
from sealvm.wire.portal_ops import AttachKind
from tests.conftest import environ, guest_image, needs_kvm
from tests.netlab import (GATEWAY_PORT, GUEST_IP, GW_VETH, Capture, NetLab, echo, in_netns, netlab_or_skip, udp_socket)
from tests.security.harness import ATTACKER_UID, CORE_UID_RANGE

pytestmark = [needs_kvm, pytest.mark.skipif(bool(netlab_or_skip()), reason=str(netlab_or_skip()))]

CANARY = b"NET-CANARY-7f3a91c2"
GUEST_MAC = "02:53:45:41:4c:01"
DATA = 4


class NetVM:
    """netecho behind a core, a relay in the host namespace and a gateway in the owner's."""

    def __init__(self, lab: NetLab, *, disable: tuple[str, ...] = (), rekey: int | None = None):
        self.lab = lab
        self.log: list[str] = []
        self.console = bytearray()
        key = os.urandom(32)
        opts = {"seal_frames": "net_seal" not in disable, "replay_check": "net_replay" not in disable}
        self.tap = in_netns(lab.gw, lambda: open_tap("svtap0"))
        lab.up_tap()
        os.system(f"ip -n {lab.gw} neigh replace {GUEST_IP} lladdr {GUEST_MAC} dev svtap0 "
                  "nud permanent")
        self.gw = Gateway(key, udp_socket(lab.gw, (GW_VETH, GATEWAY_PORT)), tap_fd=self.tap,
                          tunnel_options=opts)
        import threading
        threading.Thread(target=self.gw.serve, daemon=True).start()
        self.relay = Relay((GW_VETH, GATEWAY_PORT), udp=udp_socket(lab.host))
        self.relay.seen = []
        env = {"SEALVM_TEST_MODE": "1", "SEALVM_TEST_NET_KEY": key.hex()}
        if disable:
            env["SEALVM_INSECURE_TEST_DISABLE"] = ",".join(disable)
        if rekey:
            env["SEALVM_TEST_NET_REKEY"] = str(rekey)
        self.run_dir = tempfile.mkdtemp(prefix="sealvm-net-", dir="/tmp")
        os.chmod(self.run_dir, 0o711)
        with environ(**env):
            self.handle = spawn_core(f"net-{os.getpid()}-{time.monotonic_ns() % 10**6}",
                                     memory_mib=64, run_dir=self.run_dir, host_uid=ATTACKER_UID,
                                     uid_range=CORE_UID_RANGE)
        self.link = CoreLink(self.handle.vm_id, self.handle.portal, None,
                             on_console=self.console.extend,
                             on_log=lambda lvl, msg: self.log.append(msg))
        self.link.hello()
        self.link.load_image(guest_image("netecho").read_bytes())
        self.link.attach(AttachKind.NET, 0, self.relay.core_end.fileno())
        self.relay.start()
        self.link.configure(64, 1, "pvh", 0, f"secs=300 canary={CANARY.decode()}")
        self.link.start()
        self.owner = udp_socket(lab.gw)
        end = time.monotonic() + 20
        while b"netecho ready" not in self.console:
            assert time.monotonic() < end, f"guest not ready: {bytes(self.console)!r}"
            time.sleep(0.05)
        assert self.echo_once(b"warm-up", tries=5), "no echo through the tunnel"
        self.delivered = [d for direction, d in self.relay.seen   # all passed on untouched
                          if direction == "in" and d[0] == DATA]

    def echo_once(self, payload: bytes, tries: int = 1, first: bool = False) -> list[bytes]:
        """The replies to one datagram (sent again up to `tries` times while none come)."""
        for _ in range(tries):
            got = echo(self.owner, payload, timeout=1.0, first=first)
            if got:
                return got
        return []

    def core_stats(self) -> dict[str, int]:
        for msg in reversed(self.log):
            if msg.startswith("net: "):
                return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", msg)}
        return {}

    def wait_core(self, name: str, at_least: int, timeout: float = 5.0) -> int:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            n = self.core_stats().get(name, 0)
            if n >= at_least:
                return n
            time.sleep(0.1)
        return self.core_stats().get(name, 0)

    def close(self) -> None:
        try:
            self.link.stop()
        except Exception:
            pass
        self.link.close()
        try:
            self.handle.process.wait(5)
        except Exception:
            self.handle.process.kill()
        self.relay.close()
        self.gw.close()
        self.owner.close()
        time.sleep(0.6)                   # the gateway's TAP thread leaves its select()
        os.close(self.tap)


@pytest.fixture
def lab():
    with NetLab() as lab:
        yield lab


@pytest.fixture(scope="module")
def sealed():
    """One VM for the attacks with every defence on, and a capture on the host's veth."""
    with NetLab() as lab:
        cap = Capture(lab.host, lab.host_if)
        vm = NetVM(lab)
        vm.capture = cap
        try:
            yield vm
        finally:
            vm.relay.tamper = None
            vm.close()
            cap.stop()


def _data(direction: str, fn):
    """A tamper hook that applies `fn` to DATA datagrams going `direction` only."""
    def tamper(d: str, dgram: bytes) -> list[bytes]:
        return fn(dgram) if d == direction and dgram[:1] == bytes([DATA]) else [dgram]
    return tamper


def _flip_last(dgram: bytes) -> list[bytes]:
    return [dgram[:-1] + bytes([dgram[-1] ^ 0x01])]


# ---- attacks with every defence on --------------------------------------------------------
@pytest.mark.attack(adversary='network relay', asset='network',
                    technique='modify tunnel datagrams in both directions',
                    defence='net_seal',
                    outcome='dropped and counted (drop_auth)',
                    control='test_control_without_sealing_the_canary_is_seen_and_a_change_is_delivered')
def test_modified_datagrams_are_dropped_and_counted_both_ways(sealed):
    vm = sealed
    before_core = vm.core_stats().get("drop_auth", 0)
    before_gw = vm.gw.stats()["drop_auth"]
    vm.relay.tamper = _data("in", _flip_last)
    assert vm.echo_once(b"altered towards the guest") == []
    vm.relay.tamper = _data("out", _flip_last)
    assert vm.echo_once(b"altered towards the owner") == []
    vm.relay.tamper = None
    assert vm.wait_core("drop_auth", before_core + 1) >= before_core + 1
    assert vm.gw.stats()["drop_auth"] >= before_gw + 1
    assert vm.echo_once(b"after the attack") == [b"after the attack"]
    assert vm.gw.stats()["handshakes"] == 1            # the same session carried on


@pytest.mark.attack(adversary='network relay', asset='network',
                    technique='inject forged datagrams',
                    defence='net_seal',
                    outcome='dropped and counted',
                    control='test_control_without_sealing_the_canary_is_seen_and_a_change_is_delivered')
def test_injected_datagrams_are_dropped_and_counted(sealed):
    vm = sealed
    last_in = next(d for direction, d in reversed(vm.relay.seen)
                   if direction == "in" and d[0] == DATA)
    before = vm.core_stats()
    forged = [last_in[:8] + (2**40 + i).to_bytes(8, "little") + os.urandom(80) for i in range(5)]
    for f in forged:                                  # a known receiver index, fresh counters
        vm.relay.inject("in", f)
    vm.relay.inject("in", bytes([1, 0, 0, 0]) + os.urandom(60))   # a forged handshake
    vm.relay.inject("in", os.urandom(3))                          # noise
    assert vm.wait_core("drop_auth", before.get("drop_auth", 0) + 5) >= before.get("drop_auth", 0) + 5
    assert vm.wait_core("drop_malformed", before.get("drop_malformed", 0) + 2) >= \
        before.get("drop_malformed", 0) + 2
    gw_before = vm.gw.stats()["drop_auth"] + vm.gw.stats()["drop_session"]
    for f in forged:
        vm.relay.inject("out", f)
    time.sleep(0.3)
    assert vm.gw.stats()["drop_auth"] + vm.gw.stats()["drop_session"] >= gw_before + 5
    assert vm.echo_once(b"still here") == [b"still here"]
    assert vm.gw.stats()["handshakes"] == 1


@pytest.mark.attack(adversary='network relay', asset='network',
                    technique='replay datagrams',
                    defence='net_replay',
                    outcome='dropped and counted (drop_replay)',
                    control='test_control_without_replay_window_a_replayed_datagram_is_delivered_again')
def test_replayed_datagrams_are_dropped_and_counted(sealed):
    vm = sealed
    before = vm.core_stats().get("drop_replay", 0)
    vm.relay.tamper = _data("in", lambda d: [d, d, d])
    try:
        assert vm.echo_once(b"once only") == [b"once only"]
    finally:
        vm.relay.tamper = None
    assert vm.wait_core("drop_replay", before + 2) >= before + 2
    old = vm.delivered[::-1]
    for d in old:                                      # replayed much later, out of order
        vm.relay.inject("in", d)
    assert vm.wait_core("drop_replay", before + 2 + len(old)) >= before + 2 + len(old)
    assert vm.echo_once(b"after replays") == [b"after replays"]


@pytest.mark.functional('reordering inside the window is tolerated')
def test_reordered_datagrams_are_delivered_once_each(sealed):
    vm = sealed
    held: list[bytes] = []

    def swap(d: bytes) -> list[bytes]:
        if not held:
            held.append(d)
            return []
        return [d, held.pop()]
    vm.relay.tamper = _data("in", swap)
    try:
        vm.owner.sendto(b"first", (GUEST_IP, 7))
        vm.owner.sendto(b"second", (GUEST_IP, 7))
        got = echo(vm.owner, b"third", timeout=1.5)
    finally:
        vm.relay.tamper = None
    # The swapped pair came through once each ("third" waits for the next datagram in,
    # e.g. the owner's ICMP port-unreachable for a canary, or is lost: either is fine).
    assert got.count(b"first") == 1 and got.count(b"second") == 1
    assert got.count(b"third") <= 1
    assert vm.echo_once(b"in order again") == [b"in order again"]


@pytest.mark.attack(adversary='network relay', asset='network',
                    technique='truncate datagrams',
                    defence='net_seal',
                    outcome='dropped and counted (drop_auth, drop_malformed)',
                    control='test_control_without_sealing_the_canary_is_seen_and_a_change_is_delivered')
def test_truncated_datagrams_are_dropped_and_counted(sealed):
    vm = sealed
    before = vm.core_stats()
    vm.relay.tamper = _data("in", lambda d: [d[:-1], d[:20], d[:12]])
    try:
        assert vm.echo_once(b"cut short") == []
    finally:
        vm.relay.tamper = None
    assert vm.wait_core("drop_auth", before.get("drop_auth", 0) + 1) >= before.get("drop_auth", 0) + 1
    assert vm.wait_core("drop_malformed", before.get("drop_malformed", 0) + 2) >= \
        before.get("drop_malformed", 0) + 2
    assert vm.echo_once(b"whole again") == [b"whole again"]
    assert vm.gw.stats()["handshakes"] == 1


@pytest.mark.attack(adversary='network relay', asset='network',
                    technique="capture the host interface and search for the guest's canary",
                    defence='net_seal',
                    outcome='zero occurrences',
                    control='test_control_without_sealing_the_canary_is_seen_and_a_change_is_delivered')
def test_canary_never_appears_on_the_host_side(sealed):
    vm = sealed
    time.sleep(2.5)                                    # at least two canary datagrams sent
    assert vm.gw.stats()["to_tap"] >= 2
    seen = b"".join(vm.capture.frames)
    assert b"warm-up" not in seen
    assert CANARY not in seen
    assert sum(1 for f in vm.capture.frames if len(f) > 60) >= 4    # the tunnel did pass by


# ---- rekeying ----------------------------------------------------------------------------
@pytest.mark.attack(adversary='network relay', asset='network',
                    technique="inject an earlier session's datagrams after a rekey",
                    defence='per-session keys',
                    outcome='dropped (drop_session/drop_replay)',
                    control='test_control_without_replay_window_a_replayed_datagram_is_delivered_again')
def test_rekeys_and_old_sessions_datagrams_are_refused(lab):
    vm = NetVM(lab, rekey=12)
    try:
        first = vm.delivered
        for i in range(40):
            assert vm.echo_once(b"n%d" % i, tries=2, first=True) == [b"n%d" % i]
        assert vm.gw.stats()["handshakes"] >= 3
        before = vm.core_stats()
        for d in first:                                # datagrams of the first session
            vm.relay.inject("in", d)
        n = before.get("drop_session", 0) + before.get("drop_replay", 0) + len(first)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            s = vm.core_stats()
            if s.get("drop_session", 0) + s.get("drop_replay", 0) >= n:
                break
            time.sleep(0.1)
        s = vm.core_stats()
        assert s.get("drop_session", 0) + s.get("drop_replay", 0) >= n
    finally:
        vm.close()


# ---- paired controls: one defence off, the same attack succeeds ---------------------------
def test_control_without_replay_window_a_replayed_datagram_is_delivered_again(lab):
    vm = NetVM(lab, disable=("net_replay",))
    try:
        vm.relay.tamper = _data("in", lambda d: [d, d])
        assert vm.echo_once(b"twice") == [b"twice", b"twice"]
    finally:
        vm.close()


def test_control_without_sealing_the_canary_is_seen_and_a_change_is_delivered(lab):
    cap = Capture(lab.host, lab.host_if)
    vm = NetVM(lab, disable=("net_seal",))
    try:
        time.sleep(2.5)
        seen = cap.stop()
        assert CANARY in seen
        vm.relay.tamper = _data("in", lambda d: [d.replace(b"forged?", b"forged!")])
        assert vm.echo_once(b"forged?") == [b"forged!"]
    finally:
        vm.close()

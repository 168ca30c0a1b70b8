"""The sealed network tunnel (core/net_tunnel.py) on its own: handshake, sealing, replay, rekey."""
from __future__ import annotations

import os

import pytest

from sealvm.core.net_tunnel import (DATA_HDR, MSG_DATA, ReplayWindow, Tunnel, WINDOW,
                                    self_test)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pair(key: bytes | None = None, **kw) -> tuple[Tunnel, Tunnel]:
    key = key or os.urandom(32)
    core, gw = Tunnel(key, initiator=True, **kw), Tunnel(key, initiator=False, **kw)
    connect(core, gw)
    return core, gw


def connect(core: Tunnel, gw: Tunnel) -> None:
    _, resp = gw.receive(core.initiate())
    assert resp is not None
    frame, confirm = core.receive(resp)
    assert frame is None and confirm is not None
    assert gw.receive(confirm) == (None, None)       # keepalive switches the gateway over


def test_frames_cross_both_ways_and_ciphertext_hides_them():
    core, gw = pair()
    d = core.seal(b"frame from the guest")
    assert b"frame from the guest" not in d and d[0] == MSG_DATA
    assert gw.receive(d) == (b"frame from the guest", None)
    assert core.receive(gw.seal(b"to the guest")) == (b"to the guest", None)
    assert core.seal(b"same") != core.seal(b"same")   # a new counter, a new nonce


def test_a_wrong_key_gets_no_session():
    core = Tunnel(os.urandom(32), initiator=True)
    gw = Tunnel(os.urandom(32), initiator=False)
    assert gw.receive(core.initiate()) == (None, None)
    assert gw.stats["drop_handshake"] == 1 and gw.current is None and gw.next is None


def test_a_replayed_init_is_refused():
    key = os.urandom(32)
    core, gw = Tunnel(key, initiator=True), Tunnel(key, initiator=False)
    init = core.initiate()
    assert gw.receive(init)[1] is not None
    assert gw.receive(init) == (None, None)
    assert gw.stats["drop_handshake"] == 1


@pytest.mark.parametrize("where", [0, 4, 8, DATA_HDR, -1])
def test_any_altered_byte_is_refused(where):
    core, gw = pair()
    d = bytearray(core.seal(b"payload" * 10))
    d[where] ^= 0x40
    assert gw.receive(bytes(d)) == (None, None)
    s = gw.stats
    assert s["drop_auth"] + s["drop_session"] + s["drop_malformed"] + s["drop_replay"] == 1
    assert gw.receive(core.seal(b"next")) == (b"next", None)


def test_replays_and_too_old_counters_are_refused_reordering_is_not():
    core, gw = pair()
    ds = [core.seal(b"%d" % i) for i in range(WINDOW + 10)]
    assert gw.receive(ds[5])[0] == b"5"
    assert gw.receive(ds[3])[0] == b"3"               # late but inside the window
    assert gw.receive(ds[5]) == (None, None)          # replay
    assert gw.receive(ds[WINDOW + 9])[0] == b"%d" % (WINDOW + 9)
    assert gw.receive(ds[4]) == (None, None)          # now behind the window
    assert gw.stats["drop_replay"] == 2


def test_replay_window_bitmap():
    w = ReplayWindow(64)
    for n in (0, 1, 2, 10, 5):
        assert w.fresh(n)
        w.mark(n)
    assert not any(w.fresh(n) for n in (0, 1, 2, 5, 10))
    assert w.fresh(3) and w.fresh(11)
    w.mark(200)
    assert not w.fresh(136) and w.fresh(137) and not w.fresh(200)


def test_truncated_and_junk_datagrams_are_counted():
    core, gw = pair()
    d = core.seal(b"x" * 40)
    for junk in (d[:-1], d[:DATA_HDR + 3], d[:5], b"", os.urandom(64), bytes([9]) + d[1:]):
        assert gw.receive(junk) == (None, None)
    s = gw.stats
    assert s["drop_auth"] + s["drop_malformed"] + s["drop_session"] + s["drop_handshake"] == 6


def test_every_handshake_gives_fresh_keys_so_nonces_never_repeat():
    key = os.urandom(32)
    a_core, a_gw = pair(key)
    b_core, b_gw = pair(key)                          # e.g. the core restarted or was restored
    da, db = a_core.seal(b"same frame"), b_core.seal(b"same frame")
    assert da[8:16] == db[8:16]                       # both at counter 0 ...
    assert da[DATA_HDR:] != db[DATA_HDR:]             # ... under different keys
    assert b_gw.receive(da) == (None, None)           # and one session cannot open the other's


def test_rekey_after_messages_and_time_old_session_drains_then_goes():
    clock = Clock()
    core, gw = pair(rekey_after_messages=5, rekey_after_time=60, clock=clock)
    assert not core.needs_handshake()
    inflight = [core.seal(b"a%d" % i) for i in range(5)]
    assert core.needs_handshake()
    first = core.current
    connect(core, gw)
    assert core.current is not first and gw.current.local == core.current.remote
    assert [gw.receive(d)[0] for d in inflight] == [b"a%d" % i for i in range(5)]   # in flight
    clock.t += 61
    assert core.needs_handshake()
    connect(core, gw)
    assert core.receive(gw.seal(b"new"))[0] == b"new"
    stale = first.local
    assert stale not in core.sessions                 # two rekeys later, the first is gone


def test_responder_keeps_sending_on_the_old_session_until_the_new_one_is_confirmed():
    core, gw = pair()
    old = gw.current
    _, resp = gw.receive(core.initiate())
    assert gw.current is old and gw.next is not None
    frame, confirm = core.receive(resp)
    assert core.receive(gw.seal(b"on the old session"))[0] == b"on the old session"
    gw.receive(confirm)
    assert gw.current is not old


def test_test_switches_turn_off_exactly_one_defence():
    core, gw = pair(replay_check=False)
    d = core.seal(b"again")
    assert gw.receive(d)[0] == gw.receive(d)[0] == b"again"
    core, gw = pair(seal_frames=False)
    assert b"in clear" in core.seal(b"in clear")


def test_self_test_passes():
    self_test()


def test_a_gateway_that_lost_the_session_gets_a_new_handshake_and_keepalives_prevent_one():
    clock = Clock()
    key = os.urandom(32)
    core, gw = pair(key, clock=clock)
    clock.t += 11
    frame, keepalive = gw.receive(core.seal(b"after a quiet spell"))
    assert frame == b"after a quiet spell" and keepalive is not None   # passive keepalive
    core.receive(keepalive)
    clock.t += 14
    core.seal(b"more")
    assert not core.needs_handshake()               # the gateway was heard from recently
    restarted = Tunnel(key, initiator=False, clock=clock)
    assert restarted.receive(core.seal(b"lost")) == (None, None)
    clock.t += 16
    core.seal(b"still nothing back")
    assert core.needs_handshake()
    connect(core, restarted)
    assert restarted.receive(core.seal(b"back"))[0] == b"back"


# ---- fencing: the owner's gateway admits only the newest copy of the VM -----------------
@pytest.mark.parametrize("fencing", [True, False], ids=["fenced", "control-no-fencing"])
def test_a_copy_of_an_older_generation_is_fenced_off(fencing):
    """Copy A (generation 3) has a session; copy B (generation 4, restored elsewhere) makes
    its own.  With fencing, A's datagrams are dropped from then on and A's new INIT is
    refused; the control (no generation check at the gateway) still takes A's frames."""
    key, newest = os.urandom(32), [3]
    gw = Tunnel(key, initiator=False, min_generation=(lambda: newest[0]) if fencing else None)
    a = Tunnel(key, initiator=True, generation=lambda: 3)
    connect(a, gw)
    assert gw.receive(a.seal(b"from A"))[0] == b"from A"
    newest[0] = 4                                    # the broker moved the generation to B
    b = Tunnel(key, initiator=True, generation=lambda: 4)
    connect(b, gw)
    assert gw.receive(b.seal(b"from B"))[0] == b"from B"
    got = gw.receive(a.seal(b"stale A"))[0]
    assert got == (None if fencing else b"stale A")
    _, resp = gw.receive(a.initiate())
    if fencing:
        assert resp is None and gw.stats["drop_fenced"] == 1
        assert gw.stats["drop_session"] == 1
    else:
        assert resp is not None and gw.stats["drop_fenced"] == 0


def test_the_generation_travels_sealed_in_the_init():
    key = os.urandom(32)
    init = Tunnel(key, initiator=True, generation=lambda: 0x1122334455667788).initiate()
    assert (0x1122334455667788).to_bytes(8, "little") not in init
    gw = Tunnel(key, initiator=False, min_generation=lambda: 0x1122334455667788)
    assert gw.receive(init)[1] is not None
    tampered = bytearray(init)
    tampered[50] ^= 1
    gw2 = Tunnel(key, initiator=False, min_generation=lambda: 0)
    assert gw2.receive(bytes(tampered)) == (None, None) and gw2.stats["drop_handshake"] == 1

"""PortalClient against a tiny fake core thread on a socketpair.

The fake core speaks the protocol the way the real one must: it decodes
requests with `decode_payload`, checks capabilities with `check_capability`,
refuses what it does not like with an error reply, and never dies on a bad
message.  Tests cover hello (fresh tokens), calls, refusals, events while a
call is outstanding, out-of-order replies, timeouts and the core going away.
"""
from __future__ import annotations

import queue
import secrets
import socket
import threading
import time

import pytest

from sealvm.wire import portal as P
from sealvm.wire.portal import Kind, Op, PortalError, Status
from sealvm.wire.portal_client import FrameSender, PortalClient, PortalClosed, PortalRefused, PortalTimeout
from sealvm.wire.portal_io import FrameReader


class FakeCore:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sender = FrameSender(sock)
        self.token: bytes | None = None
        self.state = P.VmState.EMPTY
        self.release = threading.Event()      # PAUSE waits for this before replying
        self.held: list[bytes] = []           # RESUME replies are held until QUERY arrives
        self.silent = False
        self.seen: list[P.Message] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def reply(self, msg, status=Status.OK, text="", **fields):
        self.sender.send(P.encode_reply(msg.op, msg.seq, status, text, **fields))

    def serve(self):
        reader = FrameReader(self.sock)
        while True:
            try:
                frame = reader.read()
            except PortalError as e:
                self.sender.send(P.encode_reply(e.op, e.seq, e.status, str(e)))
                if e.fatal:
                    break
                continue
            if frame is None:
                break
            try:
                P.check_capability(frame.header, {P.CAP_VM: self.token})
                msg = P.decode_payload(*frame)
            except PortalError as e:
                self.sender.send(P.encode_reply(e.op, e.seq, e.status, str(e)))
                continue
            self.seen.append(msg)
            self.handle(msg)
        self.sock.close()

    def handle(self, msg):
        if self.silent:
            return
        if msg.op == Op.HELLO:
            self.token = secrets.token_bytes(16)
            self.reply(msg, core_version=1, vm_token=self.token, state=self.state)
        elif msg.op == Op.START:
            self.reply(msg, Status.WRONG_STATE, "VM is empty, needs configured")
        elif msg.op == Op.CONSOLE_INPUT:
            self.sender.send(P.encode_event(Op.CONSOLE_OUTPUT, data=msg.fields["data"].upper()))
            self.reply(msg)
        elif msg.op == Op.PAUSE:
            self.sender.send(P.encode_event(Op.LOG, level=20, message="pausing"))
            if self.release.wait(5):
                self.reply(msg)
        elif msg.op == Op.RESUME:
            self.held.append(P.encode_reply(msg.op, msg.seq, Status.OK))
        elif msg.op == Op.QUERY:
            self.reply(msg, state=self.state, exit_status=-1, stop_reason="", vcpus=0,
                       memory_mib=0, exits=0, disk_requests=0, disk_tampered=0,
                       disk_io_errors=0, disk_generation=0)
            for f in self.held:
                self.sender.send(f)
        elif msg.op == Op.STOP:
            self.sock.shutdown(socket.SHUT_RDWR)
        else:
            self.reply(msg, Status.FAILED, "not in this fake")


@pytest.fixture
def pair():
    host, core = socket.socketpair()
    fake = FakeCore(core)
    clients = []

    def make(**kw):
        c = PortalClient(host, **kw)
        clients.append(c)
        return c

    yield fake, make
    for c in clients:
        c.close()
    fake.thread.join(5)


def test_hello_then_call(pair):
    fake, make = pair
    client = make()
    reply = client.hello()
    assert reply["vm_token"] == fake.token == client.token and reply["state"] is P.VmState.EMPTY
    assert client.call(Op.QUERY)["exits"] == 0
    assert fake.seen[-1].header.cap == fake.token


def test_every_hello_issues_a_fresh_token(pair):
    fake, make = pair
    client = make()
    first = client.hello()["vm_token"]
    second = client.hello()["vm_token"]
    assert first != second and fake.token == second
    with pytest.raises(PortalRefused) as info:
        client.call(Op.QUERY, cap=first)                # the revoked token
    assert info.value.status is Status.BAD_CAPABILITY


def test_refusal_raises_portal_refused(pair):
    _, make = pair
    client = make()
    client.hello()
    with pytest.raises(PortalRefused) as info:
        client.call(Op.START)
    assert info.value.status is Status.WRONG_STATE and "needs configured" in info.value.message


def test_calls_before_hello_need_a_token(pair):
    _, make = pair
    client = make()
    with pytest.raises(RuntimeError):
        client.call(Op.START)
    with pytest.raises(ValueError):
        client.call(Op.LOG)
    with pytest.raises(P.EncodeError):
        client.call(Op.HELLO, host_version=-1)
    assert client.hello()                           # nothing above broke the connection


def test_events_go_to_the_queue(pair):
    _, make = pair
    client = make()
    client.hello()
    client.call(Op.CONSOLE_INPUT, data=b"hi")
    event = client.events.get(timeout=5)
    assert (event.kind, event.op, event.fields["data"]) == (Kind.EVENT, Op.CONSOLE_OUTPUT, b"HI")


def test_event_delivered_while_a_call_is_outstanding(pair):
    fake, make = pair
    got = queue.Queue()

    def on_event(msg):
        got.put(msg)
        fake.release.set()                          # only now does the core answer PAUSE

    client = make(on_event=on_event)
    client.hello()
    assert client.call(Op.PAUSE, timeout=5) == {}
    assert got.get_nowait().fields == {"level": P.LogLevel.INFO, "message": "pausing"}


def test_replies_out_of_order_reach_their_callers(pair):
    fake, make = pair
    client = make()
    client.hello()
    results = {}
    t = threading.Thread(target=lambda: results.update(resume=client.call(Op.RESUME, timeout=5)))
    t.start()
    while not any(m.op == Op.RESUME for m in fake.seen):
        time.sleep(0.01)
    results["query"] = client.call(Op.QUERY, timeout=5)   # replied before RESUME's reply
    t.join(5)
    assert results["resume"] == {} and results["query"]["state"] is P.VmState.EMPTY


def test_timeout_then_the_client_still_works(pair):
    fake, make = pair
    client = make()
    client.hello()
    fake.silent = True
    with pytest.raises(PortalTimeout):
        client.call(Op.QUERY, timeout=0.1)
    fake.silent = False
    assert client.call(Op.QUERY, timeout=5)["vcpus"] == 0


def test_core_going_away_fails_waiting_and_later_calls(pair):
    _, make = pair
    client = make()
    client.hello()
    with pytest.raises(PortalClosed):
        client.call(Op.STOP, timeout=5)
    with pytest.raises(PortalClosed):
        client.call(Op.QUERY)
    assert client.closed


def test_a_callback_that_raises_does_not_kill_the_reader(pair):
    _, make = pair

    def on_event(msg):
        raise RuntimeError("bad callback")

    client = make(on_event=on_event)
    client.hello()
    client.call(Op.CONSOLE_INPUT, data=b"x")
    assert client.call(Op.QUERY)["exits"] == 0
    assert client.callback_errors == 1


def test_malformed_reply_fails_only_its_call():
    host, core = socket.socketpair()
    client = PortalClient(host)
    reader = FrameReader(core)

    def bad_core():
        f = reader.read()
        bogus = P.pack_header(Kind.REPLY, f.header.op, f.header.seq, 6) + b"\x09\0" + bytes(4)
        core.sendall(bogus)                          # status 9 does not exist
        f = reader.read()
        core.sendall(P.encode_reply(f.header.op, f.header.seq, Status.OK, core_version=1,
                                    vm_token=b"t" * 16, state=0))

    t = threading.Thread(target=bad_core)
    t.start()
    with pytest.raises(PortalError) as info:
        client.hello(timeout=5)
    assert info.value.status is Status.OUT_OF_RANGE
    assert client.hello(timeout=5)["vm_token"] == b"t" * 16
    t.join()
    client.close()
    core.close()

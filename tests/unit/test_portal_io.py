"""FrameReader and FrameSender over real socketpairs and scripted recv callables.

Covers partial reads (a writer sending byte by byte), EINTR, clean EOF
between frames, EOF inside the header and inside the payload, oversize
frames refused before a single payload byte is read, a non-fatal refusal that
keeps the stream in sync, resuming after a timeout, and many threads sending
through one FrameSender without interleaving frames.
"""
from __future__ import annotations

import socket
import threading

import pytest

from sealvm.wire import portal as P
from sealvm.wire.portal import HEADER_SIZE, MAX_PAYLOAD, Kind, Op, PortalError, Status
from sealvm.wire.portal_client import FrameSender, send_frame
from sealvm.wire.portal_io import FrameReader, TruncatedFrame

TOKEN = bytes(range(1, 17))


def frames() -> list[bytes]:
    return [P.encode_request(Op.HELLO, 1, None, host_version=1),
            P.encode_request(Op.CONSOLE_INPUT, 2, TOKEN, data=bytes(range(256)) * 16),
            P.encode_request(Op.START, 3, TOKEN),
            P.encode_request(Op.CONFIGURE, 4, TOKEN, memory_mib=2, vcpus=1, entry=2, flags=0,
                             cmdline="x" * 300)]


class Script:
    """A recv(n) callable serving `data` in `step`-byte pieces, with optional EINTRs."""

    def __init__(self, data: bytes, step: int = 1, eintr_every: int = 0):
        self.data, self.step, self.eintr_every = data, step, eintr_every
        self.pos = self.calls = 0
        self.asked = []

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        if self.eintr_every and self.calls % self.eintr_every == 0:
            raise InterruptedError
        self.asked.append(n)
        piece = self.data[self.pos:self.pos + min(n, self.step)]
        self.pos += len(piece)
        return piece


def read_all(reader: FrameReader) -> list[P.Message]:
    out = []
    while (f := reader.read()) is not None:
        out.append(P.decode_payload(*f))
    return out


def test_byte_by_byte_writer_thread_over_a_socketpair():
    a, b = socket.socketpair()
    data = b"".join(frames())

    def writer():
        for i in range(len(data)):
            a.send(data[i:i + 1])
        a.close()

    t = threading.Thread(target=writer)
    t.start()
    got = read_all(FrameReader(b))
    t.join()
    b.close()
    assert [m.seq for m in got] == [1, 2, 3, 4]
    assert got[1].fields["data"] == bytes(range(256)) * 16


def test_partial_reads_and_eintr_through_a_recv_callable():
    src = Script(b"".join(frames()), step=7, eintr_every=3)
    assert [m.op for m in read_all(FrameReader(src))] == [Op.HELLO, Op.CONSOLE_INPUT, Op.START,
                                                           Op.CONFIGURE]


def test_eof_between_frames_is_none_and_stays_none():
    reader = FrameReader(Script(frames()[2], step=100))
    assert reader.read() is not None
    assert reader.read() is None and reader.read() is None


@pytest.mark.parametrize("cut", [1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5])
def test_eof_mid_frame_is_truncated_and_fatal(cut):
    reader = FrameReader(Script(frames()[1][:cut], step=3))
    with pytest.raises(TruncatedFrame) as info:
        reader.read()
    assert info.value.fatal and info.value.status is Status.MALFORMED
    with pytest.raises(PortalError) as again:          # the stream stays broken
        reader.read()
    assert again.value.fatal


def test_eof_mid_frame_on_a_socket():
    a, b = socket.socketpair()
    a.sendall(frames()[1][:50])
    a.close()
    with pytest.raises(TruncatedFrame):
        FrameReader(b).read()
    b.close()


@pytest.mark.parametrize("length", [MAX_PAYLOAD + 1, 0xFFFF_FFFF])
def test_oversize_refused_before_reading_the_payload(length):
    head = P.pack_header(Kind.REQUEST, Op.LOAD_IMAGE, 9, length, TOKEN)
    src = Script(head + b"\0" * 100, step=1000)
    reader = FrameReader(src)
    with pytest.raises(PortalError) as info:
        reader.read()
    assert info.value.status is Status.TOO_BIG and info.value.fatal and info.value.seq == 9
    assert src.pos == HEADER_SIZE and sum(src.asked) == HEADER_SIZE   # never asked for more


def test_bad_magic_is_fatal_before_the_payload():
    src = Script(P.pack_header(1, 4, 1, 10, magic=0xBEEF) + bytes(10), step=1000)
    with pytest.raises(PortalError) as info:
        FrameReader(src).read()
    assert info.value.fatal and src.pos == HEADER_SIZE


@pytest.mark.parametrize("bad", [
    P.pack_header(Kind.REQUEST, 0x33, 5, 40, TOKEN) + bytes(40),              # unknown op
    P.pack_header(Kind.REQUEST, Op.START, 5, 3, TOKEN, version=9) + bytes(3),
    P.pack_header(Kind.REQUEST, Op.CONSOLE_INPUT, 5, 200_000, TOKEN) + bytes(200_000),  # > op max
], ids=["unknown-op", "version", "over-op-max"])
def test_non_fatal_refusal_drains_the_payload_and_keeps_the_stream(bad):
    good = frames()[2]
    reader = FrameReader(Script(bad + good, step=4096))
    with pytest.raises(PortalError) as info:
        reader.read()
    assert not info.value.fatal and info.value.seq == 5
    assert P.decode_payload(*reader.read()).seq == 3
    assert reader.read() is None


def test_timeout_mid_frame_resumes():
    a, b = socket.socketpair()
    b.settimeout(0.05)
    data = frames()[1]
    reader = FrameReader(b)
    a.sendall(data[:10])
    with pytest.raises(TimeoutError):
        reader.read()
    a.sendall(data[10:HEADER_SIZE + 7])
    with pytest.raises(TimeoutError):
        reader.read()
    a.sendall(data[HEADER_SIZE + 7:])
    assert P.decode_payload(*reader.read()).seq == 2
    a.close()
    b.close()


def test_reader_needs_a_socket_or_callable():
    with pytest.raises(TypeError):
        FrameReader(42)  # type: ignore[arg-type]


def test_sender_serialises_threads():
    a, b = socket.socketpair()
    sender = FrameSender(a)
    payloads = {t: bytes([t]) * (1000 + 37 * t) for t in range(8)}

    def blast(t):
        for _ in range(40):
            sender.send(P.encode_event(Op.CONSOLE_OUTPUT, data=payloads[t]))

    got = []
    reader_thread = threading.Thread(target=lambda: got.extend(read_events(b)))
    reader_thread.start()
    threads = [threading.Thread(target=blast, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    reader_thread.join()
    b.close()
    assert len(got) == 8 * 40
    assert all(m.fields["data"] in payloads.values() for m in got)


def read_events(sock):
    reader = FrameReader(sock)
    while (f := reader.read()) is not None:
        yield P.decode_response(*f)


def test_sender_refuses_after_a_failed_send():
    class Broken:
        def sendall(self, data):
            raise TimeoutError("half sent")

    sender = FrameSender(Broken())
    with pytest.raises(TimeoutError):
        sender.send(b"x")
    assert sender.broken
    with pytest.raises(BrokenPipeError):
        sender.send(b"y")


def test_send_frame_writes_everything():
    a, b = socket.socketpair()
    big = P.encode_request(Op.LOAD_IMAGE, 1, TOKEN, kind=1, offset=0, total=1 << 20,
                           data=bytes(1 << 20))
    t = threading.Thread(target=send_frame, args=(a, big))
    t.start()
    f = FrameReader(b).read()
    t.join()
    assert len(f.payload) == f.header.length == len(big) - HEADER_SIZE
    a.close()
    b.close()

"""Coverage-guided fuzzing of the portal decoder (atheris / libFuzzer).

    python fuzz/portal_fuzz.py -atheris_runs=200000 [corpus_dir ...]

The first input byte picks a mode:

* 0 raw: the rest is one frame, decoded as the core (requests) or as the host
  (replies, events) would;
* 1 shaped: a valid header (known op, honest length) over fuzzer bytes, so
  runs reach the payload decoders instead of stopping at the magic;
* 2 stream: the rest is a byte stream read by `FrameReader` through a recv
  callable that hands out fuzzer-chosen piece sizes.

The oracle: decoding either succeeds or raises `PortalError`, nothing else;
whatever decodes re-encodes to the same bytes; the reader never returns a
payload longer than its op allows.  A crash is any other exception.

Without a corpus directory the script uses $TMPDIR/sealvm-portal-fuzz-corpus,
seeded with valid frames of every op (and kept, so later runs start richer).
If atheris is not installed, it falls back to a plain random mutator over the
same seeds and target (same flag), so `make fuzz` still runs.
"""
from __future__ import annotations

import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

P = None            # sealvm.wire.portal, imported under atheris instrumentation when present
FrameReader = None


def _load(instrument: bool) -> None:
    global P, FrameReader
    if instrument:
        import atheris
        with atheris.instrument_imports(include=["sealvm.wire"]):
            from sealvm.wire import portal, portal_io, portal_ops, portal_schema  # noqa: F401
    from sealvm.wire import portal
    from sealvm.wire.portal_io import FrameReader as reader
    P, FrameReader = portal, reader


def _reencode(msg) -> bytes:
    h, f = msg.header, dict(msg.fields)
    if h.kind == P.Kind.REQUEST:
        return P.encode_request(h.op, h.seq, h.cap, **f)
    if h.kind == P.Kind.EVENT:
        return P.encode_event(h.op, **f)
    return P.encode_reply(h.op, h.seq, f.pop("status"), f.pop("message"), **f)


def _check(data: bytes, core_side: bool) -> None:
    try:
        msg = P.decode_frame(data, core_side=core_side)
    except P.PortalError:
        return
    again = _reencode(msg)
    if again != bytes(data):
        raise AssertionError(f"non-canonical decode of {bytes(data)[:64].hex()}...")


def _shaped(data: bytes) -> None:
    if len(data) < 4:
        return
    ops = sorted(P.OPS)
    op = ops[data[0] % len(ops)] if data[1] < 240 else data[0] | data[2] << 8
    kind = (1, 2, 3, data[1] % 6)[data[1] % 4]
    seq = data[2] % 3
    cap = bytes(16) if data[3] & 1 else bytes(data[4:20]).ljust(16, b"\0")
    payload = data[4:]
    _check(P.pack_header(kind, op, seq, len(payload), cap) + payload, core_side=kind == 1)


def _stream(data: bytes) -> None:
    if not data:
        return
    sizes, stream = data[:8], data[8:]
    pos, turn = 0, 0

    def recv(n: int) -> bytes:
        nonlocal pos, turn
        k = min(n, sizes[turn % len(sizes)] + 1)
        turn += 1
        out = stream[pos:pos + k]
        pos += len(out)
        return out

    reader = FrameReader(recv)
    for _ in range(64):
        try:
            frame = reader.read()
        except P.PortalError as e:
            if e.fatal:
                return
            continue
        if frame is None:
            return
        if len(frame.payload) != frame.header.length or frame.header.length > P.MAX_PAYLOAD:
            raise AssertionError("reader returned a payload that disagrees with its header")
        try:
            (P.decode_payload if frame.header.kind == 1 else P.decode_response)(*frame)
        except P.PortalError:
            pass


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    if mode == 0:
        _check(rest, core_side=bool(data[0] & 4))
    elif mode == 1:
        _shaped(rest)
    else:
        _stream(rest)


def seeds() -> list[bytes]:
    tok = bytes(range(1, 17))
    frames = [
        P.encode_request(P.Op.HELLO, 1, None, host_version=1),
        P.encode_request(P.Op.LOAD_IMAGE, 2, tok, kind=1, offset=0, total=64, data=b"\x7fELF" * 4),
        P.encode_request(P.Op.CONFIGURE, 3, tok, memory_mib=64, vcpus=2, entry=1, flags=1,
                         cmdline="console=ttyS0"),
        P.encode_request(P.Op.START, 4, tok),
        P.encode_request(P.Op.CONSOLE_INPUT, 5, tok, data=b"ls\n"),
        P.encode_reply(P.Op.HELLO, 1, 0, core_version=1, vm_token=tok, state=0),
        P.encode_reply(P.Op.QUERY, 6, 0, state=2, exit_status=-1, stop_reason="", vcpus=1,
                       memory_mib=64, exits=7),
        P.encode_reply(P.Op.START, 4, 6, "wrong state"),
        P.encode_event(P.Op.CONSOLE_OUTPUT, data=b"hello"),
        P.encode_event(P.Op.VM_STOPPED, exit_status=0, reason="done"),
        P.encode_event(P.Op.LOG, level=30, message="refused"),
    ]
    out = []
    for i, f in enumerate(frames):
        out.append(bytes([4 if i < 5 else 0]) + f)                # raw, core or host side
        out.append(b"\x01" + f[4:6] + b"\x01\x00\x01" + f[32:])   # roughly shaped
    out.append(b"\x02" + b"\x07" * 8 + b"".join(frames[:5]))        # stream
    return out


def _runs(argv: list[str]) -> int:
    for a in argv:
        if a.startswith("-atheris_runs="):
            return int(a.split("=", 1)[1])
    return 10000


def _fallback(argv: list[str]) -> None:
    print("portal_fuzz: atheris is not installed; running the random-mutation fallback",
          file=sys.stderr)
    rng = random.Random(int(os.environ.get("PORTAL_FUZZ_SEED", "1")))
    pool = seeds()
    for _ in range(_runs(argv)):
        data = bytearray(rng.choice(pool))
        for _ in range(rng.randint(1, 6)):
            op = rng.randrange(4)
            if op == 0 and data:
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                del data[rng.randrange(len(data)):]
            elif op == 2:
                data += rng.randbytes(rng.randint(1, 16))
            elif len(data) > 16:
                i = rng.randrange(len(data) - 4)
                data[i:i + 4] = rng.choice([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\0\0\x20\0"])
        TestOneInput(bytes(data))
    print(f"portal_fuzz: {_runs(argv)} fallback runs, no crash", file=sys.stderr)


def main() -> None:
    try:
        import atheris
    except ImportError:
        _load(instrument=False)
        _fallback(sys.argv)
        return
    _load(instrument=True)
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = os.path.join(tempfile.gettempdir(), "sealvm-portal-fuzz-corpus")
        os.makedirs(corpus, exist_ok=True)     # reused across runs; libFuzzer adds to it
        for i, s in enumerate(seeds()):
            Path(corpus, f"seed-{i:02d}").write_bytes(s)
        argv.append(corpus)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

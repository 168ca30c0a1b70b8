"""Coverage-guided fuzzing of the launcher's request parser (atheris / libFuzzer).

    python fuzz/launcher_fuzz.py -atheris_runs=200000

The parser is the only code running as root that reads bytes from the
untrusted daemon.  Oracle: `parse_request` either returns a request whose
fields are all within their documented bounds, or raises `LaunchError`;
anything else is a crash.  Without atheris it falls back to a random mutator.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

parse_request = LaunchError = proto = None


def _load(instrument: bool) -> None:
    global parse_request, LaunchError, proto
    if instrument:
        import atheris
        with atheris.instrument_imports(include=["sealvm.launcher"]):
            import sealvm.launcher.protocol  # noqa: F401
    from sealvm.launcher import protocol
    from sealvm.launcher.spawn import VM_ID_RE, LaunchError as err
    proto, parse_request, LaunchError = protocol, protocol.parse_request, err
    globals()["VM_ID_RE"] = VM_ID_RE


def test_one(data: bytes) -> None:
    try:
        req = parse_request(data)
    except LaunchError:
        return
    if req.op == proto.OP_PING:
        return
    if not (req.op == proto.OP_SPAWN and VM_ID_RE.match(req.vm_id)
            and 2 <= req.memory_mib <= 65536 and not req.flags & ~proto.FLAG_INSECURE_SAME_UID):
        raise RuntimeError(f"parser accepted an out-of-bounds request: {req}")


def seeds() -> list[bytes]:
    return [proto.encode_request(proto.OP_SPAWN, "vm-1", 256),
            proto.encode_request(proto.OP_PING), b"", b"\0" * proto.REQUEST_SIZE]


def main() -> None:
    try:
        import atheris
    except ImportError:
        atheris = None
    if atheris is None:
        _load(False)
        runs = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("-atheris_runs=")),
                    100000)
        rnd = random.Random(1)
        pool = seeds()
        for _ in range(runs):
            b = bytearray(rnd.choice(pool))
            for _ in range(rnd.randint(1, 4)):
                if b and rnd.random() < 0.7:
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
                else:
                    b += bytes([rnd.randrange(256)])
            test_one(bytes(b))
        print(f"launcher fuzz: {runs} random runs, no crash")
        return
    _load(True)
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

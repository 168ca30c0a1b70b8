"""Validation share: how much of each hot-path request is spent checking untrusted input.

Three requests, each split into its checks (micro-benchmarked in this process, with the
same code the core and the host run) and the whole request (measured end to end in the
same run):
  * portal QUERY: the core's decode and checks of the request frame (header, payload,
    capability) plus the host's decode and checks of the reply, against the whole
    round trip from the host's PortalClient to a running core and back
    (bench/split.py's portal_rtt: a real core, spawned as in production);
  * virtio-rng 4 KiB request: Virtqueue.pop (avail idx and head checks, then
    walk_chain over the one-descriptor chain) against the guest-visible cost per
    request of the rng guest (count buffers of 4 KiB, its own TSC cycle count over
    all of them; it keeps up to a queue's worth in flight, so this is the amortised
    cost per request at full throughput);
  * virtio-blk 4 KiB read: Virtqueue.pop over the three-descriptor chain {header,
    data, status} plus the device's header and range checks, against the guest-visible
    time per 4 KiB random read at queue depth 1 (blkbench on a sealed disk).
Reported as ratios (validation / whole request, lower is better); each check is the
fastest of five timed loops (a fixed cost, disturbed only upwards), each whole request
the median of its runs.  Needs root and /dev/kvm for the whole requests.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

from . import common as C

NAME = "validation"


def _best_us(fn, n: int, rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


# ---------------------------------------------------------------- the checks alone
def portal_checks_us(n: int) -> dict:
    from sealvm.wire import portal as P
    from sealvm.wire import portal_client as PC
    token = bytes(range(1, 17))
    req = PC.encode_request(P.Op.QUERY, 7, token)
    rep_fields = dict(state=2, exit_status=-1, stop_reason="", vcpus=1, memory_mib=64, exits=7)
    spec = P.OPS[P.Op.QUERY].reply
    rep_fields = {f.name: rep_fields.get(f.name, 0) for f in spec}
    rep = P.encode_reply(P.Op.QUERY, 7, 0, **rep_fields)
    held = {"vm": token}

    def core_side():
        h = P.decode_header(req[:P.HEADER_SIZE])
        P.decode_payload(h, memoryview(req)[P.HEADER_SIZE:])
        P.check_capability(h, held)

    def host_side():
        PC.decode_frame(rep, core_side=False)

    return {"core_request_us": _best_us(core_side, n), "host_reply_us": _best_us(host_side, n)}


def _queue(descs, size: int = 16):
    from sealvm.core.addr import GPA, MIN_MEMORY
    from sealvm.core.devices.virtio.queue import Virtqueue
    from sealvm.core.memory import GuestMemory
    mem = GuestMemory.anonymous(MIN_MEMORY)
    desc, avail, used = 0x1000, 0x2000, 0x3000
    for i, d in enumerate(descs):
        mem.write(GPA(desc + 16 * i), struct.pack("<QIHH", *d))
    q = Virtqueue(size)
    q.desc, q.avail, q.used = GPA(desc), GPA(avail), GPA(used)
    q.activate(mem, event_idx=False, indirect=False)
    mem.write_u16(GPA(avail + 4), 0)
    return q, mem


def _pop_loop(q, mem, after=None):
    from sealvm.core.addr import GPA

    def one():
        # The driver publishes head 0 once more; the device pops (and checks) it.
        mem.write_u16(GPA(0x2000 + 2), (q.last_avail_idx + 1) & 0xFFFF)
        chain = q.pop()
        if after is not None:
            after(chain)
    return one


def rng_checks_us(n: int) -> float:
    q, mem = _queue([(0x10000, 4096, 2, 0)])
    return _best_us(_pop_loop(q, mem), n)


def blk_checks_us(n: int) -> float:
    from sealvm.core.devices.virtio import blk as B
    q, mem = _queue([(0x10000, 16, 1, 1), (0x11000, 4096, 3, 2), (0x12000, 1, 2, 0)])
    mem.write(0x10000, struct.pack("<IIQ", B.T_IN, 0, 8))
    from sealvm.core import diskseal as D
    fd = os.memfd_create("bench-disk", os.MFD_CLOEXEC)
    key = os.urandom(32)
    D.format_disk(D.FileIO(fd), key, 64)
    dev = B.VirtioBlk()
    dev.open(D.SealedDisk(D.FileIO(fd), key))

    def header_checks(chain):
        readable = [s for s in chain.segments if not s.writable]
        writable = [s for s in chain.segments if s.writable]
        rtype, _, sector = B._HDR.unpack(B._region(mem, readable, 0, B._HDR.size))
        dev._range(sector, sum(s.length for s in writable) - 1, chain.head)
    return _best_us(_pop_loop(q, mem, header_checks), n)


# ---------------------------------------------------------------- the whole requests
def rng_request_us(args, runs: int, count: int) -> list[float]:
    from .exits import parse_rng
    hz = C.tsc_hz()
    out = []
    for _ in range(runs):
        r = C.timed_run(C.sealvm_cmd(C.guest(args.guests, "rng"), cmdline=f"count={count} chunk=4096"),
                        timeout=120)
        C.check(r, 0)
        p = parse_rng(r.out)
        out.append(p["cycles"] / (p["bytes"] / 4096) / hz * 1e6)
    return out


def blk_request_us(args, runs: int, count: int) -> list[float]:
    from .disk import Images, parse_phases
    hz = C.tsc_hz()
    work = Path(tempfile.mkdtemp(prefix="sealvm-bench-validation-", dir="/tmp"))
    out = []
    try:
        images = Images(work, 16)
        for _ in range(runs):
            cmd, env = images.command("sealvm", C.guest(args.guests, "blkbench"),
                                      f"tests=randwrite,randread bs=4096 qd=1 count={count} size=8M")
            r = C.timed_run(cmd, timeout=300, env=env)
            C.check(r, 0)
            p = parse_phases(r.out)["randread"]
            out.append(p["cycles"] / p["ops"] / hz * 1e6)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def portal_request_us(args, n: int) -> list[float]:
    from .split import portal_rtt
    return portal_rtt(args, n)


# ---------------------------------------------------------------- the benchmark
def run(args) -> dict:
    quick = args.quick
    n = 2000 if quick else 20000
    runs = 1 if quick else 3
    checks = portal_checks_us(n)
    checks["portal_us"] = checks["core_request_us"] + checks["host_reply_us"]
    checks["rng_us"] = rng_checks_us(n)
    checks["blk_us"] = blk_checks_us(n)
    whole = {"portal_us": portal_request_us(args, 300 if quick else 3000),
             "rng_us": rng_request_us(args, runs, 512 if quick else 4096),
             "blk_us": blk_request_us(args, runs, 300 if quick else 3000)}
    med = {k: C.median(v) for k, v in whole.items()}
    labels = {"portal_us": "portal QUERY", "rng_us": "virtio-rng 4 KiB request",
              "blk_us": "virtio-blk 4 KiB read (qd 1)"}
    rows, shares = [], {}
    for k, label in labels.items():
        shares[label] = [checks[k] / w for w in whole[k]]
        rows.append(C.summary_row(NAME, f"{label}: checks / whole (us)", checks[k], med[k],
                                  "whole request", "-", None, "us"))
    result = {
        "description": "validation (checks of untrusted input) per request against the whole "
                       "request; ratio = checks / whole",
        "n_check_loops": n, "runs": runs,
        "checks_us": checks, "whole_request_us": whole, "whole_request_median_us": med,
        "share": {k: C.median(v) for k, v in shares.items()},
        "share_samples": shares,
        "summary": rows,
    }
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag),
               "Validation share of each request (checks / whole request, log scale)",
               shares, "share of the request", log=True,
               note="checks: fastest of 5 timed loops in-process; whole: portal round trip to a "
                    "running core, guest-visible time per virtio request")
    return result


def report(result: dict) -> None:
    for label, share in result["share"].items():
        print(f"  {label:<30} validation share {100 * share:.2f} %")
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    raise SystemExit(main())

"""Attest: what measured boot and key release add to a VM's start.

Side by side in the same run, on hello.elf: `sealvm run` without an owner
manifest (no measurement, no preboot stage) against `sealvm run --manifest`
with a live key broker on loopback (the launcher measures the core, the
preboot stage runs the challenge/attest round, the core opens its keys);
start -> first guest byte for both. Also the launcher's measurement alone and
the broker round trip alone (challenge + attest with a test core's evidence).
Attested runs use the software root, and, where swtpm is installed, a
private swtpm as the root (SEALVM_TPM) too.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import common as C

NAME = "attest"


def _cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sealvm.cli", *args], cwd=C.SEALVM_ROOT,
                          capture_output=True, text=True, timeout=120, check=True,
                          env={**os.environ, **(env or {})})


def _owner(base: Path, hello: Path, tpm_env: dict) -> tuple[Path, subprocess.Popen, str]:
    d = base / "owner"
    _cli("owner", "init", str(d))
    _cli("owner", "sign", "--dir", str(d), str(hello), "--name", "bench", "--cmdline", "x=1")
    m = json.loads(_cli("measure").stdout)
    _cli("owner", "policy", "--dir", str(d), "add", "host", m["host_pub"])
    _cli("owner", "policy", "--dir", str(d), "add", "core", m["core_measurement"])
    if tpm_env:
        t = json.loads(_cli("measure", env=tpm_env).stdout)
        _cli("owner", "policy", "--dir", str(d), "add", "tpm", t["tpm_ak_pub"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    broker = subprocess.Popen([sys.executable, "-m", "sealvm.cli", "owner", "broker", "--dir",
                               str(d), "--port", str(port)], cwd=C.SEALVM_ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    return d, broker, f"http://127.0.0.1:{port}"


def measure_only(runs: int) -> list[float]:
    code = ("import time,sys; t=time.perf_counter(); from sealvm.launcher.measure import "
            "measure_core; measure_core(); print((time.perf_counter()-t)*1e3)")
    return [float(subprocess.run([sys.executable, "-c", code], cwd=C.SEALVM_ROOT,
                                 capture_output=True, text=True, check=True).stdout)
            for _ in range(runs)]


def run(args) -> dict:
    if os.geteuid() != 0:
        raise RuntimeError("the attest benchmark needs root (the launcher)")
    runs = 3 if args.quick else 10
    hello = C.guest(args.guests, "hello")
    base = Path(tempfile.mkdtemp(prefix="sealvm-bench-attest-"))
    from sealvm.tools import swtpm
    tpm_env = {}
    if shutil.which("swtpm"):
        port = swtpm.start_on_free_port(base / "tpm")
        tpm_env = {"SEALVM_TPM": f"127.0.0.1:{port}"}
    d, broker, url = _owner(base, hello, tpm_env)
    plain, attested, tpm = [], [], []
    attest_args = ("--manifest", str(d / "vms" / "bench"), "--broker", url)
    try:
        for _ in range(runs):
            r = C.timed_run(C.sealvm_cmd(hello, cmdline="x=1"), timeout=60)
            C.check(r, 0)
            plain.append(r.first_byte_s * 1e3)
            r = C.timed_run(C.sealvm_cmd(hello, *attest_args, cmdline="x=1"), timeout=60)
            C.check(r, 0)
            attested.append(r.first_byte_s * 1e3)
            if tpm_env:
                r = C.timed_run(C.sealvm_cmd(hello, *attest_args, cmdline="x=1"), timeout=60,
                                env=tpm_env)
                C.check(r, 0)
                tpm.append(r.first_byte_s * 1e3)
    finally:
        broker.terminate()
        broker.wait(10)
        if tpm_env:
            swtpm.stop(base / "tpm")
        shutil.rmtree(base, ignore_errors=True)
    meas = measure_only(runs)
    med = statistics.median
    rows = [
        C.summary_row(NAME, "start -> first byte, attested (software root), ms", med(attested),
                      med(plain), "sealvm run without attestation", "-", None, "ms"),
        C.summary_row(NAME, "added by measured boot + preboot + key release, ms",
                      med(attested) - med(plain), med(plain), "boot without it", "-", None, "ms"),
        C.summary_row(NAME, "launcher measurement of the core alone, ms", med(meas), med(plain),
                      "boot without attestation", "-", None, "ms"),
    ]
    if tpm:
        rows.append(C.summary_row(NAME, "start -> first byte, attested (swtpm root), ms", med(tpm),
                                  med(plain), "sealvm run without attestation", "-", None, "ms"))
    result = {"description": __doc__.split("\n\n")[0],
              "samples": {"plain_first_byte_ms": plain, "attested_first_byte_ms": attested,
                          "tpm_attested_first_byte_ms": tpm, "measurement_ms": meas},
              "summary": rows}
    C.write_result(NAME, result, args.out, args.tag)
    C.bar_plot(C.plot_path(NAME, args.out, args.tag), "what attestation adds to start-up",
               {"run, no attestation": plain, "run, attested (software root)": attested,
                "run, attested (swtpm root)": tpm, "measurement alone": meas}, "ms")
    return result


def report(result: dict) -> None:
    C.print_rows(result["summary"])


def main(argv=None) -> int:
    return C.module_main(__doc__, run, report, argv)


if __name__ == "__main__":
    sys.exit(main())

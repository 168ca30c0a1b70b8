"""Every test guest, run for real under `sealvm run` on /dev/kvm."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, guest_image, needs_kvm, sealvm

pytestmark = needs_kvm


def words(line: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in line.split() if "=" in w)


def lines_starting(out: str, prefix: str) -> list[str]:
    return [l for l in out.splitlines() if l.startswith(prefix)]


@pytest.mark.parametrize("entry", ["pvh", "long"])
def test_hello_prints_and_exits_zero(entry):
    r = sealvm("run", str(guest_image("hello")), "--entry", entry, "--cmdline", "greeting=world")
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert out.startswith("HELLO from sealvm guest")
    assert "greeting=world" in out


def test_guest_exit_status_becomes_ours():
    r = sealvm("run", str(guest_image("hello")), "--cmdline", "status=7")
    assert r.returncode == 7, r.stdout.decode() + r.stderr.decode()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_compute_is_correct_on_every_vcpu(vcpus):
    r = sealvm("run", str(guest_image("compute")), "--vcpus", str(vcpus),
               "--cmdline", "iters=2000000")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    results = [words(l) for l in lines_starting(out, "compute cpu=")]
    assert sorted(int(w["cpu"]) for w in results) == list(range(vcpus))
    assert len({w["result"] for w in results}) == 1
    assert all(int(w["cycles"]) > 0 for w in results)


def test_memtouch_checks_its_memory():
    r = sealvm("run", str(guest_image("memtouch")), "--cmdline", "mib=16 secs=2 rate=20000")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "first_touch_cycles=" in out
    ticks = lines_starting(out, "memtouch t=")
    assert ticks and all(l.rstrip().endswith("ok") for l in ticks)


def test_rng_reads_entropy_through_virtio():
    r = sealvm("run", str(guest_image("rng")), "--cmdline", "count=64 chunk=4096")
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    (line,) = lines_starting(out, "rng bytes=")
    assert int(words(line)["bytes"]) == 64 * 4096 and line.rstrip().endswith("ok")


def test_rng_without_the_device_fails_cleanly():
    r = sealvm("run", str(guest_image("rng")), "--no-rng")
    assert r.returncode not in (0, 125, 126), r.stdout.decode()


def test_idle_guest_sleeps_instead_of_spinning():
    t0 = time.monotonic()
    start = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    r = sealvm("run", str(guest_image("idle")), "--cmdline", "secs=2")
    end = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    wall = time.monotonic() - t0
    cpu = (end.ru_utime - start.ru_utime) + (end.ru_stime - start.ru_stime)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert wall >= 2.0
    # Behaviour, not a benchmark: a spinning guest would burn ~the whole wall time.
    assert cpu < wall / 2, f"idle guest used {cpu:.2f}s CPU in {wall:.2f}s"


@pytest.mark.parametrize("when", ["running", "starting"])
def test_ctrl_c_stops_the_vm_cleanly(when):
    # As from a terminal: SIGINT at its default even when this suite runs in the background.
    p = subprocess.Popen([sys.executable, "-m", "sealvm.cli", "run", str(guest_image("memtouch")),
                          "--cmdline", "mib=4 secs=30 rate=100"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if when == "running":
        assert p.stdout.readline().startswith(b"memtouch")   # the guest is running
    else:
        time.sleep(0.3)                                       # still starting up
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 130, err.decode()
    assert b"Traceback" not in err


def test_missing_and_bad_images_get_a_message_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.elf"
    bad.write_bytes(b"#!/bin/sh\necho not a kernel\n")
    for path, needle in [(tmp_path / "nope.elf", "nope.elf"), (bad, "not an ELF")]:
        r = sealvm("run", str(path))
        err = r.stderr.decode()
        assert r.returncode == 125, err
        assert needle in err and "Traceback" not in err


@pytest.mark.parametrize("args,needle", [
    (["--memory", "1M"], "memory"),
    (["--memory", "lots"], "memory size"),
    (["--vcpus", "0"], "at least 1"),
    (["--cmdline", "x" * 5000], "command line"),
])
def test_bad_options_are_explained(args, needle):
    r = sealvm("run", str(guest_image("hello")), *args)
    err = r.stderr.decode()
    assert r.returncode in (2, 125), err
    assert needle in err and "Traceback" not in err

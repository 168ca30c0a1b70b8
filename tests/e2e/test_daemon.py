"""The host daemon end to end: lifecycle over its API and CLI, restarts, concurrency."""
from __future__ import annotations

import os
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import guest_image, poll
from tests.e2e.conftest import HOST_UID, processes_of_uids

IDLE = str(guest_image("idle"))
MEMTOUCH = str(guest_image("memtouch"))


def wait_for(pred, timeout=20, step=0.1):
    v = poll(pred, timeout, step)
    if not v:
        raise TimeoutError("condition not met")
    return v


def test_lifecycle_through_the_cli(hostd):
    r = hostd.cli("create", str(guest_image("hello")), "--name", "hi", "--cmdline", "status=3",
                  "--start")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: b"stopped" in hostd.cli("list").stdout)
    listing = hostd.cli("list").stdout.decode()
    assert "hi" in listing and "stopped" in listing and listing.rstrip().endswith("3")
    assert b"HELLO from sealvm guest" in hostd.cli("console", "hi").stdout
    assert b"created hi" in hostd.cli("logs", "hi").stdout


def test_pause_resume_stop_and_wrong_state_errors(hostd):
    assert hostd.cli("create", IDLE, "--name", "idl", "--cmdline", "secs=60").returncode == 0
    r = hostd.cli("pause", "idl")
    assert r.returncode != 0 and b"configured" in r.stderr      # not started yet
    for action, state in (("start", b"running"), ("pause", b"paused"), ("resume", b"running"),
                          ("stop", b"stopped")):
        r = hostd.cli(action, "idl")
        assert r.returncode == 0 and state in r.stdout, r.stderr
    r = hostd.cli("start", "nosuchvm")
    assert r.returncode != 0 and b"no VM named" in r.stderr


def test_daemon_runs_unprivileged(hostd):
    pid = hostd.daemon_pid()
    status = open(f"/proc/{pid}/status").read()
    uids = [l for l in status.splitlines() if l.startswith(("Uid:", "CapEff:", "CapPrm:"))]
    assert uids[0].split()[1:] == [str(HOST_UID)] * 4
    assert all(l.split()[1] == "0000000000000000" for l in uids[1:])


def test_daemon_killed_with_sigkill_loses_no_vm(hostd):
    with hostd.api() as api:
        for i in range(4):
            r = api.post("/v1/vms", json={"image": MEMTOUCH, "name": f"m{i}", "memory_mib": 64,
                                          "cmdline": "mib=8 secs=0 rate=2000", "start": True})
            assert r.status_code == 201, r.text
        pids = {v["id"]: v["pid"] for v in api.get("/v1/vms").json()}
    wait_for(lambda: all(b"memtouch t=1" in hostd.cli("console", f"m{i}").stdout
                         for i in range(4)), timeout=30)
    os.kill(hostd.daemon_pid(), signal.SIGKILL)
    time.sleep(3)                       # the guests run on, unattended
    hostd.wait_ready()
    with hostd.api() as api:
        vms = {v["id"]: v for v in api.get("/v1/vms").json()}
    assert sorted(vms) == ["m0", "m1", "m2", "m3"]
    assert all(v["state"] == "running" and v["pid"] == pids[k] for k, v in vms.items())
    before = {k: hostd.cli("console", k).stdout.count(b"memtouch t=") for k in vms}
    time.sleep(2.5)
    for k in vms:
        out = hostd.cli("console", k).stdout
        assert out.count(b"memtouch t=") > before[k], "console must keep flowing after re-attach"
        assert b"MISMATCH" not in out
        complete = out.decode().split("\n")[:-1]          # the last line may be half written
        ticks = [l for l in complete if l.startswith("memtouch t=")]
        assert all(l.endswith("ok") for l in ticks)


@pytest.mark.parametrize("hostd", ["64200-64299"], indirect=True)
def test_eight_vms_created_and_stopped_concurrently(hostd):
    fds_before = len(os.listdir(f"/proc/{hostd.daemon_pid()}/fd"))

    def cycle(i):
        with hostd.api() as api:
            r = api.post("/v1/vms", json={"image": IDLE, "name": f"c{i}", "memory_mib": 32,
                                          "cmdline": "secs=60", "start": True})
            assert r.status_code == 201, r.text
            assert r.json()["state"] == "running"
            uid = r.json()["uid"]
            r = api.delete(f"/v1/vms/c{i}")
            assert r.status_code == 204, r.text
            return uid
    with ThreadPoolExecutor(8) as pool:
        uids = list(pool.map(cycle, range(8)))
    assert all(64200 <= u <= 64299 for u in uids)
    wait_for(lambda: not processes_of_uids(64200, 64299), timeout=15)
    with hostd.api() as api:
        assert api.get("/v1/vms").json() == []
    assert len(os.listdir(f"/proc/{hostd.daemon_pid()}/fd")) <= fds_before + 2


def test_a_linux_kernel_and_initrd_are_created_through_the_daemon(hostd, tmp_path):
    """The daemon reads the kernel and initrd and hands both to the core, which builds the
    Linux machine (this KVM cannot run it: tests/linux run it nested).  Usage errors first."""
    import json
    import shutil
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "linux"))
    import nested
    d = Path(tempfile.mkdtemp(prefix="sealvm-lx-", dir="/tmp"))
    try:
        os.chmod(d, 0o755)
        kernel = d / "vmlinuz"
        shutil.copy(nested.debian_kernel(), kernel)
        (d / "initrd").write_bytes(b"initramfs" * 1000)
        for p in (kernel, d / "initrd"):
            os.chmod(p, 0o644)
        r = hostd.cli("create", str(guest_image("hello")), "--initrd", str(d / "initrd"))
        assert r.returncode != 0 and b"--initrd needs a Linux kernel" in r.stderr
        r = hostd.cli("create", str(guest_image("hello")), "--kernel", str(kernel))
        assert r.returncode != 0 and b"either GUEST" in r.stderr
        r = hostd.cli("create", "--kernel", str(kernel), "--initrd", str(d / "initrd"),
                      "--name", "lx", "--memory", "512M")
        assert r.returncode == 0, r.stderr
        rec = json.loads(hostd.cli("show", "lx").stdout)
        assert rec["state"] == "configured" and rec["entry"] == "linux", rec
        assert rec["initrd"] == str(d / "initrd") and "console=ttyS0" in rec["cmdline"]
        r = hostd.cli("create", "--kernel", str(d / "initrd"), "--name", "notakernel",
                      "--memory", "512M")
        assert r.returncode != 0 and b"bzImage" in r.stderr, r.stderr
    finally:
        hostd.cli("delete", "lx")
        shutil.rmtree(d, ignore_errors=True)

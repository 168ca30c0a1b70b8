"""A real `sealvm hostd` (launcher as root, daemon as an unprivileged uid) per test module."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import HAVE_KVM, ROOT

HOST_UID = 63970


class Hostd:
    def __init__(self, base: Path, uid_range: str, extra: tuple[str, ...] = ()):
        self.base = base
        self.state = base / "state"
        self.run = base / "run"
        self.sock = str(self.run / "hostd.sock")
        self.log = open(base / "hostd.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sealvm.cli", "hostd", f"--state-dir={self.state}",
             f"--run-dir={self.run}", f"--host-uid={HOST_UID}", f"--uid-range={uid_range}",
             *extra],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.api().get("/v1/health").status_code == 200:
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError("hostd did not come up: " + (self.base / "hostd.log").read_text())

    def api(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=self.sock), base_url="http://sealvm",
                            timeout=60)

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sealvm.cli", "vm", "--socket", self.sock,
                               *args], cwd=ROOT, capture_output=True, timeout=timeout)

    def daemon_pid(self) -> int:
        out = subprocess.run(["pgrep", "-f", f"sealvm.host.daemon.*{self.state}"],
                             capture_output=True, text=True).stdout.split()
        return int(out[0]) if out else 0

    def close(self) -> None:
        try:
            with self.api() as api:
                for vm in api.get("/v1/vms").json():
                    api.delete(f"/v1/vms/{vm['id']}")
        except (httpx.HTTPError, OSError, ValueError):
            pass
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


def processes_of_uids(lo: int, hi: int) -> list[int]:
    """Pids of every process whose real uid is in [lo, hi]."""
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = os.stat(f"/proc/{p}")
            except OSError:
                continue
            if lo <= st.st_uid <= hi:
                pids.append(int(p))
    return pids


@pytest.fixture
def hostd(request):
    if not HAVE_KVM:
        pytest.skip("no usable /dev/kvm on this machine")
    base = Path(tempfile.mkdtemp(prefix="sealvm-e2e-"))
    os.chmod(base, 0o755)
    h = Hostd(base, getattr(request, "param", "64100-64199"))
    yield h
    h.close()

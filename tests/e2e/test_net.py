"""The sealed network end to end, the way an owner and a host run it, with the CLI only.

The owner's namespace runs `sealvm owner broker` and `sealvm owner gateway` (TAP
10.77.0.1/24); the host's namespace runs `sealvm run --manifest ... --net
10.99.0.1:51820`, whose core gets the net key from the broker after attesting.
From the owner's side, `ping` and a UDP echo reach the netecho guest through the
host, and `tcpdump` on the host's interface records only sealed datagrams: the
canary the guest sends never shows in the tunnel's traffic.  (The capture is of
the tunnel's port: the canary is on the guest's command line, which the
attestation evidence carries to the broker, and the host chose it anyway.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import ROOT, guest_image, needs_kvm
from tests.netlab import (GATEWAY_PORT, GUEST_IP, GW_VETH, NetLab, echo, netlab_or_skip,
                          udp_socket)

pytestmark = [needs_kvm, pytest.mark.skipif(bool(netlab_or_skip()), reason=str(netlab_or_skip()))]

CANARY = "E2E-NET-CANARY-51c0"
CMDLINE = f"secs=12 canary={CANARY}"
BROKER_PORT = 8471


def cli(*args, prefix=(), **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "sealvm.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, **kw)


def popen(*args, prefix=(), **kw) -> subprocess.Popen:
    return subprocess.Popen([*prefix, sys.executable, "-m", "sealvm.cli", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_port(lab: NetLab, port: int) -> None:
    end = time.monotonic() + 20
    while time.monotonic() < end:
        r = subprocess.run(lab.exec(lab.gw) + ["ss", "-ltnu"], capture_output=True, text=True)
        if f":{port} " in r.stdout:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} in the owner's namespace")


def test_ping_and_udp_echo_through_the_host_see_only_ciphertext(tmp_path):
    d = tmp_path / "owner"
    assert cli("owner", "init", str(d)).returncode == 0
    r = cli("owner", "sign", "--dir", str(d), str(guest_image("netecho")), "--name", "netvm",
            "--cmdline", CMDLINE, "--devices", "rng,net")
    assert r.returncode == 0, r.stderr
    m = json.loads(cli("measure").stdout)
    for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
        assert cli("owner", "policy", "--dir", str(d), "add", kind, value).returncode == 0
    pcap = tmp_path / "host.pcap"
    with NetLab() as lab:
        procs = []
        try:
            procs.append(popen("owner", "broker", "--dir", str(d), "--listen", GW_VETH,
                               "--port", str(BROKER_PORT), prefix=lab.exec(lab.gw)))
            procs.append(popen("owner", "gateway", "--dir", str(d), "--vm", "netvm", "--listen",
                               f"{GW_VETH}:{GATEWAY_PORT}", "--tap", "svtap0",
                               "--tap-addr", "10.77.0.1/24", prefix=lab.exec(lab.gw)))
            wait_port(lab, BROKER_PORT)
            wait_port(lab, GATEWAY_PORT)
            dump = subprocess.Popen(lab.exec(lab.host) + ["tcpdump", "-i", lab.host_if, "-U",
                                                          "-w", str(pcap), "udp", "port",
                                                          str(GATEWAY_PORT)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(dump)
            vm = popen("run", str(guest_image("netecho")), "--cmdline", CMDLINE,
                       "--manifest", str(d / "vms" / "netvm"),
                       "--broker", f"http://{GW_VETH}:{BROKER_PORT}",
                       "--net", f"{GW_VETH}:{GATEWAY_PORT}", prefix=lab.exec(lab.host))
            procs.append(vm)
            lines: list[str] = []
            ready = threading.Event()

            def read() -> None:
                for line in vm.stdout:
                    lines.append(line)
                    if "netecho ready" in line:
                        ready.set()
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            assert ready.wait(30), "the guest never came up"
            ping = subprocess.run(lab.exec(lab.gw) + ["ping", "-c", "3", "-i", "0.3", "-w", "8",
                                                      GUEST_IP], capture_output=True, text=True)
            owner = udp_socket(lab.gw)
            got = echo(owner, b"sealed hello", timeout=2.0)
            owner.close()
            vm.wait(40)
            reader.join(5)
            out, err = "".join(lines), vm.stderr.read()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                    p.wait(10)
    assert "keys released" in err, err
    assert vm.returncode == 0, (out, err)
    assert "netecho ready" in out and "netecho done" in out
    assert " 0% packet loss" in ping.stdout, ping.stdout + ping.stderr
    assert got == [b"sealed hello"]
    seen = pcap.read_bytes()
    assert len(seen) > 2000                           # the tunnel's datagrams passed by here
    assert CANARY.encode() not in seen and b"sealed hello" not in seen

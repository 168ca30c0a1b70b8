"""A fleet on one machine: an owner and its broker, three hosts (each a network namespace
on one bridge, with its own copy of the installed sealvm tree, its own `sealvm hostd`,
swtpm and `sealvm fleet agent`), and a `sealvm fleet controller`.

Used by tests/fleet and bench/fleet.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.conftest import ROOT, guest_image, poll
from tests.e2e.conftest import HOST_UID, Hostd

GUEST_CMDLINE = "mib=8 secs=0 rate=200 idle=1"
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def wait_port(ip: str, port: int, timeout: float = 30, what: str = "a service") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not listen on {ip}:{port}")
            time.sleep(0.1)


class Host:
    def __init__(self, fleet: "Fleet", index: int, name: str):
        self.fleet, self.name = fleet, name
        self.ns = f"svf{fleet.tag}{name}"
        self.veth = f"svf{fleet.tag}{name}"
        self.ip = f"{fleet.net}.{10 + index}"
        self.base = fleet.base / name
        self.base.mkdir(mode=0o755)
        self.code = self.base / "code"
        self.config = self.base / "host.conf"
        lo = 64600 + 50 * index
        self.uid_range = (lo, lo + 49)
        self.agent_port = 8480
        self.agent_proc: subprocess.Popen | None = None
        self.hostd: Hostd | None = None
        self.tpm_port = 0

    @property
    def agent_url(self) -> str:
        return f"http://{self.ip}:{self.agent_port}"

    def setup_network(self) -> None:
        f = self.fleet
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", self.ns)
        sh("ip", "link", "set", self.veth, "master", f.bridge)
        sh("ip", "link", "set", self.veth, "up")
        sh("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        sh("ip", "-n", self.ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.ns, "link", "set", "lo", "up")

    def setup(self) -> None:
        # The installed tree of this host: a copy, so a test can change it.
        shutil.copytree(ROOT / "sealvm", self.code / "sealvm", symlinks=True)
        self.config.write_text(f"# sealvm host {self.name}\nuid-range={self.uid_range[0]}-"
                               f"{self.uid_range[1]}\nperiod=1\n")
        for p in [self.code, *self.code.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        self.start_hostd()
        # swtpm inside the namespace, on its loopback; the agent connects to it.
        self.tpm_port = 2321
        sh("ip", "netns", "exec", self.ns, PY, "-m", "sealvm.tools.swtpm", "start",
           str(self.base / "tpm"), str(self.tpm_port))

    def start_hostd(self) -> None:
        log = open(self.base / "hostd.log", "ab")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, PY, "-m", "sealvm.cli", "hostd",
             f"--state-dir={self.base / 'state'}", f"--run-dir={self.base / 'run'}",
             f"--host-uid={HOST_UID}", f"--uid-range={self.uid_range[0]}-{self.uid_range[1]}"],
            cwd=self.code, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        hd = Hostd.__new__(Hostd)
        hd.base, hd.state, hd.run, hd.log, hd.proc = (self.base, self.base / "state",
                                                      self.base / "run", log, proc)
        hd.sock = str(self.base / "run" / "hostd.sock")
        hd.wait_ready(60)
        self.hostd = hd

    def start_agent(self, state: str = "agent", env: dict | None = None) -> None:
        f = self.fleet
        log = open(self.base / f"{state}.log", "ab")
        self.agent_proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, PY, "-m", "sealvm.cli", "fleet", "agent",
             "--name", self.name, "--listen", f"{self.ip}:{self.agent_port}",
             "--controller", f.controller_url, "--code-dir", str(self.code),
             "--config", str(self.config), "--uid-range", f"{self.uid_range[0]}-{self.uid_range[1]}",
             "--state-dir", str(self.base / state), "--tpm", f"127.0.0.1:{self.tpm_port}",
             "--period", str(f.period)],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        wait_port(self.ip, self.agent_port, what=f"agent {self.name}")

    def stop_agent(self) -> None:
        if self.agent_proc is not None and self.agent_proc.poll() is None:
            os.killpg(self.agent_proc.pid, signal.SIGTERM)
            try:
                self.agent_proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.agent_proc.pid, signal.SIGKILL)
                self.agent_proc.wait(5)
        self.agent_proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:       # the port is free again
            try:
                socket.create_connection((self.ip, self.agent_port), 0.2).close()
                time.sleep(0.1)
            except OSError:
                return

    def identity(self) -> dict:
        return json.loads((self.base / "agent" / "identity.json").read_text())

    def api(self) -> httpx.Client:
        return self.hostd.api()

    def teardown(self) -> None:
        t0 = time.monotonic()
        self.stop_agent()
        t1 = time.monotonic()
        if self.hostd is not None:
            self.hostd.close()
        subprocess.run([PY, "-m", "sealvm.tools.swtpm", "stop", str(self.base / "tpm")],
                       capture_output=True, cwd=ROOT)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        if os.environ.get("SEALVM_FLEET_TIMING"):
            print(f"teardown {self.name}: agent {t1 - t0:.1f} s, rest {time.monotonic() - t1:.1f} s")


class Fleet:
    """Owner + broker + 3 hosts + controller. `Fleet.start()` then `close()`."""

    def __init__(self, names=("a", "b", "c"), period: float = 1.0, capacity_mib: int = 1024,
                 memory_mib: int = 64, snapshot_every: float = 5.0,
                 cmdline: str = GUEST_CMDLINE):
        self.tag = f"{os.getpid() % 10000}"
        self.net = f"10.{212 + os.getpid() % 20}.{os.getpid() % 200}"
        self.bridge = f"svfbr{self.tag}"
        self.period, self.capacity_mib, self.memory_mib = period, capacity_mib, memory_mib
        self.snapshot_every, self.cmdline = snapshot_every, cmdline
        self.base = Path(tempfile.mkdtemp(prefix="sealvm-fleet-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.hosts = [Host(self, i, n) for i, n in enumerate(names)]
        self.controller_ip = f"{self.net}.1"
        self.controller_port = free_port()
        self.controller_url = f"http://{self.controller_ip}:{self.controller_port}"
        self.procs: list[subprocess.Popen] = []
        self.controller: subprocess.Popen | None = None

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def cli(self, *args, timeout=120) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "sealvm.cli", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)

    def start(self) -> "Fleet":
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{self.controller_ip}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        self.owner_setup()
        for h in self.hosts:
            h.setup_network()
        with ThreadPoolExecutor(len(self.hosts)) as pool:     # daemons and agents start slowly
            for r in [pool.submit(h.setup) for h in self.hosts]:
                r.result()
            for r in [pool.submit(h.start_agent) for h in self.hosts]:
                r.result()
        self.write_config()
        self.start_controller()
        return self

    def owner_setup(self) -> None:
        owner = self.owner = self.base / "owner"
        assert self.cli("owner", "init", str(owner)).returncode == 0
        m = json.loads(self.cli("measure").stdout)
        for kind, value in (("host", m["host_pub"]), ("core", m["core_measurement"])):
            assert self.cli("owner", "policy", "--dir", str(owner), "add", kind,
                            value).returncode == 0
        public = self.public = self.base / "public"
        (public / "vms").mkdir(parents=True)
        shutil.copy(owner / "owner.pub.json", public / "owner.pub.json")
        for p in [public, *public.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        port = free_port()
        self.procs.append(subprocess.Popen(
            [PY, "-m", "sealvm.cli", "owner", "broker", "--dir", str(owner), "--listen",
             self.controller_ip, "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL))
        self.broker_url = f"http://{self.controller_ip}:{port}"
        wait_port(self.controller_ip, port, what="the broker")
        self.snapshots = self.base / "snapshots"
        self.snapshots.mkdir(mode=0o755)
        shutil.chown(self.snapshots, HOST_UID, HOST_UID)

    def write_config(self) -> None:
        from sealvm.fleet.measure import golden_values
        hosts = []
        for h in self.hosts:
            ident = h.identity()
            hosts.append({"name": h.name, "agent": h.agent_url, "daemon": h.hostd.sock,
                          "address": h.ip, "capacity_mib": self.capacity_mib,
                          "uid_range": list(h.uid_range), "agent_pub": ident["agent_pub"],
                          "tpm_ak_pub": ident["tpm_ak_pub"],
                          "golden": golden_values(h.code, h.config)})
        self.config = self.base / "fleet.json"
        self.config.write_text(json.dumps({
            "period": self.period, "k": 2, "parallel": 2, "snapshot_dir": str(self.snapshots),
            "snapshot_every": self.snapshot_every, "hosts": hosts}, indent=1))

    def start_controller(self, port: int | None = None, env: dict | None = None,
                         state: str = "controller") -> subprocess.Popen:
        port = port or self.controller_port
        proc = subprocess.Popen(
            [PY, "-m", "sealvm.cli", "fleet", "controller", "--config", str(self.config),
             "--listen", f"{self.controller_ip}:{port}", "--state-dir", str(self.base / state)],
            cwd=ROOT, stdout=open(self.base / f"{state}.log", "ab"), stderr=subprocess.STDOUT,
            env=env)
        self.procs.append(proc)
        if port == self.controller_port:
            self.controller = proc
        wait_port(self.controller_ip, port, what="the controller")
        return proc

    def ctl(self) -> httpx.Client:
        return httpx.Client(base_url=self.controller_url, timeout=60)

    def table(self) -> dict:
        with self.ctl() as c:
            return c.get("/v1/table").json()

    def verdicts(self) -> dict:
        return {h["name"]: h["verdict"] for h in self.table()["hosts"]}

    def wait(self, cond, timeout: float = 30, what: str = "condition", step: float = 0.1):
        v = poll(cond, timeout, step)
        if not v:
            raise AssertionError(f"timed out waiting for {what}; table: "
                                 f"{json.dumps(self.table(), indent=1)[-4000:]}")
        return v

    def wait_all_trusted(self, timeout: float = 30) -> None:
        self.wait(lambda: set(self.verdicts().values()) == {"trusted"}, timeout, "all trusted")

    def manifest(self, name: str, memory_mib: int) -> Path:
        """The owner signs one manifest per VM: the broker keeps a generation per manifest."""
        out = self.public / "vms" / name
        if not out.exists():
            r = self.cli("owner", "sign", "--dir", str(self.owner), str(guest_image("memtouch")),
                         "--name", name, "--cmdline", self.cmdline, "--memory", str(memory_mib))
            assert r.returncode == 0, r.stderr
            shutil.copytree(self.owner / "vms" / name, out)
            for p in [out, *out.rglob("*")]:
                os.chmod(p, 0o755 if p.is_dir() else 0o644)
        return out

    def place(self, name: str, memory_mib: int | None = None, priority: int = 0) -> dict:
        memory_mib = memory_mib or self.memory_mib
        manifest = self.manifest(name, memory_mib)
        with self.ctl() as c:
            r = c.post("/v1/vms", json=dict(
                name=name, image=str(guest_image("memtouch")),
                manifest=str(manifest), broker=self.broker_url,
                memory_mib=memory_mib, cmdline=self.cmdline,
                priority=priority))
        assert r.status_code == 201, r.text
        return r.json()

    def where(self, vm: str) -> str:
        return next(v["host"] for v in self.table()["vms"] if v["id"] == vm)

    def readmit(self, name: str) -> None:
        h = self.host(name)
        h.stop_agent()
        h.start_agent()
        with self.ctl() as c:
            assert c.post(f"/v1/hosts/{name}/readmit").status_code == 200

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
        def down(h):
            try:
                h.teardown()
            except Exception:                    # noqa: BLE001 - tear down the rest
                pass
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(down, self.hosts))
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        if not os.environ.get("SEALVM_KEEP_TEST_DIRS"):
            shutil.rmtree(self.base, ignore_errors=True)

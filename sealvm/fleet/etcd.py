"""A local etcd cluster for the fleet's table: three members on loopback, started by the
project (Debian's `etcd-server`), with authentication and the fleet's roles.

    cluster = EtcdCluster(Path("/tmp/x"), members=3).start()
    cluster.secure({"controller": "pw"}, {"h1": "pw1"})   # auth on, roles below
    cluster.endpoints                                      # ["127.0.0.1:P", ...]
    cluster.kill(0); cluster.restart(0); cluster.stop()

Roles once `secure` ran: `controller` may read and write every key; `agent-NAME` may write
only NAME's evidence (`evidence/NAME/`), so a host can neither set its own verdict nor
touch another host's entries.  `sealvm fleet etcd` runs one in the foreground.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

ETCD, ETCDCTL = "etcd", "etcdctl"
ROOT_PASSWORD = "sealvm-root"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class EtcdCluster:
    def __init__(self, base: Path, members: int = 3, token: str = "sealvm-fleet"):
        if not shutil.which(ETCD):
            raise RuntimeError("etcd is not installed (Debian package etcd-server; "
                               "`make deps` installs it)")
        self.base, self.n, self.token = Path(base), members, token
        ports = _free_ports(2 * members)
        self.client_ports, self.peer_ports = ports[:members], ports[members:]
        self.names = [f"m{i}" for i in range(members)]
        self.procs: list[subprocess.Popen | None] = [None] * members
        self.root_password: str | None = None

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def _cmd(self, i: int, state: str) -> list[str]:
        peers = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(self.names, self.peer_ports))
        return [ETCD, "--name", self.names[i], "--data-dir", str(self.base / self.names[i]),
                "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_ports[i]}",
                "--initial-cluster", peers, "--initial-cluster-token", self.token,
                "--initial-cluster-state", state, "--heartbeat-interval", "50",
                "--election-timeout", "500", "--log-level", "error", "--logger", "zap"]

    def _spawn(self, i: int, state: str) -> None:
        log = open(self.base / f"{self.names[i]}.log", "ab")
        self.procs[i] = subprocess.Popen(self._cmd(i, state), stdout=log, stderr=log,
                                         start_new_session=True)
        log.close()

    def start(self, timeout: float = 30) -> EtcdCluster:
        self.base.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            self._spawn(i, "new")
        self.wait_healthy(timeout)
        return self

    def ctl(self, *args: str, user: str | None = None, check: bool = True,
            endpoints: list[str] | None = None) -> subprocess.CompletedProcess:
        cmd = [ETCDCTL, "--endpoints", ",".join(endpoints or self.live_endpoints())]
        if user or self.root_password:
            cmd += ["--user", user or f"root:{self.root_password}"]
        r = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=30,
                           env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"})
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r

    def live_endpoints(self) -> list[str]:
        return [e for e, p in zip(self.endpoints, self.procs) if p and p.poll() is None]

    def wait_healthy(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            r = self.ctl("endpoint", "health", check=False)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("etcd did not become healthy: " + r.stderr.strip()[-500:])
            time.sleep(0.2)

    def secure(self, controllers: dict[str, str], agents: dict[str, str]) -> None:
        """Users and roles (see the module's text), then authentication on."""
        self.ctl("user", "add", f"root:{ROOT_PASSWORD}", "--interactive=false")
        self.ctl("role", "add", "controller")
        # every key from " " on: all the fleet's keys (they start with a letter)
        self.ctl("role", "grant-permission", "controller", "readwrite", "--from-key", " ")
        for name, pw in controllers.items():
            self.ctl("user", "add", f"{name}:{pw}", "--interactive=false")
            self.ctl("user", "grant-role", name, "controller")
        for host, pw in agents.items():
            role = f"agent-{host}"
            self.ctl("role", "add", role)
            self.ctl("role", "grant-permission", "--prefix=true", role, "readwrite",
                     f"evidence/{host}/")
            self.ctl("user", "add", f"{role}:{pw}", "--interactive=false")
            self.ctl("user", "grant-role", role, role)
        self.ctl("auth", "enable")
        self.root_password = ROOT_PASSWORD

    def kill(self, i: int) -> None:
        p = self.procs[i]
        if p and p.poll() is None:
            p.kill()
            p.wait(10)

    def restart(self, i: int) -> None:
        self.kill(i)
        self._spawn(i, "existing")

    def stop(self) -> None:
        for i in range(self.n):
            self.kill(i)

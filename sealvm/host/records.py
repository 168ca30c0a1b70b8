"""What the daemon remembers about each VM, kept on disk so a restart loses nothing.

One JSON file per VM under STATE_DIR/vms/, written atomically (temp file,
fsync, rename), so a daemon killed mid-write leaves the old or the new
record, never half of one.  Records hold management data only: the core
holds everything inside the VM.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")     # whole string: fullmatch


@dataclass
class VmRecord:
    id: str
    image: str
    memory_mib: int = 256
    vcpus: int = 1
    cmdline: str = ""
    entry: str = "pvh"
    rng: bool = True
    net: str = ""             # the owner's gateway, HOST:PORT ("" = no network card)
    net_direct: bool = False  # the core holds a connected UDP socket (no relay in the daemon)
    disk: str = ""            # the sealed disk image attached at create, if any
    initrd: str = ""          # a Linux guest's initramfs (entry "linux")
    state: str = "creating"   # creating, configured, running, paused, stopped, lost, failed
    pid: int = 0
    uid: int = 0
    socket: str = ""
    exit_status: int | None = None
    stop_reason: str = ""
    created: float = field(default_factory=time.time)
    broker: str = ""          # the owner's key broker, for attested VMs
    generation: int = 0       # the newest generation the core reported (snapshots)

    def public(self) -> dict:
        return asdict(self)


def new_vm_id(name: str | None) -> str:
    if name:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"bad VM name {name!r}: use 1-63 of a-z, 0-9 and '-'")
        return name
    return "vm-" + secrets.token_hex(4)


class RecordStore:
    def __init__(self, state_dir: str | os.PathLike):
        self.dir = Path(state_dir) / "vms"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def path(self, vm_id: str) -> Path:
        return self.dir / f"{vm_id}.json"

    def vm_dir(self, vm_id: str) -> Path:
        d = self.dir / vm_id
        d.mkdir(exist_ok=True)
        return d

    def save(self, rec: VmRecord) -> None:
        with self._lock:
            tmp = self.path(rec.id).with_suffix(".tmp")
            with open(tmp, "w") as f:
                json.dump(rec.public(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path(rec.id))

    def delete(self, vm_id: str) -> None:
        with self._lock:
            self.path(vm_id).unlink(missing_ok=True)

    def load_all(self) -> list[VmRecord]:
        known = {f.name for f in fields(VmRecord)}
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                data = json.loads(p.read_text())
                out.append(VmRecord(**{k: v for k, v in data.items() if k in known}))
            except (OSError, ValueError, TypeError):
                continue
        return out

"""The VM behind the portal: every host request is checked here before it acts.

`VmService` holds the VM's state machine (EMPTY → CONFIGURED → RUNNING ⇄
PAUSED → STOPPED) and the capability token of the currently attached host.
Each operation checks its arguments and the state and either acts or raises
`Refused(status, message)`; the portal loop turns that into an error reply and
a log line, and the VM keeps running.  Nothing here trusts the host: sizes,
offsets and counts are re-checked even where the wire decoder already did.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections import deque
from typing import Callable

from .addr import MiB
from .attestation import Attestation, AttestationFailed
from .boot.errors import BootError
from .machine import Machine, MachineConfig, MachineError
from .memory import MemoryConfigError, RamOptions
from ..wire.portal import clip_message as clip
from ..wire.portal_ops import CONFIG_FLAG_BENCH_SINKS as FLAG_BENCH_SINKS
from ..wire.portal_ops import CONFIG_FLAG_HUGETLB as FLAG_HUGETLB
from ..wire.portal_ops import CONFIG_FLAG_PREFAULT as FLAG_PREFAULT
from ..wire.portal_ops import CONFIG_FLAG_RNG as FLAG_RNG
from ..wire.portal_ops import CONFIG_FLAG_THP as FLAG_THP
from ..wire.portal_ops import CONFIG_FLAGS as KNOWN_FLAGS
from ..wire.portal_ops import AttachKind

log = logging.getLogger("sealvm.core")

EMPTY, CONFIGURED, RUNNING, PAUSED, STOPPED = range(5)
STATE_NAMES = ("empty", "configured", "running", "paused", "stopped")
MAX_IMAGE = 1 << 30
MAX_MANIFEST = 1 << 20
CONSOLE_BACKLOG = 64 * 1024
CONSOLE_EVENT_MAX = 64 * 1024
PROGRESS_STEP = 64 << 20
MIGRATION_TIMEOUT = 60.0
ENTRY_MODES = {1: "pvh", 2: "long", 3: "linux"}
ATTACH_BLOCK, ATTACH_NET = AttachKind.BLOCK, AttachKind.NET
ATTACH_NAMES = {k: k.name.lower() for k in AttachKind}
DEVICE_OF_ATTACH = {ATTACH_BLOCK: "blk", ATTACH_NET: "net"}   # (kind, 0) attached -> device


class Refused(Exception):
    """A host request the core will not carry out (status names the reason)."""

    def __init__(self, status: str, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class VmService:
    def __init__(self, vm_id: str, memory_limit_mib: int, emit: Callable[[str, dict], bool], *,
                 kvm_fd: int | None = None,
                 attestation: "Attestation | None" = None, witness_fd: int = -1,
                 harden_memory: Callable[[Machine], None] = lambda m: None,
                 before_start: Callable[[], None] = lambda: None):
        self.vm_id = vm_id
        self.kvm_fd = kvm_fd
        self.witness_fd = witness_fd          # the launcher's disk generation record
        self.memory_limit_mib = memory_limit_mib
        self._emit = emit                 # (event name, fields) -> delivered?
        self._harden_memory = harden_memory
        self._before_start = before_start
        self._lock = threading.RLock()
        self.state = EMPTY
        self.token: bytes | None = None
        self.blobs: dict[int, list] = {}      # image kind -> [bytes so far, announced total]
        self.attestation = attestation
        self.machine: Machine | None = None
        self.attached: dict[tuple[int, int], int] = {}   # (AttachKind, index) -> fd
        self.config: dict | None = None       # what CONFIGURE (or a snapshot) set up
        self._ticket: bytes | None = None     # a sealed snapshot waiting for its receipt
        self._disk_floor = 0                  # the disk generation a migration source committed
        self._progress_sent = 0
        self._migrated = False                # sent away: no resume without a receipt
        self.exit_status = -1
        self.stop_reason = ""
        self._console_backlog: deque[bytes] = deque()
        self._backlog_bytes = 0
        self.finished = threading.Event()  # set once STOP has been answered: the core exits

    # ---- capabilities ----------------------------------------------------
    def hello(self) -> bytes:
        """A fresh token for the newly attached host; the old one is revoked."""
        with self._lock:
            self.token = os.urandom(16)
            return self.token

    def _need(self, *states: int) -> None:
        if self.state not in states:
            want = "/".join(STATE_NAMES[s] for s in states)
            raise Refused("WRONG_STATE", f"VM is {STATE_NAMES[self.state]}, needs {want}")

    # ---- set-up ----------------------------------------------------------
    def load_image(self, kind: int, offset: int, total: int, data: bytes) -> None:
        with self._lock:
            self._need(EMPTY)
            if kind not in (1, 2, 3):
                raise Refused("OUT_OF_RANGE", f"image kind {kind} is not supported by this core")
            if not 0 < total <= (MAX_MANIFEST if kind == 3 else MAX_IMAGE):
                raise Refused("OUT_OF_RANGE", f"size {total} of image kind {kind} out of range")
            buf = self.blobs.setdefault(kind, [bytearray(), total])
            if offset == 0:
                buf[:] = [bytearray(), total]
            if total != buf[1] or offset != len(buf[0]):
                raise Refused("OUT_OF_RANGE", f"image chunk at {offset} but {len(buf[0])} "
                                              f"of {buf[1]} bytes received")
            if offset + len(data) > total:
                raise Refused("OUT_OF_RANGE", "image chunk runs past the announced size")
            buf[0] += data

    def attach(self, kind: int, index: int, fd: int) -> None:
        """Keep an fd the host handed over: a disk file or relay socket before START; a
        snapshot or migration stream at any time (a newer one replaces the older)."""
        with self._lock:
            if kind in DEVICE_OF_ATTACH:
                self._need(EMPTY)
                if (kind, index) in self.attached:
                    raise Refused("WRONG_STATE", f"{ATTACH_NAMES[kind]} {index} is already attached")
            elif (old := self.attached.pop((kind, index), None)) is not None:
                os.close(old)
            self.attached[(kind, index)] = fd

    def take_attached(self, kind: int, index: int) -> int:
        """Hand over (and forget) an attached fd; the caller closes it."""
        with self._lock:
            fd = self.attached.pop((kind, index), None)
        if fd is None:
            raise Refused("WRONG_STATE", f"no {ATTACH_NAMES[kind]} {index} is attached")
        return fd

    def configure(self, memory_mib: int, vcpus: int, entry: int, flags: int, cmdline: str) -> None:
        with self._lock:
            self._need(EMPTY)
            image, total = self.blobs.get(1, [b"", 0])
            if len(image) != total or not image:
                raise Refused("WRONG_STATE", f"image incomplete: {len(image)} of {total} bytes")
            manifest = self.blobs.get(3)
            if manifest is not None and len(manifest[0]) != manifest[1]:
                raise Refused("WRONG_STATE", "owner manifest incomplete")
            if not 2 <= memory_mib <= self.memory_limit_mib:
                raise Refused("OUT_OF_RANGE", f"memory {memory_mib} MiB outside 2.."
                                              f"{self.memory_limit_mib} (the launcher's limit)")
            if entry not in ENTRY_MODES or flags & ~KNOWN_FLAGS or (
                    flags & FLAG_THP and flags & FLAG_HUGETLB):
                raise Refused("OUT_OF_RANGE", "unknown entry mode or flags")
            initrd = self.blobs.get(2)
            if initrd is not None and (len(initrd[0]) != initrd[1] or ENTRY_MODES[entry] != "linux"):
                raise Refused("WRONG_STATE", "initrd incomplete, or given for a non-Linux entry")
            devices = ["rng"] if flags & FLAG_RNG else []
            devices += [DEVICE_OF_ATTACH[k] for k, i in self.attached if k in DEVICE_OF_ATTACH
                        and i == 0]
            if manifest is not None:
                if self.attestation is None:
                    raise Refused("FAILED", "this core was started without attestation")
                try:
                    self.attestation.configure(bytes(manifest[0]), bytes(image), cmdline,
                                               memory_mib, vcpus, ENTRY_MODES[entry],
                                               devices, initrd=initrd and bytes(initrd[0]))
                except AttestationFailed as e:
                    raise Refused("FAILED", str(e)) from None
            self.config = dict(memory_mib=memory_mib, vcpus=vcpus, entry=ENTRY_MODES[entry],
                               flags=flags, cmdline=cmdline, devices=sorted(devices))
            self.machine = self._build(self.config, bytes(image),
                                       initrd=bytes(initrd[0]) if initrd is not None else None)
            self.blobs.clear()
            self.state = CONFIGURED

    def _build(self, c: dict, image: bytes, restore=None, memory=None,
               initrd: bytes | None = None) -> Machine:
        huge = ("thp" if c["flags"] & FLAG_THP else "hugetlb" if c["flags"] & FLAG_HUGETLB
                else None)
        cfg = MachineConfig(image=image, memory=c["memory_mib"] * MiB, vcpus=c["vcpus"],
                            cmdline=c["cmdline"], entry=c["entry"], initrd=initrd,
                            rng=bool(c["flags"] & FLAG_RNG), kvm_fd=self.kvm_fd,
                            bench_sinks=bool(c["flags"] & FLAG_BENCH_SINKS),
                            ram=RamOptions(bool(c["flags"] & FLAG_PREFAULT), huge),
                            disk_report=self._disk_report,
                            attached={k: self.attached.pop(k) for k in list(self.attached)
                                      if k[0] in DEVICE_OF_ATTACH}, restore=restore,
                            ram_filled=memory, **self._net_config(c["devices"]))
        machine = Machine(cfg, self._console, on_stopped=self._stopped)
        try:
            machine.build()
            self._harden_memory(machine)
        except (MachineError, BootError, MemoryConfigError) as e:
            machine.close()
            raise Refused("FAILED", str(e)) from None
        except OSError as e:   # includes SandboxError (cannot protect guest RAM)
            machine.close()
            raise Refused("FAILED", f"cannot build the VM: {e}") from None
        return machine

    # ---- snapshots (docs/snapshots.md) -----------------------------------
    def _snapshot_key(self) -> bytes:
        att = self.attestation
        if att is None or att.keys is None:
            raise Refused("FAILED", "snapshots need an attested VM: the snapshot key comes "
                                    "from the owner's broker")
        return att.keys["snapshot"]

    def _progress(self, done: int, total: int) -> None:
        if done == total or done - self._progress_sent >= PROGRESS_STEP:
            self._progress_sent = done
            self._emit("PROGRESS", {"done": done, "total": total})

    def _commit(self, key: bytes, receipt: bytes) -> dict:
        """The broker's receipt for the outstanding ticket: this copy is now the newest."""
        from ..wire import attest as A
        if self._ticket is None:
            raise Refused("WRONG_STATE", "no ticket is waiting for a receipt")
        try:
            self.attestation.generation = A.check_receipt(key, receipt, self._ticket)
        except (A.AttestError, ValueError) as e:
            raise Refused("FAILED", f"receipt refused: {e}") from None
        self._ticket = None
        return dict(ticket=b"", generation=self.attestation.generation, bytes=0)

    def _new_ticket(self, key: bytes, set_id: bytes) -> bytes:
        from ..wire import attest as A
        att = self.attestation
        self._ticket = A.advance_ticket(key, att.manifest["name"], att.generation, set_id,
                                        os.urandom(16))
        return self._ticket

    def snapshot(self, receipt: bytes) -> dict:
        """Seal the VM to the attached SNAPSHOT fd as generation+1 (the VM stays paused) and
        answer the broker ticket; with the broker's receipt, that snapshot is the newest."""
        with self._lock:
            self._need(RUNNING, PAUSED)
            key, att = self._snapshot_key(), self.attestation
            if receipt:
                return self._commit(key, receipt)
            fd = self.take_attached(AttachKind.SNAPSHOT, 0)
            from . import snapshot as S
            from .vmstate import VmStateError
            try:
                if self.state == RUNNING:
                    self.machine.pause()
                    self.state = PAUSED
                self._progress_sent = 0
                set_id, size = S.save(self.machine, fd, key, att.manifest["name"],
                                      att.generation + 1, self.config, self._progress)
            except (OSError, VmStateError) as e:
                raise Refused("FAILED", f"snapshot not written: {e}") from None
            finally:
                os.close(fd)
            return dict(ticket=self._new_ticket(key, set_id), generation=att.generation + 1,
                        bytes=size)

    def restore(self, receipt: bytes) -> dict:
        """Rebuild the VM from the attached snapshot: attest naming it (the broker releases
        keys only for the newest snapshot), open and check all of it, answer a ticket; the
        VM may start once the broker's receipt makes this copy the newest."""
        with self._lock:
            if receipt:
                self._need(CONFIGURED)
                return self._commit(self._snapshot_key(), receipt)
            manifest, att = self._taker_manifest("a restore"), self.attestation
            from . import snapshot as S
            fd = self.take_attached(AttachKind.SNAPSHOT, 0)
            try:
                reader = S.Reader(fd)
                h = reader.header
                att.configure(manifest, None, "", 0, 0, "", [],
                              restore={"generation": h.generation, "set": h.set_id})
                att.release()
                self._emit("LOG", {"level": 20, "message": clip("attestation: " + att.result)})
                self._progress_sent = 0
                self.machine = S.load(reader, att.keys["snapshot"], att.manifest["name"],
                                      h.generation, self._restored, self._progress)
            except (S.SnapshotError, AttestationFailed, OSError) as e:
                raise Refused("FAILED", f"restore refused: {e}") from None
            finally:
                os.close(fd)
            self.blobs.clear()
            self.state = CONFIGURED
            return dict(ticket=self._new_ticket(att.keys["snapshot"], os.urandom(16)),
                        generation=att.generation + 1, bytes=reader.size)

    def _taker_manifest(self, who: str) -> bytes:
        """The owner's manifest, for a core that takes over a VM (restore, migration):
        it must be EMPTY, attested, and hold the whole manifest."""
        self._need(EMPTY)
        manifest = self.blobs.get(3)
        if manifest is None or len(manifest[0]) != manifest[1] or self.attestation is None:
            raise Refused("WRONG_STATE", f"{who} needs an attested core and the owner's "
                                         "manifest (LOAD_IMAGE kind 3)")
        return bytes(manifest[0])

    def _restored(self, config: dict, state: dict, memory=None) -> Machine:
        from .vmstate import Restore
        m = self.attestation.manifest
        if any(config.get(k) != m[k] for k in ("memory_mib", "vcpus", "entry", "cmdline",
                                               "devices")):
            raise Refused("FAILED", "the VM's configuration is not the signed manifest's")
        self.config = config
        return self._build(config, b"", Restore(state, None, paused=False), memory)

    # ---- live migration (docs/migration.md) ------------------------------
    def migrate_out(self, receipt: bytes, downtime_ms: int = 300) -> dict:
        """Send the VM over the attached MIGRATION stream; it ends paused here, and may
        resume only with the broker's receipt for the ticket (the target never took over)."""
        from . import migration as MG
        from ..wire.sealed import SealError
        with self._lock:
            key, att = self._snapshot_key(), self.attestation
            if receipt:
                self._need(PAUSED)
                done = self._commit(key, receipt)
                self._migrated = False
                self.machine.resume()
                self.state = RUNNING
                return dict(done, report="")
            self._need(RUNNING, PAUSED)
            sock = socket.socket(fileno=self.take_attached(AttachKind.MIGRATION, 0))
            was_running = self.state == RUNNING
            try:
                sock.settimeout(MIGRATION_TIMEOUT)
                self._progress_sent = 0
                report = MG.Source(self.machine, sock, key, att.manifest["name"],
                                   att.generation, self.config, self._progress,
                                   downtime_ms / 2000).run()
            except (OSError, MG.MigrationError, SealError, ValueError) as e:
                if was_running:     # the stream never ended: the target cannot take over
                    self.machine.resume()
                raise Refused("FAILED", f"migration failed, the VM stays here: {e}") from None
            finally:
                sock.close()
            self.state, self._migrated = PAUSED, True
            return dict(ticket=self._new_ticket(key, os.urandom(16)),
                        generation=att.generation + 1, bytes=report["bytes"],
                        report=json.dumps(report))

    def migrate_in(self, receipt: bytes) -> dict:
        """Attest as the target, take the VM from the attached MIGRATION stream, answer
        the ticket; the VM starts once the broker's receipt makes this copy the newest."""
        from . import migration as MG
        from .memory import GuestMemory
        from ..wire.sealed import SealError
        with self._lock:
            if receipt:
                self._need(CONFIGURED)
                return self._commit(self._snapshot_key(), receipt)
            manifest, att = self._taker_manifest("a migration target"), self.attestation

            def attest(vm: str, generation: int) -> bytes:
                att.configure(manifest, None, "", 0, 0, "", [], migrate_from=generation)
                if att.manifest["name"] != vm:
                    raise MG.MigrationError(f"the stream carries VM {vm!r}, not "
                                            f"{att.manifest['name']!r}")
                att.release()
                return att.keys["snapshot"]

            sock = socket.socket(fileno=self.take_attached(AttachKind.MIGRATION, 0))
            try:
                sock.settimeout(MIGRATION_TIMEOUT)
                self._progress_sent = 0
                self.machine, _, self._disk_floor = MG.receive(
                    sock, attest, lambda: GuestMemory.create(att.manifest["memory_mib"] * MiB),
                    self._restored, self._progress)
            except (OSError, MG.MigrationError, SealError, AttestationFailed, ValueError,
                    KeyError) as e:
                kind = f" ({e.kind})" if isinstance(e, SealError) else ""
                raise Refused("FAILED", f"migration refused{kind}: {e}") from None
            finally:
                sock.close()
            self.blobs.clear()
            self.state = CONFIGURED
            return dict(ticket=self._new_ticket(att.keys["snapshot"], os.urandom(16)),
                        generation=att.generation + 1, bytes=0)

    def _net_config(self, devices: list[str]) -> dict:
        """The network tunnel's key source: the owner's attested key, or a test key."""
        if "net" not in devices:
            return {}
        from .sandbox import switches
        report = (lambda m: self._emit("LOG", {"level": 20, "message": clip(m)}))
        opts = dict(net_report=report, net_options=dict(
            switches.test_net_options(), replay_check=not switches.disabled("net_replay"),
            seal_frames=not switches.disabled("net_seal")))
        if self.attestation is not None:     # the tunnel names this copy's generation
            opts["net_options"]["generation"] = lambda: self.attestation.generation
            return dict(opts, net_key=lambda: self.attestation.keys["net"])
        try:
            key = switches.test_net_key()
        except ValueError as e:
            raise Refused("FAILED", str(e)) from None
        if key is None:
            raise Refused("FAILED", "a network needs the owner's key: configure the VM with its "
                                    "signed manifest (the key broker releases the net key)")
        return dict(opts, net_key=lambda: key)

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            self._need(CONFIGURED)
            if self._ticket is not None:
                raise Refused("WRONG_STATE", "a restored VM starts only once the owner's "
                                             "broker made it the newest copy (RESTORE receipt)")
            if self.attestation is not None:
                try:     # before the guest's first instruction and before seccomp
                    self.attestation.release()
                except AttestationFailed as e:
                    self._emit("LOG", {"level": 40, "message": clip(str(e))})
                    raise Refused("FAILED", str(e)) from None
                self._emit("LOG", {"level": 20, "message": clip(
                    "attestation: " + self.attestation.result)})
                if self.machine.net is not None and "net" not in (self.attestation.keys or {}):
                    raise Refused("FAILED", "the owner's broker released no net key")
            if self.machine.blk is not None:
                self._open_disk()
            if self.attestation is not None and self.attestation.keys is not None:
                from . import migration, snapshot  # noqa: F401  (no imports after seccomp)
            self._before_start()
            self.state = RUNNING
            self.machine.start()
        self._report_modules()

    def _open_disk(self) -> None:
        """The disk key: the owner's (attested) or, in test mode only, the environment's."""
        from .diskseal import DiskError
        from .sandbox.switches import test_disk_key
        if self.attestation is not None:
            key = (self.attestation.keys or {}).get("disk")
        else:
            key = test_disk_key()
        if key is None:
            raise Refused("FAILED", "a disk is attached but there is no disk key (the owner "
                                    "releases it to an attested core)")
        try:
            owner = (lambda: self.attestation.generation) if self.attestation else None
            line = self.machine.open_disk(key, self._disk_floor, owner, self.witness_fd)
        except (DiskError, OSError) as e:
            self._emit("LOG", {"level": 40, "message": clip(f"disk refused: {e}")})
            raise Refused("FAILED", f"disk refused: {e}") from None
        self._emit("LOG", {"level": 20, "message": clip(line)})

    def _disk_report(self, message: str) -> None:
        self._emit("LOG", {"level": 40, "message": clip(message)})

    def _report_modules(self) -> None:
        """Tell the host which modules this core runs with (the TCB tool counts them)."""
        import sys
        names = sorted(n for n, m in sys.modules.items() if getattr(m, "__file__", None))
        line = ""
        for name in names:
            if len(line) + len(name) > 900:
                self._emit("LOG", {"level": 10, "message": "modules: " + line})
                line = ""
            line += name + " "
        self._emit("LOG", {"level": 10, "message": "modules: " + line})

    def pause(self) -> None:
        with self._lock:
            self._need(RUNNING)
            self.machine.pause()
            self.state = PAUSED

    def resume(self) -> None:
        with self._lock:
            self._need(PAUSED)
            if self._migrated:
                raise Refused("WRONG_STATE", "this VM was migrated away: it resumes here only "
                                             "with the owner's broker's receipt (MIGRATE_OUT)")
            self.machine.resume()
            self.state = RUNNING

    def stop(self) -> None:
        with self._lock:
            if self.machine is not None and self.state in (RUNNING, PAUSED, CONFIGURED):
                self.machine.stop("stopped by the host")

    def console_input(self, data: bytes) -> None:
        with self._lock:
            self._need(RUNNING, PAUSED)
            self.machine.serial.feed(data)
            self.machine._device_event()

    def query(self) -> dict:
        m = self.machine
        return dict(state=self.state, exit_status=self.exit_status,
                    stop_reason=clip(self.stop_reason),
                    vcpus=len(m.vcpus) if m else 0,
                    memory_mib=(m.config.memory // MiB) if m else 0,
                    exits=sum(v.exits for v in m.vcpus) if m else 0,
                    **self._disk_counters(m))

    @staticmethod
    def _disk_counters(m) -> dict:
        blk = m.blk if m else None
        disk = blk.disk if blk else None
        return dict(disk_requests=blk.requests if blk else 0,
                    disk_tampered=blk.tampered if blk else 0,
                    disk_io_errors=blk.io_errors if blk else 0,
                    disk_generation=disk.generation if disk else 0)

    # ---- from the machine -----------------------------------------------
    def _console(self, data: bytes) -> None:
        for i in range(0, len(data), CONSOLE_EVENT_MAX):
            self._console_chunk(data[i:i + CONSOLE_EVENT_MAX])

    def _console_chunk(self, data: bytes) -> None:
        if not self._emit("CONSOLE_OUTPUT", {"data": data}):
            with self._lock:   # no host attached: keep a bounded backlog for the next one
                self._console_backlog.append(data)
                self._backlog_bytes += len(data)
                while self._backlog_bytes > CONSOLE_BACKLOG:
                    self._backlog_bytes -= len(self._console_backlog.popleft())

    def flush_backlog(self) -> None:
        """Send what the guest printed while no host was attached."""
        with self._lock:
            if not self._console_backlog:
                return
            data = b"".join(self._console_backlog)
            self._console_backlog.clear()
            self._backlog_bytes = 0
        self._console(data)

    def _stopped(self, reason: str, status: int | None) -> None:
        self.exit_status = -1 if status is None else status
        self.stop_reason = reason
        self.state = STOPPED
        self._emit("VM_STOPPED", {"exit_status": self.exit_status, "reason": clip(reason)})

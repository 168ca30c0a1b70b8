"""The VM behind the portal: every host request is checked here before it acts.

`VmService` holds the VM's state machine (EMPTY → CONFIGURED → RUNNING ⇄
PAUSED → STOPPED) and the capability token of the currently attached host.
Each operation checks its arguments and the state and either acts or raises
`Refused(status, message)`; the portal loop turns that into an error reply and
a log line, and the VM keeps running.  Nothing here trusts the host: sizes,
offsets and counts are re-checked even where the wire decoder already did.
"""
from __future__ import annotations

import hmac
import logging
import os
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
ENTRY_MODES = {1: "pvh", 2: "long"}
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
                 attestation: "Attestation | None" = None,
                 harden_memory: Callable[[Machine], None] = lambda m: None,
                 before_start: Callable[[], None] = lambda: None):
        self.vm_id = vm_id
        self.kvm_fd = kvm_fd
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

    def check_token(self, token: bytes) -> None:
        current = self.token
        if current is None or not hmac.compare_digest(current, token):
            raise Refused("BAD_CAPABILITY", "capability token is not this VM's current token")

    def _need(self, *states: int) -> None:
        if self.state not in states:
            want = "/".join(STATE_NAMES[s] for s in states)
            raise Refused("WRONG_STATE", f"VM is {STATE_NAMES[self.state]}, needs {want}")

    # ---- set-up ----------------------------------------------------------
    def load_image(self, kind: int, offset: int, total: int, data: bytes) -> None:
        with self._lock:
            self._need(EMPTY)
            if kind not in (1, 3):
                raise Refused("OUT_OF_RANGE", f"image kind {kind} is not supported by this core")
            if not 0 < total <= (MAX_IMAGE if kind == 1 else MAX_MANIFEST):
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
            huge = "thp" if flags & FLAG_THP else "hugetlb" if flags & FLAG_HUGETLB else None
            devices = ["rng"] if flags & FLAG_RNG else []
            devices += [DEVICE_OF_ATTACH[k] for k, i in self.attached if k in DEVICE_OF_ATTACH
                        and i == 0]
            if manifest is not None:
                if self.attestation is None:
                    raise Refused("FAILED", "this core was started without attestation")
                try:
                    self.attestation.configure(bytes(manifest[0]), bytes(image), cmdline,
                                               memory_mib, vcpus, ENTRY_MODES[entry],
                                               devices)
                except AttestationFailed as e:
                    raise Refused("FAILED", str(e)) from None
            net = self._net_config(devices)
            cfg = MachineConfig(image=bytes(image), memory=memory_mib * MiB, vcpus=vcpus,
                                cmdline=cmdline, entry=ENTRY_MODES[entry],
                                rng=bool(flags & FLAG_RNG), kvm_fd=self.kvm_fd,
                                bench_sinks=bool(flags & FLAG_BENCH_SINKS),
                                ram=RamOptions(bool(flags & FLAG_PREFAULT), huge),
                                attached={k: self.attached.pop(k) for k in list(self.attached)
                                          if k[0] in DEVICE_OF_ATTACH}, **net)
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
            self.machine = machine
            self.blobs.clear()
            self.state = CONFIGURED

    def _net_config(self, devices: list[str]) -> dict:
        """The network tunnel's key source: the owner's attested key, or a test key."""
        if "net" not in devices:
            return {}
        from .sandbox import switches
        report = (lambda m: self._emit("LOG", {"level": 20, "message": clip(m)}))
        opts = dict(net_report=report, net_options=dict(
            switches.test_net_options(), replay_check=not switches.disabled("net_replay"),
            seal_frames=not switches.disabled("net_seal")))
        if self.attestation is not None:
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
            self._before_start()
            self.state = RUNNING
            self.machine.start()
        self._report_modules()

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
                    exits=sum(v.exits for v in m.vcpus) if m else 0)

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

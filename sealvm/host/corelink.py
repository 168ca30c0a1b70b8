"""The host's side of one core's portal: requests out, events in.

Console bytes the core sends are appended to the VM's console log (that is
all the host ever sees of the guest: what the guest chose to print); log
events go to the VM's core log; VM_STOPPED is reported to the manager.
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Callable

from ..wire import portal as P
from ..wire.portal import (EncodeError, Op, PortalClient, PortalClosed, PortalError, PortalRefused,
                           PortalTimeout)

IMAGE_CHUNK = 1 << 20
MAX_IMAGE = 1 << 30
STATE_NAMES = {0: "configuring", 1: "configured", 2: "running", 3: "paused", 4: "stopped"}


def read_image(path: str) -> bytes:
    """A guest image as the host reads it (with its own rights), at most 1 GiB."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_IMAGE + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not data or len(data) > MAX_IMAGE:
        raise ValueError(f"{path} is empty or larger than 1 GiB")
    return data


class CoreRefused(Exception):
    """The core refused a request, failed it, or is unreachable (message says which)."""


class CoreLink:
    def __init__(self, vm_id: str, sock: socket.socket, console_log: Path | None,
                 on_stopped: Callable[[str, int, str], None] | None = None,
                 on_console: Callable[[bytes], None] | None = None,
                 on_log: Callable[[int, str], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None):
        self.vm_id = vm_id
        self.console_path = console_log
        self._console = self._core_log = None
        if console_log is not None:
            self._console = open(console_log, "ab", buffering=0)
            self._core_log = open(console_log.with_name("core.log"), "a", buffering=1)
        self._on_stopped = on_stopped
        self._on_console = on_console
        self._on_log = on_log
        self._on_progress = on_progress
        self._closed = threading.Event()
        self.stopped: tuple[int, str] | None = None
        self.client = PortalClient(sock, on_event=self._event)

    @staticmethod
    def state_name(state) -> str:
        return STATE_NAMES.get(int(state), "unknown")

    def _event(self, msg) -> None:
        op, f = msg.header.op, msg.fields
        if op == P.EVENTS["CONSOLE_OUTPUT"]:
            if self._console is not None:
                self._console.write(f["data"])
            if self._on_console is not None:
                self._on_console(f["data"])
        elif op == P.EVENTS["VM_STOPPED"]:
            self.stopped = (f["exit_status"], f["reason"])
            if self._on_stopped is not None:
                self._on_stopped(self.vm_id, f["exit_status"], f["reason"])
        elif op == P.EVENTS["PROGRESS"]:
            if self._on_progress is not None:
                self._on_progress(self.vm_id, f["done"], f["total"])
        elif op == P.EVENTS["LOG"]:
            if self._on_log is not None:
                self._on_log(int(f["level"]), f["message"])
            if self._core_log is not None:
                self._core_log.write(f"[{int(f['level'])}] {f['message']}\n")

    def _call(self, op: int, timeout: float | None = 30, **fields):
        try:
            return self.client.call(op, timeout=timeout, **fields)
        except PortalRefused as e:
            raise CoreRefused(f"core refused {op.name}: {e}") from None
        except (PortalClosed, PortalTimeout, OSError) as e:
            raise CoreRefused(f"core unreachable during {op.name}: {e}") from None
        except EncodeError as e:
            raise CoreRefused(f"{op.name} not sent: {e}") from None
        except PortalError as e:
            raise CoreRefused(f"core sent a malformed reply to {op.name}: {e}") from None

    def hello(self) -> dict:
        try:
            return self.client.hello(timeout=10)
        except PortalRefused as e:
            raise CoreRefused(f"core refused HELLO: {e}") from None
        except (PortalClosed, PortalTimeout, OSError) as e:
            raise CoreRefused(f"core unreachable: {e}") from None

    def load_image(self, data: bytes, kind: int = 1) -> None:
        total = len(data)
        for off in range(0, total, IMAGE_CHUNK):
            self._call(Op.LOAD_IMAGE, kind=P.ImageKind(kind), offset=off, total=total,
                       data=data[off:off + IMAGE_CHUNK])

    def configure(self, memory_mib: int, vcpus: int, entry: str, flags: int, cmdline: str) -> None:
        """`entry` is "pvh" or "long"; `flags` are the portal's CONFIG_FLAG_* bits."""
        self._call(Op.CONFIGURE, timeout=120, memory_mib=memory_mib, vcpus=vcpus,
                   entry=P.EntryMode[entry.upper()], flags=flags, cmdline=cmdline)

    def start(self) -> None:
        self._call(Op.START)

    def pause(self) -> None:
        self._call(Op.PAUSE)

    def resume(self) -> None:
        self._call(Op.RESUME)

    def stop(self) -> None:
        self._call(Op.STOP)

    def query(self) -> dict:
        return self._call(Op.QUERY)

    def console_input(self, data: bytes) -> None:
        self._call(Op.CONSOLE_INPUT, data=data)

    def snapshot(self, receipt: bytes = b"") -> dict:
        """Empty receipt: the core seals the VM to the attached SNAPSHOT fd and answers a
        ticket for the owner's broker; with the broker's receipt the snapshot is committed."""
        return self._call(Op.SNAPSHOT, timeout=3600, receipt=receipt)

    def restore(self, receipt: bytes = b"") -> dict:
        """Empty receipt: the core attests naming the attached snapshot, rebuilds the VM
        from it and answers a ticket; with the broker's receipt the VM may start."""
        return self._call(Op.RESTORE, timeout=3600, receipt=receipt)

    def migrate_out(self, receipt: bytes = b"", downtime_ms: int = 300) -> dict:
        """Empty receipt: send the VM over the attached MIGRATION stream; with the broker's
        receipt (the target never took over): resume here."""
        return self._call(Op.MIGRATE_OUT, timeout=3600, receipt=receipt, downtime_ms=downtime_ms)

    def migrate_in(self, receipt: bytes = b"") -> dict:
        """Empty receipt: take the VM from the attached MIGRATION stream; with the broker's
        receipt the VM may start."""
        return self._call(Op.MIGRATE_IN, timeout=3600, receipt=receipt)

    def attach(self, kind: int, index: int, fd: int) -> None:
        """Hand the core an fd (P.AttachKind); the caller keeps and may close its copy."""
        self._call(Op.ATTACH, fds=(fd,), kind=P.AttachKind(kind), index=index)

    def wait_closed(self, timeout: float) -> bool:
        """Wait for the core to hang up (it exits after answering STOP)."""
        pause = threading.Event()
        for _ in range(int(timeout / 0.005)):
            if self.client.closed:
                return True
            pause.wait(0.005)
        return self.client.closed

    def close(self) -> None:
        self.client.close(timeout=1)
        for f in (self._console, self._core_log):
            if f is not None:
                f.close()

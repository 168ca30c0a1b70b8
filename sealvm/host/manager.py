"""VM lifecycle in the host daemon: records on disk, one portal link per core.

The manager asks the launcher for a core, sends it the image (read with the
daemon's own permissions, so the daemon cannot make the root launcher read a
file for it) and the configuration, and from then on only relays lifecycle
requests and console bytes.  On start-up it re-attaches to every core that is
still running, so a daemon crash never loses a VM.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time

from ..launcher.protocol import (FLAG_ATTEST, FLAG_INSECURE_SAME_UID, OP_SPAWN, REPLY_SIZE, STATUS_OK,
                                 decode_reply, encode_request, recv_with_fd)
from ..wire import portal_ops as P
from ..wire.portal_ops import CONFIG_FLAG_RNG
from .backends.blockfile import open_disk_file
from ..wire.portal_ops import AttachKind
from .corelink import CoreLink, CoreRefused, read_image
from .records import RecordStore, VmRecord, new_vm_id

log = logging.getLogger("sealvm.host")
CONSOLE_READ_MAX = 1 << 20


def broker_advance(broker: str, ticket: bytes) -> bytes:
    """Relay a core's generation ticket to the owner's broker; its receipt, or CoreRefused.
    Both are MACed under the VM's snapshot key: the daemon can only carry or drop them."""
    import httpx
    try:
        r = httpx.post(broker.rstrip("/") + "/v1/generation", json={"ticket": ticket.decode()},
                       timeout=30, trust_env=False)
        body = r.json()
    except (httpx.HTTPError, ValueError) as e:
        raise CoreRefused(f"the owner's broker at {broker} did not answer: {e}") from None
    if r.status_code != 200 or "receipt" not in body:
        raise CoreRefused(f"the owner's broker refused the snapshot: {body.get('error', body)}")
    return str(body["receipt"]).encode()


class UnknownVm(KeyError):
    def __str__(self) -> str:
        return f"no VM named {self.args[0]!r}"


class WrongState(Exception):
    pass


class LauncherClient:
    """The daemon's end of the launcher channel (SOCK_SEQPACKET)."""

    def __init__(self, sock: socket.socket, insecure: bool = False):
        self.sock = sock
        self.insecure = insecure
        self._lock = threading.Lock()

    def spawn(self, vm_id: str, memory_mib: int,
              attest: bool = False) -> tuple[int, int, str, socket.socket]:
        flags = (FLAG_INSECURE_SAME_UID if self.insecure else 0) | (FLAG_ATTEST if attest else 0)
        with self._lock:
            self.sock.send(encode_request(OP_SPAWN, vm_id, memory_mib, flags))
            data, fd = recv_with_fd(self.sock, REPLY_SIZE)
        status, pid, uid, message = decode_reply(data)
        if status != STATUS_OK or fd is None:
            if fd is not None:
                os.close(fd)
            raise CoreRefused(f"launcher: {message}")
        return pid, uid, message, socket.socket(fileno=fd)


class VmManager:
    def __init__(self, state_dir: str, launcher: LauncherClient):
        self.store = RecordStore(state_dir)
        self.launcher = launcher
        self._lock = threading.RLock()
        self.records: dict[str, VmRecord] = {}
        self.links: dict[str, CoreLink] = {}
        self.progress: dict[str, tuple[int, int]] = {}
        self.timings: dict[str, dict] = {}   # the last restore's phases, per VM
        self.pending_migrations: dict[str, bytes] = {}   # VM -> its resume ticket
        self.relays: dict = {}      # vm id -> netrelay.Relay moving its sealed datagrams

    # ---- start-up ------------------------------------------------------
    def reattach_all(self) -> None:
        for rec in self.store.load_all():
            self.records[rec.id] = rec
            if rec.state in ("stopped", "lost", "failed") or not rec.socket:
                continue
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(rec.socket)
                link = self._link(rec, sock)
                state = link.query()["state"]
                self._set_state(rec, link.state_name(state))
                log.info("re-attached to %s (pid %d, %s)", rec.id, rec.pid, rec.state)
            except (OSError, CoreRefused) as e:
                rec.state, rec.stop_reason = "lost", f"core gone while the daemon was away: {e}"
                self.store.save(rec)

    def _link(self, rec: VmRecord, sock: socket.socket) -> CoreLink:
        console = self.store.vm_dir(rec.id) / "console.log"
        link = CoreLink(rec.id, sock, console, on_stopped=self._on_stopped,
                        on_progress=lambda vm, done, total: self.progress.__setitem__(
                            vm, (done, total)))
        link.hello()
        self.links[rec.id] = link
        return link

    # ---- lifecycle -------------------------------------------------------
    def create(self, name, image, memory_mib, vcpus, cmdline, entry, rng,
               manifest: bytes | None = None, broker: str = "", net: str | None = None,
               net_direct: bool = False, disk: str | None = None,
               initrd: str | None = None) -> VmRecord:
        vm_id = new_vm_id(name)
        if entry not in ("pvh", "long", "linux"):
            raise ValueError(f"entry must be pvh, long or linux, not {entry!r}")
        if initrd and entry != "linux":
            raise ValueError("an initrd belongs to a Linux kernel (entry linux)")
        gateway = None
        if net:
            from .netrelay import parse_address
            gateway = parse_address(net)
        data = read_image(image)
        initrd_data = read_image(initrd) if initrd else None
        disk_fd = open_disk_file(disk) if disk else None    # before any core exists
        try:
            return self._create(vm_id, image, data, memory_mib, vcpus, cmdline, entry, rng,
                                manifest, broker, disk, disk_fd, net, net_direct, gateway,
                                initrd, initrd_data)
        finally:
            if disk_fd is not None:
                os.close(disk_fd)

    def _create(self, vm_id, image, data, memory_mib, vcpus, cmdline, entry, rng, manifest,
                broker, disk, disk_fd, net=None, net_direct=False, gateway=None,
                initrd=None, initrd_data=None) -> VmRecord:
        with self._lock:
            if vm_id in self.records:
                raise ValueError(f"a VM named {vm_id!r} exists already")
            rec = VmRecord(vm_id, os.path.abspath(image), memory_mib, vcpus, cmdline, entry, rng,
                           broker=broker, net=net or "", net_direct=bool(net and net_direct),
                           disk=os.path.abspath(disk) if disk else "",
                           initrd=os.path.abspath(initrd) if initrd else "")
            self.records[vm_id] = rec
        try:
            rec.pid, rec.uid, rec.socket, sock = self.launcher.spawn(vm_id, memory_mib,
                                                                     attest=manifest is not None)
            self.store.save(rec)
            link = self._link(rec, sock)
            link.load_image(data)
            if initrd_data is not None:
                link.load_image(initrd_data, kind=2)
            if manifest is not None:
                link.load_image(manifest, kind=3)
            if disk_fd is not None:
                link.attach(AttachKind.BLOCK, 0, disk_fd)
            if net:
                self._attach_net(vm_id, link, gateway, net_direct)
            link.configure(memory_mib, vcpus, entry, CONFIG_FLAG_RNG if rng else 0, cmdline)
        except (CoreRefused, OSError) as e:
            rec.state, rec.stop_reason = "failed", str(e)
            self.store.save(rec)
            self._finish(vm_id)     # the core would otherwise wait for a host forever
            raise CoreRefused(str(e)) from None
        self._set_state(rec, "configured")
        return rec

    # ---- snapshots (docs/snapshots.md) -------------------------------------
    def snapshot(self, vm_id: str, path: str | None = None, resume: bool = True) -> dict:
        """Have the core seal the VM into a new file, get the owner's broker to make it the
        newest generation, hand the receipt back.  The file is removed unless committed."""
        rec = self.get(vm_id)
        link = self.links.get(vm_id)
        if link is None or rec.state not in ("running", "paused"):
            raise WrongState(f"{vm_id} is {rec.state}; a snapshot needs a running or paused VM")
        if not rec.broker:
            raise WrongState(f"{vm_id} has no owner: snapshots need an attested VM")
        was_running = rec.state == "running"
        if path is None:
            d = self.store.dir.parent / "snapshots"
            d.mkdir(mode=0o700, exist_ok=True)
            path = str(d / f"{vm_id}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.svs")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        committed = False
        try:
            try:
                link.attach(P.AttachKind.SNAPSHOT, 0, fd)
            finally:
                os.close(fd)
            self.progress[vm_id] = (0, 0)
            t0 = time.perf_counter()
            sealed = link.snapshot()
            t1 = time.perf_counter()
            self._set_state(rec, "paused")
            receipt = broker_advance(rec.broker, sealed["ticket"])
            done = link.snapshot(receipt)
            committed = True
            timing = {"seal_s": t1 - t0, "commit_s": time.perf_counter() - t1}
        finally:
            if not committed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if resume and was_running and rec.state == "paused":
                with contextlib.suppress(CoreRefused):
                    link.resume()
                    self._set_state(rec, "running")
        rec.generation = done["generation"]
        self.store.save(rec)
        return {"snapshot": path, "generation": done["generation"], "bytes": sealed["bytes"],
                **timing}

    def restore(self, snapshot: str, name: str | None, manifest: bytes, broker: str,
                disk: str | None = None, net: str | None = None,
                net_direct: bool = False) -> VmRecord:
        """A new VM whose core attests as the restorer of `snapshot` and rebuilds it (with
        the VM's sealed disk, when it had one)."""
        import json
        m = json.loads(json.loads(manifest)["manifest"])
        vm_id = new_vm_id(name)
        disk_fd = open_disk_file(disk) if disk else None
        try:
            fd = os.open(snapshot, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if disk_fd is not None:
                os.close(disk_fd)
            raise
        try:
            with self._lock:
                if vm_id in self.records:
                    raise ValueError(f"a VM named {vm_id!r} exists already")
                rec = VmRecord(vm_id, os.path.abspath(snapshot), m["memory_mib"], m["vcpus"],
                               m["cmdline"], m["entry"], "rng" in m["devices"], broker=broker,
                               disk=os.path.abspath(disk) if disk else "")
                self.records[vm_id] = rec
            try:
                t0 = time.perf_counter()
                rec.pid, rec.uid, rec.socket, sock = self.launcher.spawn(vm_id, m["memory_mib"],
                                                                         attest=True)
                self.store.save(rec)
                link = self._link(rec, sock)
                link.load_image(manifest, kind=3)
                if disk_fd is not None:
                    link.attach(P.AttachKind.BLOCK, 0, disk_fd)
                if net:                        # the restored core makes a new tunnel session
                    from .netrelay import parse_address
                    self._attach_net(vm_id, link, parse_address(net), net_direct)
                link.attach(P.AttachKind.SNAPSHOT, 0, fd)
                self.progress[vm_id] = (0, 0)
                t1 = time.perf_counter()
                ticket = link.restore()["ticket"]
                t2 = time.perf_counter()
                rec.generation = link.restore(broker_advance(broker, ticket))["generation"]
                self.timings[vm_id] = {"spawn_s": t1 - t0, "attest_and_load_s": t2 - t1,
                                       "commit_s": time.perf_counter() - t2}
            except (CoreRefused, OSError) as e:
                rec.state, rec.stop_reason = "failed", str(e)
                self.store.save(rec)
                self._finish(vm_id)
                raise CoreRefused(str(e)) from None
        finally:
            os.close(fd)
            if disk_fd is not None:
                os.close(disk_fd)
        self._set_state(rec, "configured")
        return rec

    # ---- live migration (docs/migration.md) ------------------------------
    def incoming(self, name: str | None, manifest: bytes, broker: str,
                 listen: str = "127.0.0.1", disk: str | None = None, net: str | None = None,
                 net_direct: bool = False) -> dict:
        """Get ready to take a migrating VM: a core that will attest as its target, and a
        TCP port for the source host's stream.  Returns {"id", "port"} at once; the VM
        starts here only if the owner's broker makes this copy the newest."""
        import json
        m = json.loads(json.loads(manifest)["manifest"])
        vm_id = new_vm_id(name)
        with self._lock:
            if vm_id in self.records:
                raise ValueError(f"a VM named {vm_id!r} exists already")
            rec = VmRecord(vm_id, "(migration)", m["memory_mib"], m["vcpus"], m["cmdline"],
                           m["entry"], "rng" in m["devices"], broker=broker)
            self.records[vm_id] = rec
        lsock = socket.create_server((listen, 0))
        disk_fd = None
        try:
            disk_fd = open_disk_file(disk) if disk else None
            rec.pid, rec.uid, rec.socket, sock = self.launcher.spawn(vm_id, m["memory_mib"],
                                                                     attest=True)
            self.store.save(rec)
            link = self._link(rec, sock)
            link.load_image(manifest, kind=3)
            if disk_fd is not None:      # the same sealed disk (shared storage); the target
                link.attach(P.AttachKind.BLOCK, 0, disk_fd)  # opens it only once it runs
            if net:                      # a new tunnel session from this host
                from .netrelay import parse_address
                self._attach_net(vm_id, link, parse_address(net), net_direct)
        except (CoreRefused, OSError, ValueError) as e:
            if disk_fd is not None:
                os.close(disk_fd)
            lsock.close()
            rec.state, rec.stop_reason = "failed", str(e)
            self.store.save(rec)
            self._finish(vm_id)
            raise CoreRefused(str(e)) from None
        if disk_fd is not None:
            os.close(disk_fd)
        self._set_state(rec, "incoming")
        threading.Thread(target=self._take_over, args=(rec, link, lsock), daemon=True,
                         name=f"incoming-{vm_id}").start()
        return {"id": vm_id, "port": lsock.getsockname()[1]}

    def _take_over(self, rec: VmRecord, link: CoreLink, lsock: socket.socket) -> None:
        try:
            lsock.settimeout(120)
            conn, _ = lsock.accept()
            with conn:
                link.attach(P.AttachKind.MIGRATION, 0, conn.fileno())
            self.progress[rec.id] = (0, 0)
            ticket = link.migrate_in()["ticket"]
            rec.generation = link.migrate_in(broker_advance(rec.broker, ticket))["generation"]
            self._set_state(rec, "configured")
            link.start()
            self._set_state(rec, "running")
        except (CoreRefused, OSError) as e:
            rec.stop_reason = f"migration failed: {e}"
            self._set_state(rec, "failed")
            self._finish(rec.id)
        finally:
            lsock.close()

    def migrate(self, vm_id: str, to: str, downtime_ms: int = 300) -> dict:
        """Send the VM to the target core listening at HOST:PORT.  Afterwards the VM is
        paused here until `migrate_finish` learns whether the target took over."""
        rec = self.get(vm_id)
        link = self.links.get(vm_id)
        if link is None or rec.state not in ("running", "paused"):
            raise WrongState(f"{vm_id} is {rec.state}; a migration needs a running VM")
        host, _, port = to.rpartition(":")
        try:
            conn = socket.create_connection((host, int(port)), timeout=30)
        except (OSError, ValueError) as e:
            raise CoreRefused(f"cannot reach the migration target at {to}: {e}") from None
        with conn:
            link.attach(P.AttachKind.MIGRATION, 0, conn.fileno())
        self.progress[vm_id] = (0, 0)
        t0 = time.perf_counter()
        out = link.migrate_out(downtime_ms=downtime_ms)
        self.pending_migrations[vm_id] = out["ticket"]
        self._set_state(rec, "migrated")
        import json
        return {**json.loads(out["report"]), "total_s": time.perf_counter() - t0}

    def migrate_finish(self, vm_id: str, taken_over: bool) -> VmRecord:
        """After a migration: the target took over (stop here), or it did not (resume here,
        if the owner's broker agrees this copy is still the newest; else stop)."""
        rec = self.get(vm_id)
        ticket = self.pending_migrations.pop(vm_id, None)
        if ticket is None:
            raise WrongState(f"{vm_id} has no migration waiting to be finished")
        if not taken_over:
            try:
                receipt = broker_advance(rec.broker, ticket)
                rec.generation = self.links[vm_id].migrate_out(receipt)["generation"]
                self._set_state(rec, "running")
                return rec
            except (CoreRefused, KeyError) as e:
                rec.stop_reason = f"cannot resume: {e}"
        rec.stop_reason = rec.stop_reason or "migrated away"
        return self.stop(vm_id)

    def _call(self, vm_id: str, method: str, need: tuple[str, ...], new_state: str) -> VmRecord:
        rec = self.get(vm_id)
        if rec.state not in need:
            raise WrongState(f"{vm_id} is {rec.state}; {method} needs {' or '.join(need)}")
        link = self.links.get(vm_id)
        if link is None:
            raise WrongState(f"{vm_id} has no core attached")
        getattr(link, method)()
        if rec.state not in ("stopped",):
            self._set_state(rec, new_state)
        return rec

    def start(self, vm_id): return self._call(vm_id, "start", ("configured",), "running")
    def pause(self, vm_id): return self._call(vm_id, "pause", ("running",), "paused")
    def resume(self, vm_id): return self._call(vm_id, "resume", ("paused",), "running")

    def stop(self, vm_id: str) -> VmRecord:
        rec = self.get(vm_id)
        if rec.state in ("stopped", "lost", "failed"):
            return rec
        if rec.state != "stopped":
            rec.stop_reason = rec.stop_reason or "stopped by request"
        self._set_state(rec, "stopped")
        self._finish(vm_id)
        return rec

    def delete(self, vm_id: str) -> None:
        self.stop(vm_id)
        with self._lock:
            self.records.pop(vm_id, None)
        self.store.delete(vm_id)

    def _on_stopped(self, vm_id: str, status: int, reason: str) -> None:
        rec = self.records.get(vm_id)
        if rec is None:
            return
        rec.exit_status = None if status < 0 else status
        rec.stop_reason = reason
        self._set_state(rec, "stopped")
        # Release the core: it stays up after its guest ends until told to go.
        threading.Thread(target=self._finish, args=(vm_id,), daemon=True).start()

    def _finish(self, vm_id: str) -> None:
        """Tell the core to go (it exits after answering STOP) and drop its link."""
        link = self.links.get(vm_id)
        if link is not None:
            try:
                link.stop()
            except (CoreRefused, OSError):
                pass
            link.wait_closed(5)
        self._release(vm_id)

    def _attach_net(self, vm_id: str, link: CoreLink, gateway: tuple[str, int],
                    direct: bool) -> None:
        """Give the core its network fd: our relay's socketpair end, or a connected UDP socket."""
        from ..wire.portal_ops import AttachKind
        from .netrelay import DirectLink, Relay
        try:
            relay = (DirectLink if direct else Relay)(gateway)
        except ValueError as e:
            raise CoreRefused(str(e)) from None
        try:
            link.attach(AttachKind.NET, 0, relay.core_end.fileno())
        except BaseException:
            relay.close()
            raise
        if direct:
            relay.close()            # the core has its own copy; nothing here moves datagrams
        else:
            self.relays[vm_id] = relay.start()

    def _release(self, vm_id: str) -> None:
        link = self.links.pop(vm_id, None)
        if link is not None:
            link.close()
        relay = self.relays.pop(vm_id, None)
        if relay is not None:
            relay.close()

    def _set_state(self, rec: VmRecord, state: str) -> None:
        rec.state = state
        self.store.save(rec)

    # ---- queries ---------------------------------------------------------
    def get(self, vm_id: str) -> VmRecord:
        rec = self.records.get(vm_id)
        if rec is None:
            raise UnknownVm(vm_id)
        return rec

    def list(self) -> list[VmRecord]:
        return sorted(self.records.values(), key=lambda r: r.created)

    def console(self, vm_id: str, offset: int = 0) -> bytes:
        self.get(vm_id)
        path = self.store.vm_dir(vm_id) / "console.log"
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                return f.read(CONSOLE_READ_MAX)
        except FileNotFoundError:
            return b""

    def console_input(self, vm_id: str, data: bytes) -> None:
        rec = self.get(vm_id)
        link = self.links.get(vm_id)
        if link is None or rec.state not in ("running", "paused"):
            raise WrongState(f"{vm_id} is {rec.state}")
        link.console_input(data)

    def logs(self, vm_id: str) -> str:
        rec = self.get(vm_id)
        path = self.store.vm_dir(vm_id) / "core.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.created))
        return f"{when} created {rec.id} pid={rec.pid} uid={rec.uid} state={rec.state}\n{text}"

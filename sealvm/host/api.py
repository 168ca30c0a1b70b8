"""The daemon's REST API (FastAPI), served on a Unix socket.

Every route is a thin call into `VmManager`; errors map to HTTP statuses with
a message that says whose fault it was (400 bad request, 404 unknown VM, 409
wrong state, 502 the core refused or failed).  The OpenAPI document is at
/openapi.json and docs/openapi.json.
"""
from __future__ import annotations

import asyncio

from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from .manager import CoreRefused, UnknownVm, VmManager, WrongState


class CreateVm(BaseModel):
    image: str = Field(description="path of the guest image (PVH ELF), or of the Linux kernel "
                       "with entry 'linux'; read by the daemon")
    initrd: str | None = Field(default=None, description="the Linux kernel's initramfs (entry "
                               "'linux'), read by the daemon")
    name: str | None = Field(default=None, description="VM id (a-z, 0-9, '-'); generated if absent")
    memory_mib: int = Field(default=256, ge=2, le=65536)
    vcpus: int = Field(default=1, ge=1, le=64)
    cmdline: str = Field(default="", max_length=3000)
    entry: str = Field(default="pvh", pattern="^(pvh|long|linux)$")
    rng: bool = True
    start: bool = Field(default=False, description="start the VM right after creating it")
    manifest: str | None = Field(default=None, description="the owner's signed manifest "
                                 "directory (manifest.json + manifest.json.sig): the core checks "
                                 "the guest against it and gets its keys from `broker`")
    owner_pub: str | None = Field(default=None, description="the owner's owner.pub.json (default: "
                                  "two levels above `manifest`)")
    broker: str = Field(default="http://127.0.0.1:8470", description="the owner's key broker")
    net: str | None = Field(default=None, max_length=300, description="GATEWAY_HOST:PORT: give "
                            "the guest a network card sealed into a tunnel to the owner's gateway "
                            "(the daemon relays the sealed datagrams; the key comes with the "
                            "manifest)")
    net_direct: bool = Field(default=False, description="with `net`: hand the core a UDP socket "
                             "connected to the gateway instead of relaying in the daemon")
    disk: str | None = Field(default=None, description="a sealed disk image (`sealvm disk "
                             "create`) the daemon opens and hands to the core as a virtio-blk "
                             "device; the daemon never holds its key")


class VmView(BaseModel):
    id: str
    image: str
    initrd: str = ""
    memory_mib: int
    vcpus: int
    cmdline: str
    entry: str
    rng: bool
    net: str = ""
    net_direct: bool = False
    disk: str = ""
    state: str
    pid: int
    uid: int
    exit_status: int | None
    stop_reason: str
    created: float
    broker: str = ""
    generation: int = 0


class SnapshotSpec(BaseModel):
    path: str | None = Field(default=None, description="where the daemon writes the sealed "
                             "snapshot (default: its state directory)")
    resume: bool = Field(default=True, description="resume the VM afterwards if it was running")


class IncomingSpec(BaseModel):
    name: str | None = Field(default=None, description="VM id here")
    manifest: str = Field(description="the owner's signed manifest directory")
    owner_pub: str | None = None
    broker: str = Field(default="http://127.0.0.1:8470", description="the owner's key broker")
    listen: str = Field(default="127.0.0.1", description="address the stream is taken on")
    disk: str | None = Field(default=None, description="the VM's sealed disk as this host "
                             "reaches it (shared storage)")
    net: str | None = Field(default=None, description="the owner's gateway HOST:PORT as this "
                            "host reaches it (a new tunnel session)")
    net_direct: bool = False


class MigrateSpec(BaseModel):
    to: str = Field(description="HOST:PORT of the target (from POST /v1/incoming there)")
    downtime_ms: int = Field(default=300, ge=10, le=60_000, description="the downtime "
                             "budget: pre-copy goes on until the rest fits in it")


class FinishSpec(BaseModel):
    taken_over: bool = Field(description="whether the target VM runs (then stop here)")


class RestoreSpec(BaseModel):
    snapshot: str = Field(description="the sealed snapshot file")
    name: str | None = Field(default=None, description="VM id for the restored VM")
    manifest: str = Field(description="the owner's signed manifest directory")
    owner_pub: str | None = None
    broker: str = Field(default="http://127.0.0.1:8470", description="the owner's key broker")
    start: bool = Field(default=True, description="run the restored VM right away")
    disk: str | None = Field(default=None, description="the VM's sealed disk image, when it "
                             "had one (the daemon opens it; the core checks it)")
    net: str | None = Field(default=None, description="the owner's gateway HOST:PORT, when the "
                            "VM had a network device (a new tunnel session)")
    net_direct: bool = False


def _errors(fn):
    try:
        return fn()
    except UnknownVm as e:
        raise HTTPException(404, str(e)) from None
    except WrongState as e:
        raise HTTPException(409, str(e)) from None
    except CoreRefused as e:
        raise HTTPException(502, str(e)) from None
    except ValueError as e:
        raise HTTPException(400, str(e)) from None


def build_app(manager: VmManager) -> FastAPI:
    app = FastAPI(title="sealvm host daemon", version="1",
                  description="Lifecycle of sealed VMs. The daemon manages VMs but never sees "
                              "inside them: it talks to each VM's core only through the portal.")

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True, "vms": len(manager.list())}

    @app.get("/v1/vms", response_model=list[VmView])
    def list_vms():
        return [r.public() for r in manager.list()]

    @app.post("/v1/vms", response_model=VmView, status_code=201)
    def create_vm(spec: CreateVm):
        def go():
            bundle = None
            if spec.manifest:
                from .oneshot import read_manifest_bundle
                bundle = read_manifest_bundle(spec.manifest, spec.owner_pub, spec.broker)
            rec = manager.create(spec.name, spec.image, spec.memory_mib, spec.vcpus, spec.cmdline,
                                 spec.entry, spec.rng, bundle, spec.broker if bundle else "",
                                 net=spec.net, net_direct=spec.net_direct, disk=spec.disk,
                                 initrd=spec.initrd)
            if spec.start:
                rec = manager.start(rec.id)
            return rec.public()
        return _errors(go)

    @app.post("/v1/vms/{vm_id}/snapshot")
    def snapshot_vm(vm_id: str, spec: SnapshotSpec = Body(default_factory=SnapshotSpec)) -> dict:
        """Seal the VM to a file (the daemon never holds the key); the owner's broker
        makes it the newest generation.  Progress: GET /v1/vms/{vm_id}/progress."""
        return _errors(lambda: manager.snapshot(vm_id, spec.path, spec.resume))

    @app.post("/v1/restore", response_model=VmView, status_code=201)
    def restore_vm(spec: RestoreSpec):
        """A new VM from a sealed snapshot; its core attests to the owner's broker, which
        releases the key only for the VM's newest snapshot."""
        def go():
            from .oneshot import read_manifest_bundle
            bundle = read_manifest_bundle(spec.manifest, spec.owner_pub, spec.broker)
            rec = manager.restore(spec.snapshot, spec.name, bundle, spec.broker, spec.disk,
                                  spec.net, spec.net_direct)
            if spec.start:
                rec = manager.start(rec.id)
            return rec.public()
        return _errors(go)

    @app.post("/v1/incoming", status_code=201)
    def incoming(spec: IncomingSpec) -> dict:
        """A core ready to take a migrating VM; {"id", "port"} for the source's stream."""
        def go():
            from .oneshot import read_manifest_bundle
            bundle = read_manifest_bundle(spec.manifest, spec.owner_pub, spec.broker)
            return manager.incoming(spec.name, bundle, spec.broker, spec.listen, spec.disk,
                                    spec.net, spec.net_direct)
        return _errors(go)

    @app.post("/v1/vms/{vm_id}/migrate")
    def migrate_vm(vm_id: str, spec: MigrateSpec) -> dict:
        """Stream the VM to a target core; the report: rounds, pages, bytes, stop phase."""
        return _errors(lambda: manager.migrate(vm_id, spec.to, spec.downtime_ms))

    @app.post("/v1/vms/{vm_id}/migrate/finish", response_model=VmView)
    def migrate_finish(vm_id: str, spec: FinishSpec):
        """Stop here once the target took over, or resume here if it never did."""
        return _errors(lambda: manager.migrate_finish(vm_id, spec.taken_over).public())

    @app.get("/v1/vms/{vm_id}/progress")
    def progress(vm_id: str) -> dict:
        """{"done", "total"} bytes of the snapshot or restore under way (or the last one),
        and the phases of the VM's restore in seconds once it is done."""
        done, total = manager.progress.get(vm_id, (0, 0))
        return {"done": done, "total": total, "restore": manager.timings.get(vm_id)}

    @app.get("/v1/vms/{vm_id}", response_model=VmView)
    def get_vm(vm_id: str):
        return _errors(lambda: manager.get(vm_id).public())

    for action in ("start", "pause", "resume", "stop"):
        def route(vm_id: str, _a=action):
            return _errors(lambda: getattr(manager, _a)(vm_id).public())
        app.post(f"/v1/vms/{{vm_id}}/{action}", response_model=VmView,
                 name=f"{action}_vm")(route)

    @app.delete("/v1/vms/{vm_id}", status_code=204)
    def delete_vm(vm_id: str):
        _errors(lambda: manager.delete(vm_id))

    @app.get("/v1/vms/{vm_id}/console")
    async def console(vm_id: str, offset: int = Query(0, ge=0), follow: bool = False):
        _errors(lambda: manager.get(vm_id))
        if not follow:
            return PlainTextResponse(_errors(lambda: manager.console(vm_id, offset)),
                                     media_type="application/octet-stream")

        async def stream():
            pos = offset
            while True:
                data = manager.console(vm_id, pos)
                if data:
                    pos += len(data)
                    yield data
                elif manager.get(vm_id).state in ("stopped", "lost", "failed"):
                    return
                else:
                    await asyncio.sleep(0.05)
        return StreamingResponse(stream(), media_type="application/octet-stream")

    @app.post("/v1/vms/{vm_id}/console", status_code=204)
    def console_input(vm_id: str, data: str = Body(..., media_type="text/plain", max_length=4096)):
        _errors(lambda: manager.console_input(vm_id, data.encode()))

    @app.get("/v1/vms/{vm_id}/logs", response_class=PlainTextResponse)
    def logs(vm_id: str):
        return _errors(lambda: manager.logs(vm_id))

    return app


def openapi_document() -> dict:
    """The API's OpenAPI document (docs/openapi.json is this, kept current by a test)."""
    return build_app(None).openapi()

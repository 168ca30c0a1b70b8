"""The owner's key broker: challenge, attestation, wrapped keys (docs/attestation.md).

    POST /v1/challenge {"vm": name}                          -> {"nonce": hex}
    POST /v1/attest    {"evidence": str, "signature": hex}   -> {"wrapped": hex, "salt": hex}
    POST /v1/generation {"ticket": str}                      -> {"receipt": str}

Generations (docs/snapshots.md): DIR/vms/NAME/generation holds the VM's newest
generation and the snapshot set that carries it.  A fresh boot moves it on by one.  A
restore gets keys only for exactly the newest snapshot, and moves it on once it has
loaded and checked it (a ticket, below), so a failed restore costs nothing.  A running
core that seals a snapshot asks, with a ticket MACed under its snapshot key, to make
that snapshot the newest.  A core whose generation is no longer the newest is fenced:
its tickets are refused, and no older snapshot is ever released again.

A nonce is 32 random bytes, good once and for 60 s, and used up by the first
attestation that names it, whatever the outcome.  The attestation is appraised in
the contract's order (nonce, AK signature, root, core measurement, core version,
owner, manifest: sealvm.owner.appraise) and on success the VM's keys.json is sealed
to the core's ephemeral key with `attest.wrap_keys`.  A refusal is HTTP 403
{"error": reason}; a fault on the owner's side is HTTP 500 {"error": "broker fault: ..."}.

Every challenge, release, refusal and fault is appended (and fsynced) as one JSON
line to DIR/broker.log before the answer is sent.  On start the broker reads it
back: challenges younger than 60 s stay open unless a line records their nonce as
used, so a restart neither forgets a live challenge nor reopens a spent one.

Test-only: SEALVM_TEST_MODE=1 SEALVM_BROKER_TEST_DISABLE=nonce_once,ak_sig,... turns
single defences off for paired security tests (DEFENCES lists them).  Without test
mode the list is ignored, loudly; an unknown name stops the broker from starting.
"""
from __future__ import annotations

import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ..wire import attest as A
from .appraise import Context, Refusal, appraise, parse
from .keys import OwnerError, load_sign_key, load_wrap_key, raw_public
from .manifest import load_manifest, load_vm_keys
from .policy import load_policy

DEFENCES = ("nonce_fresh", "nonce_once", "ak_sig", "root_trust", "root_sig", "require_tpm",
            "core_measurement", "core_version", "owner_key", "manifest", "generation")
GENERATION_FILE = "generation"
ENV_DISABLE = "SEALVM_BROKER_TEST_DISABLE"
ENV_TEST_MODE = "SEALVM_TEST_MODE"
NONCE_LIFETIME = 60.0
MAX_OUTSTANDING = 4096
MAX_BODY = 2 * A.MAX_EVIDENCE + (64 << 10)   # evidence travels as an escaped JSON string
LOG_FILE = "broker.log"
DEFAULT_PORT = 8470


class BrokerFault(Exception):
    """The broker or the owner's directory is at fault, not the requester."""


def test_switches(environ: Mapping[str, str]) -> frozenset[str]:
    """The defences a paired security test switched off; empty unless SEALVM_TEST_MODE=1."""
    raw = environ.get(ENV_DISABLE, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    if not names:
        return frozenset()
    if environ.get(ENV_TEST_MODE) != "1":
        sys.stderr.write(f"sealvm broker: IGNORING {ENV_DISABLE}={raw!r}: honoured only with "
                         f"{ENV_TEST_MODE}=1; every defence stays on\n")
        return frozenset()
    unknown = sorted(names - set(DEFENCES))
    if unknown:
        raise ValueError(f"{ENV_DISABLE} names unknown defences {unknown}; known: "
                         f"{', '.join(DEFENCES)}")
    sys.stderr.write("sealvm broker: INSECURE TEST MODE: these defences are DISABLED: "
                     f"{', '.join(sorted(names))}\n")
    return names


class ReleaseLog:
    """DIR/broker.log: one JSON object a line, appended and fsynced, 0600."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def records(self) -> list[dict]:
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue                       # a torn last line after a crash
            if isinstance(rec, dict):
                out.append(rec)
        return out


class NonceBook:
    """Issued and spent nonces; times come from `clock` (seconds, wall clock)."""

    def __init__(self, clock: Callable[[], float], disabled: frozenset[str]):
        self.clock, self.disabled = clock, disabled
        self.issued: dict[str, tuple[str, float]] = {}
        self.used: dict[str, float] = {}
        self._lock = threading.Lock()

    def restore(self, records: list[dict]) -> None:
        now = self.clock()
        for r in records:
            nonce, t = r.get("nonce"), r.get("time")
            if not isinstance(nonce, str) or not isinstance(t, (int, float)):
                continue
            if r.get("event") == "challenge" and now - t <= NONCE_LIFETIME \
                    and isinstance(r.get("vm"), str):
                self.issued.setdefault(nonce, (r["vm"], t))
            if r.get("nonce_consumed") is True:
                self.used[nonce] = t
        for nonce in self.used:
            self.issued.pop(nonce, None)

    def issue(self, vm: str) -> tuple[str, float]:
        with self._lock:
            now = self.clock()
            if "nonce_fresh" not in self.disabled:
                for n in [n for n, (_, t) in self.issued.items() if now - t > NONCE_LIFETIME]:
                    del self.issued[n]
            for n in [n for n, t in self.used.items() if now - t > 10 * NONCE_LIFETIME]:
                del self.used[n]
            if len(self.issued) >= MAX_OUTSTANDING:
                raise Refusal("too many outstanding challenges; try again in a minute")
            nonce = secrets.token_bytes(32).hex()
            self.issued[nonce] = (vm, now)
            return nonce, now

    def consume(self, nonce: str, vm: str) -> tuple[bool, str | None]:
        """(marked used now, the reason to refuse or None)."""
        with self._lock:
            now = self.clock()
            rec = self.issued.get(nonce)
            if rec is None:
                if nonce in self.used:
                    return False, "nonce already used"
                return False, "unknown nonce: not issued by this broker, or expired and forgotten"
            consumed = "nonce_once" not in self.disabled
            if consumed:
                del self.issued[nonce]
                self.used[nonce] = now
            issued_vm, t = rec
            if now - t > NONCE_LIFETIME and "nonce_fresh" not in self.disabled:
                return consumed, (f"nonce expired: issued {now - t:.0f} s ago, a nonce is good "
                                  f"for {NONCE_LIFETIME:.0f} s")
            if issued_vm != vm:
                return consumed, f"nonce was issued for VM {issued_vm!r}, not {vm!r}"
            return consumed, None


def _exact(body: Any, fields: tuple[str, ...]) -> dict:
    if not isinstance(body, dict) or set(body) != set(fields) or \
            not all(isinstance(body[f], str) for f in fields):
        raise Refusal(f"malformed request: expected a JSON object with exactly the string "
                      f"fields {list(fields)}")
    return body


class Broker:
    """The broker's state and its two operations, independent of HTTP."""

    def __init__(self, directory: str | Path, clock: Callable[[], float] = time.time,
                 environ: Mapping[str, str] = os.environ):
        self.dir = Path(directory)
        self.disabled = test_switches(environ)
        self.sign_pub = load_sign_key(self.dir).public_key()
        self.wrap_key = load_wrap_key(self.dir)
        self.wrap_pub = raw_public(self.wrap_key)
        load_policy(self.dir, self.sign_pub)          # refuse to start on a bad policy
        self.clock = clock
        self.log = ReleaseLog(self.dir / LOG_FILE)
        self.nonces = NonceBook(clock, self.disabled)
        self.nonces.restore(self.log.records())
        self._gen_lock = threading.Lock()

    # ---- generations ---------------------------------------------------------------------
    def generation(self, vm: str) -> dict:
        """{"generation": int, "set": hex or None}; generation 0 before the first release."""
        path = Path(self.dir) / "vms" / vm / GENERATION_FILE
        try:
            rec = json.loads(path.read_text())
            return {"generation": int(rec["generation"]), "set": rec.get("set")}
        except FileNotFoundError:
            return {"generation": 0, "set": None}
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise BrokerFault(f"owner configuration: {path}: {e}") from None

    def _set_generation(self, vm: str, generation: int, set_id: str | None) -> None:
        path = Path(self.dir) / "vms" / vm / GENERATION_FILE
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, json.dumps({"generation": generation, "set": set_id}).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _next_generation(self, vm: str, restore: dict | None) -> int:
        """Called under _gen_lock by a release: check a restore is of the newest snapshot,
        then move the generation on (the previous copy of the VM is fenced from here)."""
        cur = self.generation(vm)
        if restore is not None and "generation" not in self.disabled and (
                restore["generation"] != cur["generation"] or restore["set"] != cur["set"]):
            if restore["generation"] < cur["generation"]:
                raise Refusal(f"rollback: snapshot of generation {restore['generation']} is "
                              f"older than the newest, {cur['generation']}")
            raise Refusal(f"snapshot {restore['set']} of generation {restore['generation']} "
                          f"is not the newest one the owner knows (generation "
                          f"{cur['generation']}, snapshot {cur['set']})")
        if restore is not None:       # the restorer moves it on once it has loaded the
            return restore["generation"]    # snapshot (POST /v1/generation): no fencing yet
        self._set_generation(vm, cur["generation"] + 1, None)
        return cur["generation"] + 1

    def _migration_generation(self, vm: str, migrate: dict) -> int:
        """A migration target gets the keys only for the VM's newest generation (the copy
        it takes over); it moves the generation on once it has the whole VM (a ticket)."""
        cur = self.generation(vm)["generation"]
        if migrate["generation"] != cur and "generation" not in self.disabled:
            raise Refusal(f"stale migration: the source runs generation "
                          f"{migrate['generation']}, the newest is {cur}")
        return migrate["generation"]

    def advance(self, body: Any, peer: str) -> dict:
        """A running core made snapshot `set`: make it the newest generation, if the core
        is still the newest copy of its VM."""
        vm = "?"
        try:
            raw = _exact(body, ("ticket",))["ticket"].encode()
            try:
                vm = json.loads(json.loads(raw)["body"])["vm"]
                if not isinstance(vm, str) or not A.VM_NAME_RE.fullmatch(vm):
                    raise ValueError("vm is not a VM name")
                if self._manifest(vm) is None:
                    raise ValueError(f"unknown VM {vm!r}")
                keys = A.parse_vm_keys(load_vm_keys(self.dir, vm))
                ticket = A.check_ticket(keys["snapshot"], raw)
            except (ValueError, KeyError, TypeError, A.AttestError, OwnerError) as e:
                raise Refusal(f"malformed or forged ticket: {e}") from None
            with self._gen_lock:
                cur = self.generation(vm)["generation"]
                if ticket["from"] != cur and "generation" not in self.disabled:
                    raise Refusal(f"fenced: generation {ticket['from']} is not the newest "
                                  f"copy of {vm} (that is generation {cur})")
                self._set_generation(vm, ticket["to"], ticket["set"])
        except Refusal as r:
            self._record("refused", request="generation", vm=str(vm)[:64], peer=peer,
                         reason=r.reason)
            raise
        self._record("generation", vm=vm, generation=ticket["to"], set=ticket["set"], peer=peer)
        return {"receipt": A.advance_receipt(keys["snapshot"], ticket).decode()}

    def _record(self, event: str, **fields: Any) -> None:
        rec = {"time": self.clock(), "event": event, **fields}
        if self.disabled:
            rec["test_disabled"] = sorted(self.disabled)
        self.log.append(rec)

    def _manifest(self, vm: str) -> dict | None:
        try:
            return load_manifest(self.dir, vm, self.sign_pub)
        except OwnerError as e:
            if "no signed manifest" in str(e):
                return None
            raise BrokerFault(f"owner configuration: {e}") from None

    def challenge(self, body: Any, peer: str) -> dict:
        vm = "?"
        try:
            vm = _exact(body, ("vm",))["vm"]
            if not A.VM_NAME_RE.fullmatch(vm):
                raise Refusal("malformed request: vm is not a VM name (a-z, 0-9, '-')")
            if self._manifest(vm) is None:
                raise Refusal(f"unknown VM {vm!r}: no signed manifest in the owner's directory")
            nonce, _ = self.nonces.issue(vm)
        except Refusal as r:
            self._record("refused", request="challenge", vm=vm[:64], peer=peer, reason=r.reason)
            raise
        self._record("challenge", vm=vm, nonce=nonce, peer=peer)
        return {"nonce": nonce}

    def attest(self, body: Any, peer: str) -> dict:
        info: dict[str, Any] = {"request": "attest", "peer": peer, "nonce_consumed": False}
        try:
            req = _exact(body, ("evidence", "signature"))
            if len(req["evidence"]) > A.MAX_EVIDENCE:
                raise Refusal(f"malformed evidence: over {A.MAX_EVIDENCE} bytes")
            try:
                sig = A.check_hex(req["signature"], "signature", 64)
            except A.AttestError as e:
                raise Refusal(f"malformed request: {e}") from None
            data = req["evidence"].encode()
            ev = parse(data)
            info.update(vm=ev["vm"], nonce=ev["nonce"])
            info["nonce_consumed"], problem = self.nonces.consume(ev["nonce"], ev["vm"])
            if problem:
                raise Refusal(problem)
            try:
                policy = load_policy(self.dir, self.sign_pub)
            except OwnerError as e:
                raise BrokerFault(f"owner configuration: {e}") from None
            ctx = Context(policy, self._manifest(ev["vm"]), self.wrap_pub, self.disabled)
            findings = appraise(data, ev, sig, ctx)
            try:
                keys_json = load_vm_keys(self.dir, ev["vm"])
                restore = A.restore_values(ev["log"])
                migrate = A.migrate_in_values(ev["log"])
            except OwnerError as e:
                raise BrokerFault(f"owner configuration: {e}") from None
            except A.AttestError as e:
                raise Refusal(f"malformed evidence: {e}") from None
            with self._gen_lock:
                if migrate is not None:
                    info["generation"] = self._migration_generation(ev["vm"], migrate)
                else:
                    info["generation"] = self._next_generation(ev["vm"], restore)
            try:
                wrapped, salt = A.wrap_keys(A.release_payload(keys_json, info["generation"]),
                                            bytes.fromhex(ev["ephemeral_pub"]),
                                            bytes.fromhex(ev["nonce"]), self.wrap_key)
            except A.AttestError as e:
                raise Refusal(f"ephemeral_pub: {e}") from None
        except Refusal as r:
            self._record("refused", reason=r.reason, **info)
            raise
        except BrokerFault as f:
            self._record("fault", reason=str(f), **info)
            raise
        self._record("release", core_measurement=findings["core measurement"],
                     root=findings["root"], **info)
        return {"wrapped": wrapped.hex(), "salt": salt.hex()}


def create_app(directory: str | Path, clock: Callable[[], float] = time.time,
               environ: Mapping[str, str] = os.environ) -> FastAPI:
    """The broker as an ASGI app (FastAPI); serve it with uvicorn."""
    broker = Broker(directory, clock, environ)
    app = FastAPI(title="sealvm key broker", docs_url=None, redoc_url=None)
    app.state.broker = broker

    async def handle(request: Request, op: Callable[[Any, str], dict]) -> JSONResponse:
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        try:
            size = 0
            chunks = []
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    raise Refusal(f"malformed request: body over {MAX_BODY} bytes")
                chunks.append(chunk)
            try:
                body = json.loads(b"".join(chunks))
            except (ValueError, RecursionError):
                raise Refusal("malformed request: body is not JSON") from None
            return JSONResponse(await run_in_threadpool(op, body, peer))
        except Refusal as r:
            return JSONResponse({"error": r.reason}, status_code=403)
        except BrokerFault as f:
            return JSONResponse({"error": f"broker fault: {f}"}, status_code=500)
        except Exception as e:                   # an own bug: say so, record it, answer 500
            broker._record("fault", reason=f"internal error: {e!r}", peer=peer)
            return JSONResponse({"error": "broker fault: internal error (see broker.log)"},
                                status_code=500)

    @app.post("/v1/challenge")
    async def challenge(request: Request) -> JSONResponse:
        """Start an attestation for {"vm": name}: a fresh nonce, good once and for 60 s."""
        return await handle(request, broker.challenge)

    @app.post("/v1/attest")
    async def attest(request: Request) -> JSONResponse:
        """Appraise {"evidence", "signature"}; on success the VM's keys wrapped to the core."""
        return await handle(request, broker.attest)

    @app.post("/v1/generation")
    async def generation(request: Request) -> JSONResponse:
        """{"ticket"} from a running core: make its snapshot the VM's newest generation."""
        return await handle(request, broker.advance)

    return app


def serve(directory: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> int:
    """Run the broker in the foreground until interrupted."""
    import uvicorn
    app = create_app(directory)
    print(f"sealvm key broker: owner directory {directory}, listening on http://{host}:{port}, "
          f"log {Path(directory) / LOG_FILE}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0

"""`sealvm fleet agent`: one per host. Measures the host, answers challenges, and
challenges its neighbours (adjacent integrity measurement).

Every period the agent
1. measures its host (`measure.measure_host`), extends the measurement's digest into
   PCR 23 of the host's TPM and appends it to its event log (memory and
   STATE/events.jsonl);
2. asks the controller which neighbours it measures and their golden values,
   challenges each with a fresh nonce, appraises the evidence (`evidence.appraise`)
   and reports pass, fail or missing to the controller, signed with its key.

HTTP (FastAPI on --listen): POST /v1/challenge {"nonce": hex} -> evidence;
GET /v1/identity -> {"host", "agent_pub", "tpm_ak_pub"}; GET /v1/health.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path

import httpx

from .evidence import appraise, load_or_create_key, pub_hex, quote_data, sign
from .measure import measure_host, measurement_digest

log = logging.getLogger("sealvm.fleet.agent")


class Agent:
    def __init__(self, name: str, state_dir: Path, code_dir: Path, config: Path | None,
                 uid_range: tuple[int, int], tpm_addr: tuple[str, int], controller: str,
                 period: float = 1.0):
        from ..preboot.tpm import Tpm
        self.name, self.state_dir, self.code_dir, self.config = name, state_dir, code_dir, config
        self.uid_range, self.controller, self.period = uid_range, controller.rstrip("/"), period
        state_dir.mkdir(parents=True, exist_ok=True)
        self.key = load_or_create_key(state_dir / "agent.key")
        self.agent_pub = pub_hex(self.key)
        self.tpm = Tpm(*tpm_addr)
        self.tpm_lock = threading.Lock()
        with self.tpm_lock:
            self.tpm.reset_debug_pcr(23)            # a new log starts with a new PCR
            self.ak_pub = self.tpm.attestation_key()
        self.log: list[dict] = []
        self.events = open(state_dir / "events.jsonl", "a")
        self.counter = int(time.time() * 1000)     # report counter: only grows
        self.stop = threading.Event()
        identity = {"host": name, "agent_pub": self.agent_pub, "tpm_ak_pub": self.ak_pub.hex()}
        (state_dir / "identity.json").write_text(json.dumps(identity) + "\n")
        self.http = httpx.Client(timeout=max(0.5, period * 0.8))

    # -- own host ------------------------------------------------------------------------
    def measure_once(self) -> dict:
        m = measure_host(self.code_dir, self.config, self.uid_range)
        with self.tpm_lock:
            self.tpm.extend(23, measurement_digest(m))
            self.log.append(m)
        self.events.write(json.dumps(m, sort_keys=True) + "\n")
        self.events.flush()
        return m

    def evidence(self, nonce: bytes) -> dict:
        with self.tpm_lock:
            entries = list(self.log)
            root = self.tpm.tpm_root(quote_data(nonce, self.ak_pub, bytes.fromhex(self.agent_pub)))
        return sign(self.key, {"host": self.name, "nonce": nonce.hex(),
                               "agent_pub": self.agent_pub, "log": entries, "root": root})

    # -- neighbours ----------------------------------------------------------------------
    def check_neighbours(self) -> list[dict]:
        try:
            subjects = self.http.get(f"{self.controller}/v1/assignments/{self.name}").json()
        except (httpx.HTTPError, ValueError) as e:
            log.warning("controller unreachable: %s", e)
            return []
        out = []
        for golden in subjects.get("subjects", []):
            nonce = secrets.token_bytes(32)
            try:
                r = self.http.post(f"{golden['agent']}/v1/challenge", json={"nonce": nonce.hex()})
                r.raise_for_status()
                result = appraise(r.json(), nonce, golden, max_age=3 * self.period).as_dict()
            except (httpx.HTTPError, ValueError) as e:
                result = {"verdict": "missing", "reason": f"no evidence: {type(e).__name__}: {e}"}
            out.append(self.report(golden["name"], result))
        return out

    def report(self, subject: str, result: dict) -> dict:
        self.counter = max(self.counter + 1, int(time.time() * 1000))
        body = {"reporter": self.name, "subject": subject, "verdict": result["verdict"],
                "reason": result["reason"], "time": time.time(), "counter": self.counter}
        try:
            self.http.post(f"{self.controller}/v1/reports", json=sign(self.key, body))
        except httpx.HTTPError as e:
            log.warning("report to the controller failed: %s", e)
        return body

    # -- loops ---------------------------------------------------------------------------
    def _loop(self, fn) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            try:
                fn()
            except Exception:                       # noqa: BLE001 - keep measuring
                log.exception("%s failed", fn.__name__)
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at, delay = time.monotonic(), 0
            self.stop.wait(delay)

    def start(self) -> None:
        self.measure_once()
        for fn in (self.measure_once, self.check_neighbours):
            threading.Thread(target=self._loop, args=(fn,), daemon=True, name=fn.__name__).start()


def build_app(agent: Agent):
    from fastapi import Body, FastAPI, HTTPException
    app = FastAPI(title="sealvm fleet agent")

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True, "host": agent.name, "measurements": len(agent.log)}

    @app.get("/v1/identity")
    def identity() -> dict:
        return {"host": agent.name, "agent_pub": agent.agent_pub, "tpm_ak_pub": agent.ak_pub.hex()}

    @app.post("/v1/challenge")
    def challenge(req: dict = Body(...)) -> dict:
        try:
            nonce = bytes.fromhex(req["nonce"])
        except (KeyError, TypeError, ValueError):
            raise HTTPException(400, "nonce must be hex") from None
        if not 16 <= len(nonce) <= 64:
            raise HTTPException(400, "nonce must be 16 to 64 bytes")
        return agent.evidence(nonce)

    return app


def run_agent(args) -> int:
    import uvicorn
    from ..tools import swtpm
    logging.basicConfig(level=logging.INFO, format=f"agent {args.name} %(levelname)s %(message)s")
    state = Path(args.state_dir)
    lo, _, hi = args.uid_range.partition("-")
    if not (lo.isdigit() and hi.isdigit() and int(lo) <= int(hi)):
        print(f"sealvm fleet agent: --uid-range must look like 64000-64999, not {args.uid_range!r}",
              file=sys.stderr)
        return 2
    if not (Path(args.code_dir) / "sealvm").is_dir():
        print(f"sealvm fleet agent: --code-dir {args.code_dir} holds no sealvm/ tree",
              file=sys.stderr)
        return 2
    if args.tpm:
        host, _, port = args.tpm.rpartition(":")
        tpm_addr = (host or "127.0.0.1", int(port))
    else:
        try:
            port = swtpm.start_on_free_port(state / "tpm")
        except swtpm.SwtpmError as e:
            print(f"sealvm fleet agent: {e}", file=sys.stderr)
            return 125
        tpm_addr = ("127.0.0.1", port)
    agent = Agent(args.name, state, Path(args.code_dir).resolve(),
                  Path(args.config) if args.config else None, (int(lo), int(hi)), tpm_addr,
                  args.controller, args.period)
    agent.start()
    host, _, port = args.listen.rpartition(":")
    try:
        uvicorn.run(build_app(agent), host=host or "127.0.0.1", port=int(port), log_level="warning")
    finally:
        agent.stop.set()
        if not args.tpm:
            swtpm.stop(state / "tpm")
    return 0


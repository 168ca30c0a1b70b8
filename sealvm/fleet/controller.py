"""`sealvm fleet controller`: the integrity validation table and the evacuation policy.

The controller is the region's critical TCB. It alone writes verdicts. It keeps, in
SQLite (`--db`, default STATE/fleet.db):

* hosts: enrolment (agent URL, daemon socket, migration address, capacity, core uid
  range, agent key, TPM AK, golden values), verdict, its reason, who measured it,
  when, and the newest measurement a neighbour appraised;
* reports: every signed report a neighbour sent (accepted or refused, and why);
* vms: where each VM runs, its manifest and broker, its last sealed snapshot;
* decisions: every placement and evacuation with its reason and outcome.

Verdicts (evaluated every 0.2 s): a host is `failed` once an accepted report says
fail (it stays failed: its PCR log cannot forget); `trusted` while an accepted
report said pass within the window (3 periods); `missing` when none did;
`unmeasured` before the first report. Reports are accepted only from the
subject's assigned neighbours (ring, k per host), signed by the reporter's
enrolled agent key, with a counter above the last one, sent within the window,
and from a reporter that is not itself failed or missing.

When a host is failed or missing its VMs leave, highest priority first, at most
`parallel` at a time: to a trusted host with room, preferring hosts outside the
suspect's neighbourhood, then the least loaded. By live migration through the two
daemons' APIs when the suspect's cores are still sound (its code, config or agent
changed); by restore from the VM's last sealed snapshot when a core itself is
suspect (traced, or its code changed) or live migration fails; the owner's broker
then moves the VM's generation to the new copy, which fences the old one.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .evidence import signature_ok
from .testmode import test_disabled

log = logging.getLogger("sealvm.fleet.controller")

SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
  name TEXT PRIMARY KEY, agent TEXT, daemon TEXT, address TEXT, capacity_mib INTEGER,
  uid_lo INTEGER, uid_hi INTEGER, agent_pub TEXT, tpm_ak_pub TEXT, golden TEXT,
  verdict TEXT DEFAULT 'unmeasured', reason TEXT DEFAULT 'no report yet',
  measured_by TEXT DEFAULT '', measured_at REAL DEFAULT 0, verdict_at REAL DEFAULT 0,
  last_counter_json TEXT DEFAULT '{}', enrolled_at REAL);
CREATE TABLE IF NOT EXISTS reports (
  id INTEGER PRIMARY KEY, time REAL, reporter TEXT, subject TEXT, verdict TEXT,
  reason TEXT, accepted INTEGER, refusal TEXT);
CREATE TABLE IF NOT EXISTS vms (
  id TEXT PRIMARY KEY, host TEXT, image TEXT, manifest TEXT, broker TEXT, memory_mib INTEGER,
  cmdline TEXT, priority INTEGER, state TEXT, placed_at REAL, snapshot TEXT DEFAULT '',
  snapshot_at REAL DEFAULT 0, restored INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS reports_subject_time ON reports (subject, time);
CREATE TABLE IF NOT EXISTS decisions (
  id INTEGER PRIMARY KEY, time REAL, vm TEXT, source TEXT, target TEXT, how TEXT,
  reason TEXT, outcome TEXT DEFAULT 'pending', seconds REAL DEFAULT 0);
"""
CORE_SUSPECT = ("traced", "core differs", "outside the core uid range")


def daemon(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://sealvm",
                        timeout=120)


def clear_stale(d: httpx.Client, vm: str) -> None:
    """A stopped record of this VM left on a host it once ran on would block its return."""
    r = d.get(f"/v1/vms/{vm}")
    if r.status_code == 200 and r.json()["state"] != "running":
        d.delete(f"/v1/vms/{vm}")


class Controller:
    def __init__(self, config: dict, db_path: Path):
        self.cfg = config
        self.period = float(config.get("period", 1.0))
        self.window = float(config.get("window", 3 * self.period))
        self.k = int(config.get("k", 2))
        self.parallel = int(config.get("parallel", 2))
        self.snapshot_dir = Path(config.get("snapshot_dir", db_path.parent / "snapshots"))
        self.snapshot_every = float(config.get("snapshot_every", 30))
        self.db_lock = threading.RLock()
        self.db = sqlite3.connect(str(db_path), check_same_thread=False, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)
        now = time.time()
        for h in config["hosts"]:
            self.db.execute(
                "INSERT INTO hosts (name, agent, daemon, address, capacity_mib, uid_lo, uid_hi, "
                "agent_pub, tpm_ak_pub, golden, enrolled_at) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(name) DO UPDATE SET agent=excluded.agent, daemon=excluded.daemon, "
                "address=excluded.address, capacity_mib=excluded.capacity_mib",
                (h["name"], h["agent"], h["daemon"], h["address"], int(h.get("capacity_mib", 4096)),
                 h["uid_range"][0], h["uid_range"][1], h["agent_pub"], h["tpm_ak_pub"],
                 json.dumps(h["golden"], sort_keys=True), now))
        self.names = sorted(h["name"] for h in config["hosts"])
        self.in_flight: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.pool = ThreadPoolExecutor(max_workers=self.parallel)
        self.stop = threading.Event()
        self.metrics = Metrics()

    # -- table helpers -------------------------------------------------------------------
    def q(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self.db_lock:
            return self.db.execute(sql, args).fetchall()

    def x(self, sql: str, args=()) -> int:
        with self.db_lock:
            return self.db.execute(sql, args).lastrowid

    def host(self, name: str) -> sqlite3.Row | None:
        rows = self.q("SELECT * FROM hosts WHERE name=?", (name,))
        return rows[0] if rows else None

    def subjects_of(self, name: str) -> list[str]:
        """The ring: host i measures the next k hosts (k < number of hosts)."""
        if name not in self.names:
            return []
        i, n = self.names.index(name), len(self.names)
        return [self.names[(i + j) % n] for j in range(1, min(self.k, n - 1) + 1)]

    def measurers_of(self, name: str) -> list[str]:
        return [h for h in self.names if name in self.subjects_of(h)]

    def neighbourhood(self, name: str) -> set[str]:
        return set(self.subjects_of(name)) | set(self.measurers_of(name))

    def golden_record(self, name: str) -> dict:
        h = self.host(name)
        return {"name": name, "agent": h["agent"], "agent_pub": h["agent_pub"],
                "tpm_ak_pub": h["tpm_ak_pub"], "uid_range": [h["uid_lo"], h["uid_hi"]],
                "values": json.loads(h["golden"])}

    # -- reports -------------------------------------------------------------------------
    def receive_report(self, signed: dict) -> tuple[bool, str]:
        body = signed.get("body") if isinstance(signed, dict) else None
        if not isinstance(body, dict):
            return False, "not a signed report"
        reporter, subject = body.get("reporter"), body.get("subject")
        now = time.time()

        def record(ok: bool, why: str):
            self.x("INSERT INTO reports (time, reporter, subject, verdict, reason, accepted, "
                   "refusal) VALUES (?,?,?,?,?,?,?)",
                   (now, str(reporter), str(subject), str(body.get("verdict")),
                    str(body.get("reason"))[:2000], int(ok), why))
            self.metrics.report(str(body.get("verdict")), ok)
            return ok, why
        rep = self.host(str(reporter))
        if rep is None or self.host(str(subject)) is None:
            return record(False, "unknown reporter or subject")
        if subject not in self.subjects_of(reporter):
            return record(False, f"{reporter} is not assigned to measure {subject}")
        if not test_disabled("report-signature") and not signature_ok(signed, rep["agent_pub"]):
            return record(False, "signature: not signed by the reporter's enrolled agent key")
        if body.get("verdict") not in ("pass", "fail", "missing"):
            return record(False, "verdict must be pass, fail or missing")
        if not isinstance(body.get("time"), (int, float)) or abs(now - body["time"]) > self.window:
            return record(False, "report is not fresh")
        counters = json.loads(rep["last_counter_json"])
        if not isinstance(body.get("counter"), int) or body["counter"] <= counters.get(subject, 0):
            return record(False, "counter did not grow (replayed report)")
        if rep["verdict"] in ("failed", "missing"):
            return record(False, f"reporter {reporter} is itself {rep['verdict']}")
        counters[subject] = body["counter"]
        self.x("UPDATE hosts SET last_counter_json=? WHERE name=?", (json.dumps(counters), reporter))
        return record(True, "")

    # -- verdicts ------------------------------------------------------------------------
    def evaluate(self) -> None:
        now = time.time()
        for name in self.names:
            h = self.host(name)
            if h["verdict"] == "failed":
                continue
            rows = self.q("SELECT * FROM reports WHERE subject=? AND accepted=1 AND time>? "
                          "ORDER BY time DESC", (name, now - self.window))
            fails = [r for r in rows if r["verdict"] == "fail"]
            passes = [r for r in rows if r["verdict"] == "pass"]
            if fails:
                self.set_verdict(name, "failed", fails[0]["reason"], fails[0]["reporter"],
                                 fails[0]["time"])
            elif passes:
                self.set_verdict(name, "trusted", passes[0]["reason"], passes[0]["reporter"],
                                 passes[0]["time"])
            elif h["verdict"] != "unmeasured" or now - h["enrolled_at"] > 2 * self.window:
                last = rows[0]["reason"] if rows else "no accepted report"
                self.set_verdict(name, "missing", f"no pass within {self.window:.1f} s: {last}",
                                 rows[0]["reporter"] if rows else "", now)

    def set_verdict(self, name: str, verdict: str, reason: str, by: str, at: float) -> None:
        h = self.host(name)
        changed = h["verdict"] != verdict
        self.x("UPDATE hosts SET verdict=?, reason=?, measured_by=?, measured_at=?, "
               "verdict_at=CASE WHEN ? THEN ? ELSE verdict_at END WHERE name=?",
               (verdict, reason[:2000], by, at, changed, time.time(), name))
        if changed:
            log.warning("host %s: %s -> %s (%s, by %s)", name, h["verdict"], verdict, reason, by)

    def readmit(self, name: str) -> None:
        """An operator repaired the host and restarted its agent: measure it afresh."""
        self.x("UPDATE hosts SET verdict='unmeasured', reason='readmitted', verdict_at=?, "
               "enrolled_at=? WHERE name=?", (time.time(), time.time(), name))
        self.x("UPDATE reports SET accepted=0, refusal='before readmission' WHERE subject=?",
               (name,))
        self.decide("", "", name, "readmit", "operator readmitted the host", "done")

    def trusted(self, name: str) -> bool:
        h = self.host(name)
        return h is not None and h["verdict"] == "trusted"

    # -- placement -----------------------------------------------------------------------
    def load(self, name: str) -> int:
        return self.q("SELECT COALESCE(SUM(memory_mib),0) AS m FROM vms WHERE host=?",
                      (name,))[0]["m"]

    def choose(self, memory_mib: int, avoid: str | None) -> tuple[str | None, str]:
        near = self.neighbourhood(avoid) if avoid else set()
        options = []
        for name in self.names:
            h = self.host(name)
            if name == avoid or h["verdict"] != "trusted":
                continue
            used = self.load(name)
            if used + memory_mib > h["capacity_mib"]:
                continue
            options.append((name in near, used / h["capacity_mib"], name, used, h["capacity_mib"]))
        if not options:
            return None, "no trusted host has room"
        options.sort()
        near_, _, name, used, cap = options[0]
        where = "in the suspect's neighbourhood (no trusted host with room outside it)" if near_ \
            else ("outside the suspect's neighbourhood" if avoid else "")
        return name, f"{name}: trusted, {used}/{cap} MiB used, least loaded {where}".strip()

    def place(self, spec: dict) -> dict:
        name, why = self.choose(int(spec.get("memory_mib", 256)), None)
        if name is None:
            raise RuntimeError(why)
        h = self.host(name)
        with daemon(h["daemon"]) as d:
            r = d.post("/v1/vms", json=dict(
                image=spec["image"], name=spec["name"], memory_mib=int(spec.get("memory_mib", 256)),
                cmdline=spec.get("cmdline", ""), start=True, manifest=spec["manifest"],
                broker=spec["broker"]))
        if r.status_code != 201:
            raise RuntimeError(f"daemon on {name} refused: {r.text}")
        self.x("INSERT OR REPLACE INTO vms (id, host, image, manifest, broker, memory_mib, "
               "cmdline, priority, state, placed_at, snapshot_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
               (spec["name"], name, spec["image"], spec["manifest"], spec["broker"],
                int(spec.get("memory_mib", 256)), spec.get("cmdline", ""),
                int(spec.get("priority", 0)), "running", time.time(), 0))
        self.decide(spec["name"], "", name, "place", why, "done")
        return {"vm": spec["name"], "host": name, "reason": why}

    def decide(self, vm: str, source: str, target: str, how: str, reason: str,
               outcome: str = "pending", seconds: float = 0) -> int:
        return self.x("INSERT INTO decisions (time, vm, source, target, how, reason, outcome, "
                      "seconds) VALUES (?,?,?,?,?,?,?,?)",
                      (time.time(), vm, source, target, how, reason, outcome, seconds))

    # -- evacuation ----------------------------------------------------------------------
    def evacuate_suspects(self) -> None:
        for name in self.names:
            h = self.host(name)
            if h["verdict"] not in ("failed", "missing"):
                continue
            vms = self.q("SELECT * FROM vms WHERE host=? ORDER BY priority DESC, id", (name,))
            for vm in vms:
                if vm["id"] in self.in_flight or len(self.in_flight) >= self.parallel \
                        or time.monotonic() < self.retry_at.get(vm["id"], 0):
                    continue
                core_suspect = h["verdict"] == "failed" and any(
                    s in (h["reason"] or "") for s in CORE_SUSPECT)
                target, why = self.choose(vm["memory_mib"], name)
                if target is None:
                    last = self.q("SELECT reason FROM decisions WHERE vm=? ORDER BY id DESC "
                                  "LIMIT 1", (vm["id"],))
                    if not last or not last[0]["reason"].startswith("stay"):
                        self.decide(vm["id"], name, "", "none", f"stay: {why}", "waiting")
                    continue
                self.in_flight.add(vm["id"])
                reason = f"{name} {h['verdict']} ({h['reason']}); target {why}"
                self.pool.submit(self._evacuate, dict(vm), name, target, core_suspect, reason)

    def _evacuate(self, vm: dict, source: str, target: str, core_suspect: bool,
                  reason: str) -> None:
        t0 = time.monotonic()
        try:
            if core_suspect:
                how, why = "snapshot", "a core on the source is suspect: its state is not taken"
            else:
                how, why = "live", "the source's cores are sound"
            did = self.decide(vm["id"], source, target, how, f"{reason}; {why}")
            ok, detail = (self._live(vm, source, target) if how == "live"
                          else (False, "skipped"))
            if not ok and how == "live":
                self.x("UPDATE decisions SET outcome=? WHERE id=?",
                       (f"failed: {detail}"[:2000], did))
                how = "snapshot"
                did = self.decide(vm["id"], source, target, how,
                                  f"{reason}; live migration failed ({detail})")
            if how == "snapshot":
                ok, detail = self._restore(vm, source, target)
            secs = time.monotonic() - t0
            self.x("UPDATE decisions SET outcome=?, seconds=? WHERE id=?",
                   ("done" if ok else f"failed: {detail}"[:2000], secs, did))
            self.metrics.evacuation(how, ok, secs)
            self.retry_at[vm["id"]] = 0 if ok else time.monotonic() + 2 * self.period
            if ok:
                self.x("UPDATE vms SET host=?, state='running', placed_at=?, restored=? "
                       "WHERE id=?", (target, time.time(), int(how == "snapshot"), vm["id"]))
                # The move advanced the VM's generation: its last snapshot is spent.
                self.x("UPDATE vms SET snapshot='' WHERE id=?", (vm["id"],))
            log.warning("vm %s: %s %s -> %s %s (%s)", vm["id"], how, source, target,
                        "done" if ok else "FAILED", detail)
        except Exception:                               # noqa: BLE001
            log.exception("evacuating %s", vm["id"])
        finally:
            self.in_flight.discard(vm["id"])

    def _live(self, vm: dict, source: str, target: str) -> tuple[bool, str]:
        s, t = self.host(source), self.host(target)
        try:
            with daemon(t["daemon"]) as td, daemon(s["daemon"]) as sd:
                clear_stale(td, vm["id"])
                r = td.post("/v1/incoming", json=dict(name=vm["id"], manifest=vm["manifest"],
                                                      broker=vm["broker"], listen=t["address"]))
                if r.status_code != 201:
                    return False, f"target refused incoming: {r.text}"
                m = sd.post(f"/v1/vms/{vm['id']}/migrate",
                            json={"to": f"{t['address']}:{r.json()['port']}"})
                state, deadline = "incoming", time.monotonic() + 60
                while state in ("incoming", "configured") and time.monotonic() < deadline:
                    time.sleep(0.05)
                    state = td.get(f"/v1/vms/{vm['id']}").json()["state"]
                if m.status_code == 200:
                    sd.post(f"/v1/vms/{vm['id']}/migrate/finish",
                            json={"taken_over": state == "running"})
                if state != "running":
                    td.delete(f"/v1/vms/{vm['id']}")
                    return False, f"target ended {state}: {m.text[:300]}"
                sd.delete(f"/v1/vms/{vm['id']}")        # the stopped old copy's record
                return True, f"live migration: {m.text[:300]}"
        except (httpx.HTTPError, OSError, KeyError, ValueError) as e:
            return False, f"{type(e).__name__}: {e}"

    def _restore(self, vm: dict, source: str, target: str) -> tuple[bool, str]:
        row = self.q("SELECT snapshot FROM vms WHERE id=?", (vm["id"],))[0]
        if not row["snapshot"]:
            return False, "no sealed snapshot of this VM"
        t, s = self.host(target), self.host(source)
        try:
            with daemon(t["daemon"]) as td:
                clear_stale(td, vm["id"])
                r = td.post("/v1/restore", json=dict(snapshot=row["snapshot"], name=vm["id"],
                                                     manifest=vm["manifest"], broker=vm["broker"],
                                                     start=True))
            if r.status_code != 201:
                return False, f"restore refused: {r.text[:500]}"
        except (httpx.HTTPError, OSError) as e:
            return False, f"{type(e).__name__}: {e}"
        try:                                  # the broker has fenced it; stop it if we can
            with daemon(s["daemon"]) as sd:
                sd.delete(f"/v1/vms/{vm['id']}", timeout=5)
        except (httpx.HTTPError, OSError):
            pass
        return True, f"restored from {row['snapshot']}"

    # -- sealed snapshots ----------------------------------------------------------------
    def snapshot_due(self) -> None:
        now = time.time()
        for vm in self.q("SELECT * FROM vms"):
            if vm["id"] in self.in_flight or not self.trusted(vm["host"]):
                continue
            if vm["restored"]:
                # A core rebuilt from a snapshot is killed by its sandbox when it seals
                # again (docs/fleet.md, limits): keep the snapshot it came from.
                continue
            due = vm["snapshot_at"] + self.snapshot_every if vm["snapshot"] \
                else vm["placed_at"] + min(2.0, self.snapshot_every)
            if now < due:
                continue
            path = self.snapshot_dir / f"{vm['id']}-{int(now * 1000)}.sealed"
            try:
                with daemon(self.host(vm["host"])["daemon"]) as d:
                    r = d.post(f"/v1/vms/{vm['id']}/snapshot",
                               json={"path": str(path), "resume": True})
                if r.status_code == 200:
                    old = vm["snapshot"]
                    self.x("UPDATE vms SET snapshot=?, snapshot_at=? WHERE id=?",
                           (str(path), now, vm["id"]))
                    if old and old != str(path):
                        Path(old).unlink(missing_ok=True)
                else:
                    log.warning("snapshot of %s refused: %s", vm["id"], r.text[:300])
                    self.x("UPDATE vms SET snapshot_at=? WHERE id=?", (now, vm["id"]))
            except (httpx.HTTPError, OSError) as e:
                log.warning("snapshot of %s: %s", vm["id"], e)

    # -- loops ---------------------------------------------------------------------------
    def run_loops(self) -> None:
        def policy():
            while not self.stop.wait(0.2):
                try:
                    self.evaluate()
                    self.evacuate_suspects()
                    self.metrics.update(self)
                except Exception:                   # noqa: BLE001
                    log.exception("policy loop")

        def snapshots():
            while not self.stop.wait(0.5):
                try:
                    self.snapshot_due()
                except Exception:                   # noqa: BLE001
                    log.exception("snapshot loop")
        threading.Thread(target=policy, daemon=True, name="policy").start()
        if self.snapshot_every > 0:
            threading.Thread(target=snapshots, daemon=True, name="snapshots").start()

    def table(self) -> dict:
        hosts = []
        for h in self.q("SELECT * FROM hosts ORDER BY name"):
            vms = [v["id"] for v in self.q("SELECT id FROM vms WHERE host=? ORDER BY id",
                                           (h["name"],))]
            hosts.append({"name": h["name"], "verdict": h["verdict"], "reason": h["reason"],
                          "measured_by": h["measured_by"], "measured_at": h["measured_at"],
                          "verdict_at": h["verdict_at"], "capacity_mib": h["capacity_mib"],
                          "used_mib": self.load(h["name"]), "vms": vms,
                          "golden": json.loads(h["golden"]),
                          "neighbours": self.subjects_of(h["name"])})
        decisions = [dict(r) for r in self.q("SELECT * FROM decisions ORDER BY id")]
        vms = [dict(r) for r in self.q("SELECT * FROM vms ORDER BY id")]
        return {"hosts": hosts, "vms": vms, "decisions": decisions}


class Metrics:
    """Prometheus metrics of the controller (GET /metrics)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry()
        self.trusted = Gauge("sealvm_fleet_host_trusted", "1 if the host's verdict is trusted",
                             ["host"], registry=self.registry)
        self.verdict = Gauge("sealvm_fleet_host_verdict", "1 for the host's current verdict",
                             ["host", "verdict"], registry=self.registry)
        self.vms = Gauge("sealvm_fleet_host_vms", "VMs placed on the host", ["host"],
                         registry=self.registry)
        self.reports = Counter("sealvm_fleet_reports_total", "neighbour reports received",
                               ["verdict", "accepted"], registry=self.registry)
        self.evacuations = Counter("sealvm_fleet_evacuations_total", "VMs moved off a suspect",
                                   ["how", "outcome"], registry=self.registry)
        self.seconds = Histogram("sealvm_fleet_evacuation_seconds", "time to move one VM",
                                 ["how"], registry=self.registry,
                                 buckets=(0.5, 1, 2, 5, 10, 20, 60))

    def report(self, verdict: str, accepted: bool) -> None:
        self.reports.labels(verdict if verdict in ("pass", "fail", "missing") else "other",
                            "yes" if accepted else "no").inc()

    def evacuation(self, how: str, ok: bool, secs: float) -> None:
        self.evacuations.labels(how, "done" if ok else "failed").inc()
        self.seconds.labels(how).observe(secs)

    def update(self, c: Controller) -> None:
        for h in c.q("SELECT name, verdict FROM hosts"):
            self.trusted.labels(h["name"]).set(1 if h["verdict"] == "trusted" else 0)
            for v in ("trusted", "failed", "missing", "unmeasured"):
                self.verdict.labels(h["name"], v).set(1 if h["verdict"] == v else 0)
            self.vms.labels(h["name"]).set(len(c.q("SELECT id FROM vms WHERE host=?",
                                                   (h["name"],))))

    def text(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


def build_app(c: Controller):
    from fastapi import Body, FastAPI, HTTPException
    from fastapi.responses import Response
    app = FastAPI(title="sealvm fleet controller")

    @app.get("/v1/health")
    def health() -> dict:
        return {"ok": True}

    @app.get("/v1/assignments/{host}")
    def assignments(host: str) -> dict:
        if c.host(host) is None:
            raise HTTPException(404, f"unknown host {host}")
        return {"period": c.period, "subjects": [c.golden_record(s) for s in c.subjects_of(host)]}

    @app.post("/v1/reports")
    def report(signed: dict = Body(...)) -> dict:
        ok, why = c.receive_report(signed)
        if not ok:
            raise HTTPException(403, why)
        return {"accepted": True}

    @app.post("/v1/hosts/{host}/readmit")
    def readmit(host: str) -> dict:
        if c.host(host) is None:
            raise HTTPException(404, f"unknown host {host}")
        c.readmit(host)
        return {"host": host, "verdict": "unmeasured"}

    @app.get("/v1/table")
    def table() -> dict:
        return c.table()

    @app.post("/v1/vms", status_code=201)
    def place(spec: dict = Body(...)) -> dict:
        for k in ("name", "image", "manifest", "broker"):
            if not isinstance(spec.get(k), str):
                raise HTTPException(400, f"{k} is required")
        try:
            return c.place(spec)
        except RuntimeError as e:
            raise HTTPException(409, str(e)) from None

    @app.get("/metrics")
    def metrics() -> Response:
        c.metrics.update(c)
        return Response(c.metrics.text(), media_type="text/plain; version=0.0.4")

    return app


def run_controller(args) -> int:
    import uvicorn
    logging.basicConfig(level=logging.INFO, format="controller %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        config = json.loads(Path(args.config).read_text())
        for h in config["hosts"]:
            for k in ("name", "agent", "daemon", "address", "uid_range", "agent_pub",
                      "tpm_ak_pub", "golden"):
                if k not in h:
                    raise ValueError(f"host {h.get('name', '?')} has no {k!r}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"sealvm fleet controller: bad --config {args.config}: {e}", file=sys.stderr)
        return 2
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    c = Controller(config, Path(args.db) if args.db else state / "fleet.db")
    c.run_loops()
    host, _, port = args.listen.rpartition(":")
    try:
        uvicorn.run(build_app(c), host=host or "127.0.0.1", port=int(port), log_level="warning")
    finally:
        c.stop.set()
    return 0

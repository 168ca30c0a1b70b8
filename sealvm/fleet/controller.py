"""`sealvm fleet controller`: the integrity validation table and the evacuation policy.

The controller is the region's critical TCB. It alone writes verdicts. It keeps its
table in a store (store.py: SQLite, `--db`, default STATE/fleet.db; or an etcd cluster,
`--store etcd://...`, shared by several controllers of which one leads):

* hosts/NAME: enrolment (agent URL, daemon socket, migration address, capacity, core
  uid range, agent key, TPM AK, golden values), verdict, its reason, who measured it
  and when;
* evidence/REPORTER/SUBJECT: the newest signed report REPORTER made about SUBJECT
  (and the newest failure it reported within the window);
* vms/ID: where each VM runs, its manifest and broker, its last sealed snapshot, and
  the claim of the controller moving it;
* decisions/N: every placement and evacuation with its reason and outcome.

Several controllers may serve one table: any of them takes reports, but only the
leader (a lease in the store) evaluates verdicts, places, snapshots and evacuates.  A
controller claims a VM before moving it by compare-and-swap on the VM's document, so
two controllers never move the same VM; a new leader first settles the claims of the
one before it (asking where the VM runs now), then goes on.

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
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from .evidence import signature_ok
from .store import Conflict, StoreError, open_store
from .testmode import test_disabled

log = logging.getLogger("sealvm.fleet.controller")

CORE_SUSPECT = ("traced", "core differs", "outside the core uid range")
LEADERSHIP = "controller"


def daemon(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://sealvm",
                        timeout=120)


def clear_stale(d: httpx.Client, vm: str) -> None:
    """A stopped record of this VM left on a host it once ran on would block its return."""
    r = d.get(f"/v1/vms/{vm}")
    if r.status_code == 200 and r.json()["state"] != "running":
        d.delete(f"/v1/vms/{vm}")


class DaemonMover:
    """What the controller asks of hosts, through their daemons' APIs."""

    def place(self, h: dict, spec: dict) -> tuple[bool, str]:
        with daemon(h["daemon"]) as d:
            r = d.post("/v1/vms", json=dict(
                image=spec["image"], name=spec["name"], memory_mib=int(spec.get("memory_mib", 256)),
                cmdline=spec.get("cmdline", ""), start=True, manifest=spec["manifest"],
                broker=spec["broker"]))
        return r.status_code == 201, r.text

    def live(self, vm: dict, s: dict, t: dict) -> tuple[bool, str]:
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

    def restore(self, vm: dict, s: dict, t: dict) -> tuple[bool, str]:
        if not vm["snapshot"]:
            return False, "no sealed snapshot of this VM"
        try:
            with daemon(t["daemon"]) as td:
                clear_stale(td, vm["id"])
                r = td.post("/v1/restore", json=dict(snapshot=vm["snapshot"], name=vm["id"],
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
        return True, f"restored from {vm['snapshot']}"

    def snapshot(self, vm: dict, h: dict, path: str) -> tuple[bool, str]:
        try:
            with daemon(h["daemon"]) as d:
                r = d.post(f"/v1/vms/{vm['id']}/snapshot", json={"path": path, "resume": True})
            return r.status_code == 200, r.text[:300]
        except (httpx.HTTPError, OSError) as e:
            return False, str(e)

    def running_on(self, vm: str, h: dict) -> bool:
        try:
            with daemon(h["daemon"]) as d:
                r = d.get(f"/v1/vms/{vm}", timeout=10)
            return r.status_code == 200 and r.json()["state"] == "running"
        except (httpx.HTTPError, OSError, ValueError):
            return False


class Chooser:
    """Targets for VMs leaving `avoid`, best first: trusted hosts with room, outside the
    suspect's neighbourhood first, then the least loaded (ties by name).  One heap for a
    suspect's VMs, so a decision costs one pass over the fleet, not one per VM."""

    def __init__(self, c: "Controller", avoid: str | None, used: dict[str, int]):
        import heapq
        self.heapq, self.used, self.c = heapq, used, c
        near = c.neighbourhood(avoid) if avoid else set()
        self.avoid = avoid
        self.heap = []
        for name, (h, _) in c.hosts.items():
            if name == avoid or h["verdict"] != "trusted" or name not in c.ring:
                continue
            cap = h["capacity_mib"]
            self.heap.append((name in near, used.get(name, 0) / cap, name, cap))
        heapq.heapify(self.heap)

    def take(self, memory_mib: int, commit: bool = True) -> tuple[str | None, str]:
        skipped, found = [], None
        while self.heap:
            near, ratio, name, cap = self.heapq.heappop(self.heap)
            u = self.used.get(name, 0)
            if abs(u / cap - ratio) > 1e-12:               # its load changed: re-queue
                self.heapq.heappush(self.heap, (near, u / cap, name, cap))
                continue
            if u + memory_mib > cap:
                skipped.append((near, ratio, name, cap))
                continue
            found = (near, ratio, name, cap)
            break
        for x in skipped:
            self.heapq.heappush(self.heap, x)
        if found is None:
            return None, "no trusted host has room"
        near, _, name, cap = found
        self.heapq.heappush(self.heap, found)
        u = self.used.get(name, 0)
        if commit:
            self.commit(name, memory_mib)
        where = "in the suspect's neighbourhood (no trusted host with room outside it)" if near \
            else ("outside the suspect's neighbourhood" if self.avoid else "")
        return name, f"{name}: trusted, {u}/{cap} MiB used, least loaded {where}".strip()

    def commit(self, name: str, memory_mib: int) -> None:
        self.used[name] = self.used.get(name, 0) + memory_mib


class Controller:
    def __init__(self, config: dict, store, mover=None, me: str | None = None):
        self.cfg = config
        self.store = store
        self.mover = mover or DaemonMover()
        self.me = me or f"controller-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.period = float(config.get("period", 1.0))
        self.window = float(config.get("window", 3 * self.period))
        self.k = int(config.get("k", 2))
        self.parallel = int(config.get("parallel", 2))
        self.lease = float(config.get("lease", 2.0))
        self.scan_every = float(config.get("scan_every", 0.2))
        self.snapshot_dir = Path(config.get("snapshot_dir", "/var/lib/sealvm-fleet/snapshots"))
        self.snapshot_every = float(config.get("snapshot_every", 30))
        self.names = sorted(h["name"] for h in config["hosts"])
        self.ring = {n: i for i, n in enumerate(self.names)}
        self.hosts: dict[str, tuple[dict, int]] = {}
        self.vms: dict[str, tuple[dict, int]] = {}
        self.checked: dict[str, tuple[int, str | None]] = {}   # evidence key -> (rev, refusal)
        self.in_flight: set[str] = set()
        self.retry_at: dict[str, float] = {}
        self.leading = False
        self.took_over_at = 0.0
        self.dirty: set[str] = set()       # subjects with news this controller received
        self.full_scan_every = float(config.get("full_scan_every", self.period))
        self.scanned_at = 0.0
        self.pool = ThreadPoolExecutor(max_workers=self.parallel)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.metrics = Metrics()
        self._enrol(config["hosts"])

    def _enrol(self, hosts: list[dict]) -> None:
        have = {k.split("/", 1)[1]: (d, r) for k, d, r in self.store.range("hosts/")}
        now = time.time()
        for h in hosts:
            fresh = {"agent": h["agent"], "daemon": h["daemon"], "address": h["address"],
                     "capacity_mib": int(h.get("capacity_mib", 4096))}
            old = have.get(h["name"])
            if old and all(old[0].get(k) == v for k, v in fresh.items()):
                self.hosts[h["name"]] = old
                continue
            doc = {**(old[0] if old else {
                "name": h["name"], "uid_lo": h["uid_range"][0], "uid_hi": h["uid_range"][1],
                "agent_pub": h["agent_pub"], "tpm_ak_pub": h["tpm_ak_pub"],
                "golden": h["golden"], "verdict": "unmeasured", "reason": "no report yet",
                "measured_by": "", "measured_at": 0, "verdict_at": 0, "enrolled_at": now}),
                **fresh}
            try:
                rev = self.store.put(f"hosts/{h['name']}", doc, expect=old[1] if old else 0)
                self.hosts[h["name"]] = (doc, rev)
            except Conflict:                          # another controller enrolled it first
                self.hosts[h["name"]] = self.store.get(f"hosts/{h['name']}")

    # -- table helpers -------------------------------------------------------------------
    def host(self, name: str) -> dict | None:
        if name not in self.ring:
            return None
        got = self.hosts.get(name)
        return got[0] if got else None

    def refresh(self) -> None:
        self.hosts = {k.split("/", 1)[1]: (d, r) for k, d, r in self.store.range("hosts/")}
        self.vms = {k.split("/", 1)[1]: (d, r) for k, d, r in self.store.range("vms/")}

    def subjects_of(self, name: str) -> list[str]:
        """The ring: host i measures the next k hosts (k < number of hosts)."""
        if name not in self.ring:
            return []
        i, n = self.ring[name], len(self.names)
        return [self.names[(i + j) % n] for j in range(1, min(self.k, n - 1) + 1)]

    def measurers_of(self, name: str) -> list[str]:
        if name not in self.ring:
            return []
        i, n = self.ring[name], len(self.names)
        return [self.names[(i - j) % n] for j in range(1, min(self.k, n - 1) + 1)]

    def neighbourhood(self, name: str) -> set[str]:
        return set(self.subjects_of(name)) | set(self.measurers_of(name))

    def golden_record(self, name: str) -> dict:
        h = self.host(name)
        return {"name": name, "agent": h["agent"], "agent_pub": h["agent_pub"],
                "tpm_ak_pub": h["tpm_ak_pub"], "uid_range": [h["uid_lo"], h["uid_hi"]],
                "values": h["golden"]}

    def decide(self, vm: str, source: str, target: str, how: str, reason: str,
               outcome: str = "pending", seconds: float = 0) -> str:
        key = f"decisions/{time.time_ns():020d}-{uuid.uuid4().hex[:6]}"
        self.store.put(key, {"id": key.split("/")[1], "time": time.time(), "vm": vm,
                             "source": source, "target": target, "how": how,
                             "reason": reason[:2000], "outcome": outcome, "seconds": seconds,
                             "by": self.me})
        return key

    def settle(self, key: str, outcome: str, seconds: float) -> None:
        doc, rev = self.store.get(key)
        if doc:
            self.store.put(key, {**doc, "outcome": outcome[:2000], "seconds": seconds})

    # -- reports -------------------------------------------------------------------------
    def check_report(self, signed, now: float, stored: dict | None) -> tuple[str, str, str]:
        """(reporter, subject, refusal or ""): every check a report must pass."""
        body = signed.get("body") if isinstance(signed, dict) else None
        if not isinstance(body, dict):
            return "", "", "not a signed report"
        reporter, subject = str(body.get("reporter")), str(body.get("subject"))
        rep = self.host(reporter)
        if rep is None or self.host(subject) is None:
            return reporter, subject, "unknown reporter or subject"
        if subject not in self.subjects_of(reporter):
            return reporter, subject, f"{reporter} is not assigned to measure {subject}"
        if not test_disabled("report-signature") and not signature_ok(signed, rep["agent_pub"]):
            return reporter, subject, "signature: not signed by the reporter's enrolled agent key"
        if body.get("verdict") not in ("pass", "fail", "missing"):
            return reporter, subject, "verdict must be pass, fail or missing"
        if not isinstance(body.get("time"), (int, float)) or abs(now - body["time"]) > self.window:
            return reporter, subject, "report is not fresh"
        last = stored["signed"]["body"].get("counter", 0) if stored else 0
        if not isinstance(body.get("counter"), int) or body["counter"] <= last:
            return reporter, subject, "counter did not grow (replayed report)"
        if rep["verdict"] in ("failed", "missing"):
            return reporter, subject, f"reporter {reporter} is itself {rep['verdict']}"
        return reporter, subject, ""

    def receive_report(self, signed: dict) -> tuple[bool, str]:
        now = time.time()
        body = signed.get("body") if isinstance(signed, dict) else {}
        body = body if isinstance(body, dict) else {}
        for _ in range(3):
            key = f"evidence/{body.get('reporter')}/{body.get('subject')}"
            stored, rev = self.store.get(key) if self.host(str(body.get("reporter"))) else (None, 0)
            reporter, subject, why = self.check_report(signed, now, stored)
            if why:
                log.info("report %s -> %s refused: %s", reporter, subject, why)
                self.metrics.report(str(body.get("verdict")), False)
                return False, why
            doc = {"signed": signed, "time": now, "verdict": body["verdict"],
                   "reason": str(body.get("reason"))[:2000]}
            fail = stored.get("fail") if stored else None
            if body["verdict"] == "fail":
                fail = {"time": now, "reason": doc["reason"]}
            if fail and now - fail["time"] <= self.window:
                doc["fail"] = fail                   # a pass does not erase a recent fail
            try:
                self.store.put(key, doc, expect=rev)
            except Conflict:
                continue                             # a report for the same pair raced it
            self.metrics.report(body["verdict"], True)
            if body["verdict"] != "pass":
                self.dirty.add(subject)
                self.wake.set()                      # the leader looks at once
            return True, ""
        return False, "the report raced another for the same pair; send it again"

    def _accepted_evidence(self, subjects: set[str] | None = None) -> dict[str, list[dict]]:
        """Accepted evidence by subject.  Each document is checked once per revision,
        whoever wrote it (an agent with its own etcd role may write its own evidence)."""
        out: dict[str, list[dict]] = {}
        if subjects is None:
            found = self.store.range("evidence/")
        else:
            found = []
            for subject in subjects:
                for m in self.measurers_of(subject):
                    doc, rev = self.store.get(f"evidence/{m}/{subject}")
                    if doc is not None:
                        found.append((f"evidence/{m}/{subject}", doc, rev))
        for key, doc, rev in found:
            seen = self.checked.get(key)                  # (rev, refusal, counter)
            if seen is None or seen[0] != rev:
                prev = {"signed": {"body": {"counter": seen[2]}}} if seen else None
                signed = doc.get("signed") if isinstance(doc, dict) else None
                _, _, why = self.check_report(signed, time.time(), prev)
                counter = signed["body"]["counter"] if not why else (seen[2] if seen else 0)
                seen = self.checked[key] = (rev, why or None, counter)
            reporter = self.host(key.split("/")[1])
            if seen[1] is None and reporter and reporter["verdict"] not in ("failed", "missing"):
                out.setdefault(key.split("/")[2], []).append(doc)   # never a suspect's word
        return out

    # -- verdicts ------------------------------------------------------------------------
    def evaluate(self, subjects: set[str] | None = None) -> None:
        """Verdicts from the accepted evidence: every host's, or only `subjects`' (the
        fast path for news, reading just their measurers' evidence)."""
        now = time.time()
        evidence = self._accepted_evidence(subjects)
        for name in (self.names if subjects is None else sorted(subjects)):
            got = self.hosts.get(name)
            if got is None:
                continue
            h, rev = got
            if h["verdict"] == "failed":
                continue
            docs = evidence.get(name, [])
            fails = sorted(((d["fail"]["time"], d["fail"]["reason"],
                             d["signed"]["body"]["reporter"]) for d in docs if d.get("fail")
                            and now - d["fail"]["time"] <= self.window), reverse=True)
            passes = sorted(((d["signed"]["body"]["time"], d["reason"],
                              d["signed"]["body"]["reporter"]) for d in docs
                             if d["verdict"] == "pass"
                             and now - d["signed"]["body"]["time"] <= self.window), reverse=True)
            if fails:
                self.set_verdict(name, "failed", fails[0][1], fails[0][2], fails[0][0])
            elif passes:
                self.set_verdict(name, "trusted", passes[0][1], passes[0][2], passes[0][0])
            elif h["verdict"] != "unmeasured" or now - h["enrolled_at"] > 2 * self.window:
                last = max(((d["signed"]["body"]["time"], d["reason"],
                             d["signed"]["body"]["reporter"]) for d in docs), default=None)
                self.set_verdict(name, "missing",
                                 f"no pass within {self.window:.1f} s: "
                                 f"{last[1] if last else 'no accepted report'}",
                                 last[2] if last else "", now)

    def set_verdict(self, name: str, verdict: str, reason: str, by: str, at: float) -> None:
        h, rev = self.hosts[name]
        changed = h["verdict"] != verdict
        if not changed and h["reason"] == reason[:2000] and h["measured_by"] == by \
                and at - h["measured_at"] < self.period:
            return                                   # nothing new worth a write
        doc = {**h, "verdict": verdict, "reason": reason[:2000], "measured_by": by,
               "measured_at": at, "verdict_at": time.time() if changed else h["verdict_at"]}
        try:
            self.hosts[name] = (doc, self.store.put(f"hosts/{name}", doc, expect=rev))
        except Conflict:
            self.hosts[name] = self.store.get(f"hosts/{name}")
            return
        if changed:
            log.warning("host %s: %s -> %s (%s, by %s)", name, h["verdict"], verdict, reason, by)

    def readmit(self, name: str) -> None:
        """An operator repaired the host and restarted its agent: measure it afresh."""
        while True:
            h, rev = self.store.get(f"hosts/{name}")
            doc = {**h, "verdict": "unmeasured", "reason": "readmitted",
                   "verdict_at": time.time(), "enrolled_at": time.time()}
            try:
                self.hosts[name] = (doc, self.store.put(f"hosts/{name}", doc, expect=rev))
                break
            except Conflict:
                continue
        for key, _, _ in self.store.range("evidence/"):
            if key.split("/")[2] == name:
                self.store.delete(key)
        self.decide("", "", name, "readmit", "operator readmitted the host", "done")

    def trusted(self, name: str) -> bool:
        h = self.host(name)
        return h is not None and h["verdict"] == "trusted"

    # -- placement -----------------------------------------------------------------------
    def loads(self) -> dict[str, int]:
        """MiB placed on each host, counting a VM on its way to a host there as well."""
        used = dict.fromkeys(self.names, 0)
        for v, _ in self.vms.values():
            used[v["host"]] = used.get(v["host"], 0) + v["memory_mib"]
            claim = v.get("claim")
            if claim:
                used[claim["target"]] = used.get(claim["target"], 0) + v["memory_mib"]
        return used

    def choose(self, memory_mib: int, avoid: str | None,
               used: dict[str, int] | None = None) -> tuple[str | None, str]:
        """The trusted host with room for `memory_mib`: outside `avoid`'s neighbourhood
        first, then the least loaded (ties by name)."""
        return Chooser(self, avoid, used if used is not None else self.loads()).take(memory_mib)

    def place(self, spec: dict) -> dict:
        if not self.leading:
            raise RuntimeError(f"not the leader; ask {self.store.leader(LEADERSHIP)}")
        self.refresh()
        name, why = self.choose(int(spec.get("memory_mib", 256)), None)
        if name is None:
            raise RuntimeError(why)
        doc = {"id": spec["name"], "host": name, "image": spec["image"],
               "manifest": spec["manifest"], "broker": spec["broker"],
               "memory_mib": int(spec.get("memory_mib", 256)), "cmdline": spec.get("cmdline", ""),
               "priority": int(spec.get("priority", 0)), "state": "placing",
               "placed_at": time.time(), "snapshot": "", "snapshot_at": 0, "restored": 0,
               "claim": None}
        try:
            rev = self.store.put(f"vms/{spec['name']}", doc, expect=0)
        except Conflict:
            raise RuntimeError(f"VM {spec['name']} is already in the table") from None
        ok, detail = self.mover.place(self.host(name), spec)
        if not ok:
            self.store.delete(f"vms/{spec['name']}", expect=rev)
            raise RuntimeError(f"daemon on {name} refused: {detail}")
        doc["state"] = "running"
        self.vms[spec["name"]] = (doc, self.store.put(f"vms/{spec['name']}", doc, expect=rev))
        self.decide(spec["name"], "", name, "place", why, "done")
        return {"vm": spec["name"], "host": name, "reason": why}

    # -- evacuation ----------------------------------------------------------------------
    def settle_claims(self) -> None:
        """On taking over: a VM another controller was moving is where it runs now."""
        for vid, (vm, rev) in list(self.vms.items()):
            claim = vm.get("claim")
            if not claim or vid in self.in_flight:
                continue
            target = self.host(claim["target"])
            moved = target is not None and self.mover.running_on(vid, target)
            doc = {**vm, "claim": None, "state": "running"}
            if moved:
                doc.update(host=claim["target"], placed_at=time.time(), snapshot="",
                           restored=int(claim["how"] == "snapshot"))
            try:
                self.vms[vid] = (doc, self.store.put(f"vms/{vid}", doc, expect=rev))
            except Conflict:
                continue
            self.decide(vid, vm["host"], claim["target"], "settle",
                        f"{claim['by']} stopped leading while moving it: "
                        f"{'it runs on the target' if moved else 'it did not arrive; it stays'}",
                        "done")

    def evacuate_suspects(self) -> None:
        suspects = sorted(n for n, (h, _) in self.hosts.items()
                          if h["verdict"] in ("failed", "missing"))
        if not suspects or len(self.in_flight) >= self.parallel:
            return
        used = self.loads()
        on = {n: [] for n in suspects}
        for v, _ in self.vms.values():
            if v["host"] in on:
                on[v["host"]].append(v)
        for name in suspects:
            h = self.host(name)
            chooser = None
            for vm in sorted(on[name], key=lambda v: (-v["priority"], v["id"])):
                if vm["id"] in self.in_flight or vm.get("claim") \
                        or len(self.in_flight) >= self.parallel \
                        or time.monotonic() < self.retry_at.get(vm["id"], 0):
                    continue
                core_suspect = h["verdict"] == "failed" and any(
                    s in (h["reason"] or "") for s in CORE_SUSPECT)
                chooser = chooser or Chooser(self, name, used)
                target, why = chooser.take(vm["memory_mib"], commit=False)
                if target is None:
                    if not vm.get("waiting"):
                        self.decide(vm["id"], name, "", "none", f"stay: {why}", "waiting")
                        self._update_vm(vm["id"], waiting=True)
                    continue
                how = "snapshot" if core_suspect else "live"
                rev = self.vms[vm["id"]][1]
                claim = {"by": self.me, "target": target, "how": how, "at": time.time()}
                doc = {**vm, "claim": claim, "state": "moving", "waiting": False}
                try:
                    self.vms[vm["id"]] = (doc, self.store.put(f"vms/{vm['id']}", doc, expect=rev))
                except Conflict:
                    continue                              # somebody else moved or claimed it
                chooser.commit(target, vm["memory_mib"])
                self.in_flight.add(vm["id"])
                reason = f"{name} {h['verdict']} ({h['reason']}); target {why}"
                self.pool.submit(self._evacuate, doc, name, target, core_suspect, reason)

    def _update_vm(self, vid: str, **changes) -> None:
        while True:
            doc, rev = self.store.get(f"vms/{vid}")
            if doc is None:
                return
            new = {**doc, **changes}
            try:
                self.vms[vid] = (new, self.store.put(f"vms/{vid}", new, expect=rev))
                return
            except Conflict:
                continue

    def _evacuate(self, vm: dict, source: str, target: str, core_suspect: bool,
                  reason: str) -> None:
        t0 = time.monotonic()
        s, t = self.host(source), self.host(target)
        try:
            if core_suspect:
                how, why = "snapshot", "a core on the source is suspect: its state is not taken"
            else:
                how, why = "live", "the source's cores are sound"
            did = self.decide(vm["id"], source, target, how, f"{reason}; {why}")
            ok, detail = self.mover.live(vm, s, t) if how == "live" else (False, "skipped")
            if not ok and how == "live":
                self.settle(did, f"failed: {detail}", time.monotonic() - t0)
                how = "snapshot"
                did = self.decide(vm["id"], source, target, how,
                                  f"{reason}; live migration failed ({detail})")
            if how == "snapshot":
                ok, detail = self.mover.restore(vm, s, t)
            secs = time.monotonic() - t0
            self.settle(did, "done" if ok else f"failed: {detail}", secs)
            self.metrics.evacuation(how, ok, secs)
            self.retry_at[vm["id"]] = 0 if ok else time.monotonic() + 2 * self.period
            if ok:
                # The move advanced the VM's generation: its last snapshot is spent.
                self._update_vm(vm["id"], host=target, state="running", placed_at=time.time(),
                                restored=int(how == "snapshot"), snapshot="", claim=None)
            else:
                self._update_vm(vm["id"], state="running", claim=None)
            log.warning("vm %s: %s %s -> %s %s (%s)", vm["id"], how, source, target,
                        "done" if ok else "FAILED", detail)
        except Exception:                               # noqa: BLE001
            log.exception("evacuating %s", vm["id"])
        finally:
            self.in_flight.discard(vm["id"])

    # -- sealed snapshots ----------------------------------------------------------------
    def snapshot_due(self) -> None:
        now = time.time()
        for vid, (vm, _) in list(self.vms.items()):
            if vid in self.in_flight or vm.get("claim") or not self.trusted(vm["host"]):
                continue
            if vm["restored"]:
                # A core rebuilt from a snapshot is killed by its sandbox when it seals
                # again (docs/fleet.md, limits): keep the snapshot it came from.
                continue
            due = vm["snapshot_at"] + self.snapshot_every if vm["snapshot"] \
                else vm["placed_at"] + min(2.0, self.snapshot_every)
            if now < due:
                continue
            path = self.snapshot_dir / f"{vid}-{int(now * 1000)}.sealed"
            ok, detail = self.mover.snapshot(vm, self.host(vm["host"]), str(path))
            if ok:
                old = vm["snapshot"]
                self._update_vm(vid, snapshot=str(path), snapshot_at=now)
                if old and old != str(path):
                    Path(old).unlink(missing_ok=True)
            else:
                log.warning("snapshot of %s refused: %s", vid, detail)
                self._update_vm(vid, snapshot_at=now)

    # -- loops ---------------------------------------------------------------------------
    def step(self) -> None:
        """One round of the leader's work (or of trying to become the leader)."""
        was = self.leading
        try:
            self.leading = self.store.lead(LEADERSHIP, self.me, self.lease)
        except StoreError as e:
            log.warning("store: %s", e)
            self.leading = False
        if not self.leading:
            if was:
                log.warning("%s: no longer the leader", self.me)
            return
        now = time.monotonic()
        if not was or now - self.scanned_at >= self.full_scan_every:
            self.refresh()                      # the whole table, and every host's evidence
            if not was:
                self.took_over_at = time.time()
                log.warning("%s: leading the fleet controller", self.me)
                self.decide("", "", "", "lead", f"{self.me} leads", "done")
                self.settle_claims()
            self.dirty.clear()
            self.evaluate()
            self.scanned_at = now
        elif self.dirty:                        # news: only those hosts, at once
            subjects, self.dirty = self.dirty, set()
            self.evaluate(subjects)
        self.evacuate_suspects()            # (metrics are computed when scraped)

    def run_loops(self) -> None:
        def policy():
            while not self.stop.is_set():
                try:
                    self.step()
                except Exception:                   # noqa: BLE001
                    log.exception("policy loop")
                self.wake.wait(min(self.scan_every, self.lease / 3))
                self.wake.clear()

        def snapshots():
            while not self.stop.wait(0.5):
                try:
                    if self.leading:
                        self.snapshot_due()
                except Exception:                   # noqa: BLE001
                    log.exception("snapshot loop")
        threading.Thread(target=policy, daemon=True, name="policy").start()
        if self.snapshot_every > 0:
            threading.Thread(target=snapshots, daemon=True, name="snapshots").start()

    def table(self) -> dict:
        return {**table_of(self.store, self.subjects_of),
                "leader": self.store.leader(LEADERSHIP), "me": self.me}


def table_of(store, subjects_of=lambda name: []) -> dict:
    """The integrity validation table as `GET /v1/table` and `sealvm fleet status` show it."""
    hosts_docs = {k.split("/", 1)[1]: d for k, d, _ in store.range("hosts/")}
    vms = [v for _, v, _ in store.range("vms/")]
    used: dict[str, int] = {}
    for v in vms:
        used[v["host"]] = used.get(v["host"], 0) + v["memory_mib"]
    hosts = []
    for name in sorted(hosts_docs):
        h = hosts_docs[name]
        hosts.append({"name": name, "verdict": h["verdict"], "reason": h["reason"],
                      "measured_by": h["measured_by"], "measured_at": h["measured_at"],
                      "verdict_at": h["verdict_at"], "capacity_mib": h["capacity_mib"],
                      "used_mib": used.get(name, 0),
                      "vms": sorted(v["id"] for v in vms if v["host"] == name),
                      "golden": h["golden"], "neighbours": subjects_of(name)})
    decisions = [d for _, d, _ in store.range("decisions/")]
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
        count = {n: 0 for n in c.names}
        for v, _ in c.vms.values():
            count[v["host"]] = count.get(v["host"], 0) + 1
        for name, (h, _) in c.hosts.items():
            self.trusted.labels(name).set(1 if h["verdict"] == "trusted" else 0)
            for v in ("trusted", "failed", "missing", "unmeasured"):
                self.verdict.labels(name, v).set(1 if h["verdict"] == v else 0)
            self.vms.labels(name).set(count.get(name, 0))

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

    @app.get("/v1/leader")
    def leader() -> dict:
        return {"leader": c.store.leader(LEADERSHIP), "me": c.me, "leading": c.leading}

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
    config.setdefault("snapshot_dir", str(state / "snapshots"))
    password = os.environ.get("SEALVM_FLEET_STORE_PASSWORD")
    if getattr(args, "store_password_file", None):
        password = Path(args.store_password_file).read_text().strip()
    spec = getattr(args, "store", None) or str(Path(args.db) if args.db else state / "fleet.db")
    try:
        store = open_store(spec, getattr(args, "store_user", None), password)
    except (StoreError, OSError) as e:
        print(f"sealvm fleet controller: cannot open the store {spec}: {e}", file=sys.stderr)
        return 1
    mover = None
    if getattr(args, "simulate", False):
        from .simulate import SimMover
        mover = SimMover(store, float(config.get("move_seconds", 0.5)))
    c = Controller(config, store, mover, getattr(args, "id", None))
    c.run_loops()
    host, _, port = args.listen.rpartition(":")
    try:
        uvicorn.run(build_app(c), host=host or "127.0.0.1", port=int(port), log_level="warning")
    finally:
        c.stop.set()
    return 0

"""Where the fleet's integrity validation table lives: SQLite for one controller, etcd for a
region with several.

Both stores offer the same small interface over JSON documents under '/'-separated keys,
each with a revision that grows on every write:

    get(key) -> (doc | None, rev)            rev 0: absent
    range(prefix) -> [(key, doc, rev)]       in key order
    put(key, doc, expect=None) -> rev        expect=REV: only if the key is still at REV
                                             (0: only if absent), else Conflict
    delete(key, expect=None)
    lead(name, me, ttl) -> bool              take or keep a leadership that lapses ttl
                                             seconds after its holder stops renewing it
    leader(name) -> str | None

Compare-and-swap (`expect`) is how two controllers never move the same VM twice: a
controller claims a VM by writing its document at the revision it read; the loser gets
Conflict.  SqliteStore keeps one table (and takes SQLite's write lock for each CAS, so
two processes on one file are safe); EtcdStore uses etcd transactions comparing the key's
mod revision, leases for leadership, and fails over between the cluster's members.
"""
from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from pathlib import Path


class Conflict(Exception):
    """The key was not at the expected revision: somebody else wrote it first."""


class StoreError(Exception):
    """The store cannot be reached or refused the request (e.g. permission denied)."""


def _dump(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


class SqliteStore:
    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None,
                                  timeout=30)
        self.lock = threading.RLock()
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(
            "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT, rev INTEGER);"
            "CREATE TABLE IF NOT EXISTS rev (n INTEGER);"
            "INSERT INTO rev SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM rev);")

    def get(self, key: str) -> tuple[dict | None, int]:
        with self.lock:
            row = self.db.execute("SELECT value, rev FROM kv WHERE key=?", (key,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else (None, 0)

    def range(self, prefix: str) -> list[tuple[str, dict, int]]:
        with self.lock:
            rows = self.db.execute("SELECT key, value, rev FROM kv WHERE key >= ? AND key < ? "
                                   "ORDER BY key", (prefix, prefix + "\U0010ffff")).fetchall()
        return [(k, json.loads(v), r) for k, v, r in rows]

    def _write(self, key: str, doc: dict | None, expect: int | None) -> int:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute("SELECT rev FROM kv WHERE key=?", (key,)).fetchone()
                if expect is not None and (row[0] if row else 0) != expect:
                    raise Conflict(key)
                n = self.db.execute("UPDATE rev SET n = n + 1 RETURNING n").fetchone()[0]
                if doc is None:
                    self.db.execute("DELETE FROM kv WHERE key=?", (key,))
                else:
                    self.db.execute("INSERT OR REPLACE INTO kv (key, value, rev) VALUES (?,?,?)",
                                    (key, _dump(doc), n))
                self.db.execute("COMMIT")
                return n
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def put(self, key: str, doc: dict, expect: int | None = None) -> int:
        return self._write(key, doc, expect)

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        """Unconditional writes in one transaction (seeding a table)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute("UPDATE rev SET n = n + 1 RETURNING n").fetchone()[0]
            self.db.executemany("INSERT OR REPLACE INTO kv (key, value, rev) VALUES (?,?,?)",
                                [(k, _dump(d), n) for k, d in items])
            self.db.execute("COMMIT")

    def delete(self, key: str, expect: int | None = None) -> None:
        self._write(key, None, expect)

    def lead(self, name: str, me: str, ttl: float) -> bool:
        key = f"leader/{name}"
        doc, rev = self.get(key)
        now = time.time()
        if doc and doc["holder"] != me and doc["expires"] > now:
            return False
        try:
            self.put(key, {"holder": me, "expires": now + ttl}, expect=rev)
            return True
        except Conflict:
            return False

    def leader(self, name: str) -> str | None:
        doc, _ = self.get(f"leader/{name}")
        return doc["holder"] if doc and doc["expires"] > time.time() else None

    def resign(self, name: str) -> None:
        doc, rev = self.get(f"leader/{name}")
        if doc:
            try:
                self.delete(f"leader/{name}", expect=rev)
            except Conflict:
                pass

    def close(self) -> None:
        with self.lock:
            self.db.close()


def _b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s)


def _prefix_end(prefix: str) -> str:
    b = bytearray(prefix.encode())
    b[-1] += 1
    return _b64(bytes(b))


class EtcdStore:
    """The table in an etcd cluster, through its JSON gateway (etcd3gw): `endpoints` are
    "host:port" of the members, tried in turn when one does not answer; `user` and
    `password` authenticate when the cluster has auth enabled."""
    kind = "etcd"

    def __init__(self, endpoints: list[str], user: str | None = None,
                 password: str | None = None, timeout: float = 5.0):
        import requests
        from etcd3gw.client import Etcd3Client
        if not endpoints:
            raise StoreError("no etcd endpoints")
        self.clients = []
        for ep in endpoints:
            host, _, port = ep.rpartition(":")
            session = requests.Session()
            self.clients.append(Etcd3Client(host=host, port=int(port), timeout=timeout,
                                            api_path="/v3/", session=session))
        self.user, self.password = user, password
        self.current = 0
        self.lock = threading.Lock()
        self.leases: dict[str, tuple[int, float]] = {}   # name -> (lease id, renew after)
        if user:
            self._authenticate()

    # -- transport -----------------------------------------------------------------------
    def _authenticate(self) -> None:
        for c in self.clients:
            try:
                r = c.session.post(c.get_url("/auth/authenticate"), timeout=c.timeout,
                                   json={"name": self.user, "password": self.password})
            except Exception:                                   # noqa: BLE001
                continue
            if r.status_code != 200:
                raise StoreError(f"etcd refused user {self.user}: {r.text[:200]}")
            token = r.json()["token"]
            for other in self.clients:
                other.session.headers["Authorization"] = token
            return
        raise StoreError("no etcd member answered the authentication")

    def _call(self, path: str, body: dict) -> dict:
        import requests
        last = None
        for attempt in range(2 * len(self.clients)):
            c = self.clients[(self.current + attempt) % len(self.clients)]
            try:
                r = c.session.post(c.get_url(path), json=body, timeout=c.timeout)
            except requests.RequestException as e:
                last = e
                continue
            if r.status_code == 200:
                self.current = (self.current + attempt) % len(self.clients)
                return r.json()
            text = r.text[:300]
            if "invalid auth token" in text and self.user:
                self._authenticate()
                continue
            if r.status_code in (500, 503) and "leader" in text:
                last = StoreError(text)              # a member without a leader: try the next
                time.sleep(0.1)
                continue
            raise StoreError(f"etcd {path}: HTTP {r.status_code}: {text}")
        raise StoreError(f"no etcd member answered {path}: {last}")

    # -- the interface -------------------------------------------------------------------
    def get(self, key: str) -> tuple[dict | None, int]:
        kvs = self._call("/kv/range", {"key": _b64(key)}).get("kvs", [])
        if not kvs:
            return None, 0
        return json.loads(_unb64(kvs[0]["value"])), int(kvs[0]["mod_revision"])

    def range(self, prefix: str) -> list[tuple[str, dict, int]]:
        kvs = self._call("/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix),
                                       "sort_order": "ASCEND", "sort_target": "KEY"}
                         ).get("kvs", [])
        return [(_unb64(kv["key"]).decode(), json.loads(_unb64(kv["value"])),
                 int(kv["mod_revision"])) for kv in kvs]

    def _txn(self, key: str, op: dict, expect: int | None) -> int:
        body = {"success": [op]}
        if expect is not None:
            body["compare"] = [{"key": _b64(key), "target": "MOD", "result": "EQUAL",
                                "mod_revision": str(expect)}]
        r = self._call("/kv/txn", body)
        if not r.get("succeeded"):
            raise Conflict(key)
        return int(r["header"]["revision"])

    def put(self, key: str, doc: dict, expect: int | None = None) -> int:
        return self._txn(key, {"request_put": {"key": _b64(key), "value": _b64(_dump(doc))}},
                         expect)

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        """Unconditional writes, 128 to a transaction (etcd's default limit)."""
        for i in range(0, len(items), 128):
            self._call("/kv/txn", {"success": [
                {"request_put": {"key": _b64(k), "value": _b64(_dump(d))}}
                for k, d in items[i:i + 128]]})

    def delete(self, key: str, expect: int | None = None) -> None:
        self._txn(key, {"request_delete_range": {"key": _b64(key)}}, expect)

    def lead(self, name: str, me: str, ttl: float) -> bool:
        """Hold `leader/NAME` with a lease of `ttl` seconds, kept alive by calling this
        again well within ttl; False while somebody else holds it."""
        key = f"leader/{name}"
        with self.lock:
            held = self.leases.get(name)
            if held and time.monotonic() < held[1]:
                return True                  # renewed within the last third of the lease
            if held:
                r = self._call("/lease/keepalive", {"ID": str(held[0])})
                if int(r.get("result", {}).get("TTL", 0)) > 0:    # our key lives with it
                    self.leases[name] = (held[0], time.monotonic() + ttl / 3)
                    return True
                self.leases.pop(name, None)
            lease = int(self._call("/lease/grant", {"TTL": str(max(1, round(ttl)))})["ID"])
            r = self._call("/kv/txn", {
                "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL",
                             "create_revision": "0"}],
                "success": [{"request_put": {"key": _b64(key), "value": _b64(_dump({"holder": me})),
                                             "lease": str(lease)}}]})
            if r.get("succeeded"):
                self.leases[name] = (lease, time.monotonic() + ttl / 3)
                return True
            self._call("/lease/revoke", {"ID": str(lease)})
            return False

    def leader(self, name: str) -> str | None:
        doc, _ = self.get(f"leader/{name}")
        return doc["holder"] if doc else None

    def resign(self, name: str) -> None:
        held = self.leases.pop(name, None)
        if held:
            self._call("/lease/revoke", {"ID": str(held[0])})

    def close(self) -> None:
        for c in self.clients:
            c.session.close()


def open_store(spec: str, user: str | None = None, password: str | None = None):
    """`sqlite:PATH` or a bare path, or `etcd://HOST:PORT[,HOST:PORT...]`."""
    if spec.startswith("etcd://"):
        return EtcdStore(spec[len("etcd://"):].split(","), user, password)
    return SqliteStore(spec[len("sqlite:"):] if spec.startswith("sqlite:") else spec)

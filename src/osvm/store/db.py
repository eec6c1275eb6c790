"""SQLite store: components, revisions, instances, events and allocations.

The store is the one source of truth for desired state. It keeps what the daemon needs to find its
instances again after a restart (pid, pid start time, cgroup, network namespace), so a daemon killed
with SIGKILL loses nothing.
"""

import json
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("osvm.store")

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS components (
    name TEXT PRIMARY KEY,
    deployment TEXT NOT NULL,
    file TEXT,
    desired TEXT NOT NULL,
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS revisions (
    component TEXT NOT NULL,
    number INTEGER NOT NULL,
    spec TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (component, number)
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    component TEXT NOT NULL,
    revision INTEGER NOT NULL,
    runtime TEXT NOT NULL,
    state TEXT NOT NULL,
    health TEXT NOT NULL DEFAULT 'unknown',
    pid INTEGER,
    pid_start_time INTEGER,
    cgroup TEXT,
    netns TEXT,
    address TEXT NOT NULL DEFAULT '127.0.0.1',
    ports TEXT NOT NULL DEFAULT '{}',
    isolated INTEGER NOT NULL DEFAULT 0,
    in_rotation INTEGER NOT NULL DEFAULT 1,
    restarts INTEGER NOT NULL DEFAULT 0,
    restart_times TEXT NOT NULL DEFAULT '[]',
    exit_code INTEGER,
    exit_reason TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    stopped_at REAL
);
CREATE INDEX IF NOT EXISTS instances_by_component ON instances (component, state);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    component TEXT NOT NULL DEFAULT '',
    instance TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    component TEXT NOT NULL,
    from_revision INTEGER NOT NULL,
    to_revision INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    trigger TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    blue TEXT NOT NULL DEFAULT '[]',
    green TEXT NOT NULL DEFAULT '[]',
    phases TEXT NOT NULL DEFAULT '[]',
    closed_connections INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS rollouts_by_component ON rollouts (component, id);
CREATE TABLE IF NOT EXISTS allocations (
    kind TEXT NOT NULL,
    value TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, value)
);
"""

# Instance states that own live resources (a process, a cgroup, a namespace).
LIVE_STATES = ("created", "starting", "running", "backoff", "stopping")


@dataclass
class InstanceRecord:
    """One row of the instances table."""

    id: str
    component: str
    revision: int
    runtime: str
    state: str
    health: str = "unknown"
    pid: int | None = None
    pid_start_time: int | None = None
    cgroup: str | None = None
    netns: str | None = None
    address: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=dict)
    isolated: bool = False
    # False while the instance is kept out of its endpoint, such as a green instance before promotion.
    in_rotation: bool = True
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)
    exit_code: int | None = None
    exit_reason: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    stopped_at: float | None = None


@dataclass
class ComponentRecord:
    """One row of the components table: desired state and the last reported status."""

    name: str
    deployment: str
    file: str | None
    desired: str
    revision: int
    status: str
    status_reason: str
    updated_at: float


# Rollout states before the rollout ended.
ACTIVE_ROLLOUT_STATES = ("starting", "verifying", "promoted", "draining")


@dataclass
class RolloutRecord:
    """One row of the rollouts table: the move of a component from one revision to another."""

    id: int
    component: str
    from_revision: int
    to_revision: int
    strategy: str
    trigger: str
    state: str
    reason: str = ""
    blue: list[str] = field(default_factory=list)
    green: list[str] = field(default_factory=list)
    # Each phase: {"phase": name, "started_at": time, "finished_at": time or None}.
    phases: list[dict[str, Any]] = field(default_factory=list)
    closed_connections: int = 0
    created_at: float = 0.0
    finished_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "component": self.component,
            "from_revision": self.from_revision,
            "to_revision": self.to_revision,
            "strategy": self.strategy,
            "trigger": self.trigger,
            "state": self.state,
            "reason": self.reason,
            "blue": self.blue,
            "green": self.green,
            "phases": self.phases,
            "closed_connections": self.closed_connections,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
        }


@dataclass
class Event:
    id: int
    time: float
    component: str
    instance: str
    kind: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time,
            "component": self.component,
            "instance": self.instance,
            "kind": self.kind,
            "reason": self.reason,
        }


class Store:
    """Thread-safe access to the SQLite database in the state directory."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._check_schema_version()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- components and revisions ------------------------------------------------------------

    def latest_revision(self, component: str) -> tuple[int, str] | None:
        """Return (number, spec_hash) of the newest revision of a component, or None."""
        row = self._one(
            "SELECT number, spec_hash FROM revisions WHERE component = ? ORDER BY number DESC LIMIT 1", (component,)
        )
        return (row["number"], row["spec_hash"]) if row else None

    def add_revision(self, component: str, spec: dict[str, Any], spec_hash: str) -> int:
        """Store a new revision of a component's spec and return its number, counted from 1."""
        with self._transaction():
            row = self._one("SELECT MAX(number) AS number FROM revisions WHERE component = ?", (component,))
            number = (row["number"] or 0) + 1
            self._db.execute(
                "INSERT INTO revisions (component, number, spec, spec_hash, created_at) VALUES (?, ?, ?, ?, ?)",
                (component, number, json.dumps(spec, sort_keys=True), spec_hash, time.time()),
            )
        return number

    def revision_spec(self, component: str, number: int) -> dict[str, Any]:
        row = self._one("SELECT spec FROM revisions WHERE component = ? AND number = ?", (component, number))
        if row is None:
            raise KeyError(f"revision {number} of component {component!r} not found")
        return json.loads(row["spec"])

    def revisions(self, component: str) -> list[dict[str, Any]]:
        rows = self._all(
            "SELECT number, spec_hash, created_at FROM revisions WHERE component = ? ORDER BY number", (component,)
        )
        return [dict(row) for row in rows]

    def upsert_component(self, name: str, deployment: str, file: str | None, desired: str, revision: int) -> None:
        with self._transaction():
            self._db.execute(
                """
                INSERT INTO components (name, deployment, file, desired, revision, status, updated_at)
                VALUES (?, ?, ?, ?, ?, 'pending', ?)
                ON CONFLICT (name) DO UPDATE SET
                    deployment = excluded.deployment, file = excluded.file,
                    desired = excluded.desired, revision = excluded.revision, updated_at = excluded.updated_at
                """,
                (name, deployment, file, desired, revision, time.time()),
            )

    def set_desired(self, name: str, desired: str) -> None:
        self._execute("UPDATE components SET desired = ?, updated_at = ? WHERE name = ?", (desired, time.time(), name))

    def set_component_status(self, name: str, status: str, reason: str = "") -> None:
        self._execute(
            "UPDATE components SET status = ?, status_reason = ?, updated_at = ? WHERE name = ?",
            (status, reason, time.time(), name),
        )

    def delete_component(self, name: str) -> None:
        self._execute("DELETE FROM components WHERE name = ?", (name,))

    def component(self, name: str) -> ComponentRecord | None:
        row = self._one("SELECT * FROM components WHERE name = ?", (name,))
        return ComponentRecord(**dict(row)) if row else None

    def components(self) -> list[ComponentRecord]:
        return [ComponentRecord(**dict(row)) for row in self._all("SELECT * FROM components ORDER BY name")]

    # --- instances ---------------------------------------------------------------------------

    def add_instance(self, record: InstanceRecord) -> None:
        columns = _instance_columns(record)
        names = ", ".join(columns)
        marks = ", ".join("?" for _ in columns)
        self._execute(f"INSERT INTO instances ({names}) VALUES ({marks})", tuple(columns.values()))

    def update_instance(self, record: InstanceRecord) -> None:
        columns = _instance_columns(record)
        instance_id = columns.pop("id")
        assignments = ", ".join(f"{name} = ?" for name in columns)
        self._execute(f"UPDATE instances SET {assignments} WHERE id = ?", (*columns.values(), instance_id))

    def instance(self, instance_id: str) -> InstanceRecord | None:
        row = self._one("SELECT * FROM instances WHERE id = ?", (instance_id,))
        return _instance_from_row(row) if row else None

    def live_instances(self, component: str | None = None) -> list[InstanceRecord]:
        marks = ", ".join("?" for _ in LIVE_STATES)
        query = f"SELECT * FROM instances WHERE state IN ({marks})"
        params: tuple[Any, ...] = LIVE_STATES
        if component is not None:
            query += " AND component = ?"
            params = (*params, component)
        return [_instance_from_row(row) for row in self._all(query + " ORDER BY created_at", params)]

    def instances(self, component: str | None = None, limit: int = 100) -> list[InstanceRecord]:
        if component is None:
            rows = self._all("SELECT * FROM instances ORDER BY created_at DESC LIMIT ?", (limit,))
        else:
            rows = self._all(
                "SELECT * FROM instances WHERE component = ? ORDER BY created_at DESC LIMIT ?", (component, limit)
            )
        return [_instance_from_row(row) for row in rows]

    # --- events ------------------------------------------------------------------------------

    def add_event(self, kind: str, reason: str, component: str = "", instance: str = "") -> Event:
        now = time.time()
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (time, component, instance, kind, reason) VALUES (?, ?, ?, ?, ?)",
                (now, component, instance, kind, reason),
            )
            event_id = cursor.lastrowid
        return Event(event_id or 0, now, component, instance, kind, reason)

    def events(
        self, after_id: int = 0, since: float | None = None, component: str | None = None, limit: int = 1000
    ) -> list[Event]:
        query = "SELECT * FROM events WHERE id > ?"
        params: list[Any] = [after_id]
        if since is not None:
            query += " AND time >= ?"
            params.append(since)
        if component:
            query += " AND component = ?"
            params.append(component)
        # The newest `limit` events, returned oldest first.
        query = f"SELECT * FROM ({query} ORDER BY id DESC LIMIT ?) ORDER BY id"
        params.append(limit)
        return [Event(**dict(row)) for row in self._all(query, tuple(params))]

    # --- rollouts ----------------------------------------------------------------------------

    def save_rollout(self, rollout: "RolloutRecord") -> int:
        """Insert a rollout (when its id is 0) or update it; return its id."""
        columns = {
            "component": rollout.component,
            "from_revision": rollout.from_revision,
            "to_revision": rollout.to_revision,
            "strategy": rollout.strategy,
            "trigger": rollout.trigger,
            "state": rollout.state,
            "reason": rollout.reason,
            "blue": json.dumps(rollout.blue),
            "green": json.dumps(rollout.green),
            "phases": json.dumps(rollout.phases),
            "closed_connections": rollout.closed_connections,
            "created_at": rollout.created_at,
            "finished_at": rollout.finished_at,
        }
        with self._lock:
            if rollout.id == 0:
                names = ", ".join(columns)
                marks = ", ".join("?" for _ in columns)
                cursor = self._db.execute(f"INSERT INTO rollouts ({names}) VALUES ({marks})", tuple(columns.values()))
                rollout.id = cursor.lastrowid or 0
            else:
                assignments = ", ".join(f"{name} = ?" for name in columns)
                self._db.execute(f"UPDATE rollouts SET {assignments} WHERE id = ?", (*columns.values(), rollout.id))
        return rollout.id

    def rollout(self, rollout_id: int) -> "RolloutRecord | None":
        row = self._one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return _rollout_from_row(row) if row else None

    def rollouts(self, component: str | None = None, limit: int = 50) -> list["RolloutRecord"]:
        if component is None:
            rows = self._all("SELECT * FROM rollouts ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._all("SELECT * FROM rollouts WHERE component = ? ORDER BY id DESC LIMIT ?", (component, limit))
        return [_rollout_from_row(row) for row in rows]

    def active_rollouts(self) -> list["RolloutRecord"]:
        marks = ", ".join("?" for _ in ACTIVE_ROLLOUT_STATES)
        rows = self._all(f"SELECT * FROM rollouts WHERE state IN ({marks}) ORDER BY id", ACTIVE_ROLLOUT_STATES)
        return [_rollout_from_row(row) for row in rows]

    # --- allocations -------------------------------------------------------------------------

    def allocate(self, kind: str, value: str, owner: str) -> bool:
        """Record that `owner` holds `value` of `kind`; return False when someone else holds it."""
        try:
            self._execute(
                "INSERT INTO allocations (kind, value, owner, created_at) VALUES (?, ?, ?, ?)",
                (kind, value, owner, time.time()),
            )
        except sqlite3.IntegrityError:
            row = self._one("SELECT owner FROM allocations WHERE kind = ? AND value = ?", (kind, value))
            return row is not None and row["owner"] == owner
        return True

    def allocations(self, kind: str | None = None, owner: str | None = None) -> list[tuple[str, str, str]]:
        query = "SELECT kind, value, owner FROM allocations WHERE 1 = 1"
        params: list[Any] = []
        if kind is not None:
            query += " AND kind = ?"
            params.append(kind)
        if owner is not None:
            query += " AND owner = ?"
            params.append(owner)
        return [(row["kind"], row["value"], row["owner"]) for row in self._all(query, tuple(params))]

    def release(self, owner: str, kind: str | None = None) -> None:
        if kind is None:
            self._execute("DELETE FROM allocations WHERE owner = ?", (owner,))
        else:
            self._execute("DELETE FROM allocations WHERE owner = ? AND kind = ?", (owner, kind))

    # --- settings ----------------------------------------------------------------------------

    def set_setting(self, key: str, value: Any) -> None:
        """Store a JSON value under a key in the meta table, such as the policy of a deployment."""
        self._execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    def setting(self, key: str) -> Any:
        row = self._one("SELECT value FROM meta WHERE key = ?", (key,))
        return json.loads(row["value"]) if row else None

    def settings(self, prefix: str) -> dict[str, Any]:
        rows = self._all("SELECT key, value FROM meta WHERE key LIKE ? ORDER BY key", (prefix + "%",))
        return {row["key"]: json.loads(row["value"]) for row in rows}

    # --- private helpers ---------------------------------------------------------------------

    def _check_schema_version(self) -> None:
        row = self._one("SELECT value FROM meta WHERE key = 'schema_version'")
        if row is None:
            self._execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row["value"]) > SCHEMA_VERSION:
            raise RuntimeError(
                f"state database {self.path} has schema version {row['value']}, newer than this osvm "
                f"({SCHEMA_VERSION}): upgrade osvm or use another --state-dir"
            )

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db, self._lock)

    def _execute(self, query: str, params: tuple[Any, ...] = ()) -> None:
        with self._lock:
            self._db.execute(query, params)

    def _one(self, query: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._db.execute(query, params).fetchone()

    def _all(self, query: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(query, params).fetchall()


class _Transaction:
    def __init__(self, db: sqlite3.Connection, lock: threading.RLock):
        self._db = db
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire()
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        try:
            self._db.execute("ROLLBACK" if error else "COMMIT")
        finally:
            self._lock.release()


def _rollout_from_row(row: sqlite3.Row) -> RolloutRecord:
    values = dict(row)
    for key in ("blue", "green", "phases"):
        values[key] = json.loads(values[key])
    return RolloutRecord(**values)


def _instance_columns(record: InstanceRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "component": record.component,
        "revision": record.revision,
        "runtime": record.runtime,
        "state": record.state,
        "health": record.health,
        "pid": record.pid,
        "pid_start_time": record.pid_start_time,
        "cgroup": record.cgroup,
        "netns": record.netns,
        "address": record.address,
        "ports": json.dumps(record.ports, sort_keys=True),
        "isolated": int(record.isolated),
        "in_rotation": int(record.in_rotation),
        "restarts": record.restarts,
        "restart_times": json.dumps(record.restart_times),
        "exit_code": record.exit_code,
        "exit_reason": record.exit_reason,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "stopped_at": record.stopped_at,
    }


def _instance_from_row(row: sqlite3.Row) -> InstanceRecord:
    values = dict(row)
    values["ports"] = json.loads(values["ports"])
    values["restart_times"] = json.loads(values["restart_times"])
    values["isolated"] = bool(values["isolated"])
    values["in_rotation"] = bool(values["in_rotation"])
    return InstanceRecord(**values)

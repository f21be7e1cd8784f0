"""The run registry: one SQLite table, the control plane's memory across restarts.

Why SQLite: runs must survive a server restart (re-attach or mark failed), the write rate is a few rows a
second at most, and a single file on a volume is the simplest thing that is transactional. One server owns a
registry at a time (an exclusive lock file beside it), because two schedulers would launch the same pending run.
"""
from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    mode              TEXT NOT NULL,
    config            TEXT NOT NULL,          -- the resolved run config, JSON
    state             TEXT NOT NULL CHECK (state IN ('pending','running','succeeded','failed','stopped')),
    created_at        REAL NOT NULL,          -- unix seconds
    started_at        REAL,
    finished_at       REAL,
    run_dir           TEXT NOT NULL UNIQUE,
    config_path       TEXT NOT NULL,
    launcher          TEXT NOT NULL,          -- local | ray
    ray_address       TEXT,
    ray_job_id        TEXT,
    pid               INTEGER,
    pid_start         TEXT,                   -- process start time, guards against pid reuse
    stop_requested_at REAL,
    error             TEXT
);
CREATE INDEX IF NOT EXISTS runs_state ON runs (state, created_at);
"""

_COLUMNS = ("id", "name", "mode", "config", "state", "created_at", "started_at", "finished_at", "run_dir",
            "config_path", "launcher", "ray_address", "ray_job_id", "pid", "pid_start", "stop_requested_at", "error")


class RegistryError(RuntimeError):
    """The registry cannot be opened or is owned by another server."""


@dataclass
class RunRecord:
    id: str
    name: str
    mode: str
    config: dict[str, Any]
    state: str
    created_at: float
    run_dir: str
    config_path: str
    launcher: str
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    ray_address: Optional[str] = None
    ray_job_id: Optional[str] = None
    pid: Optional[int] = None
    pid_start: Optional[str] = None
    stop_requested_at: Optional[float] = None
    error: Optional[str] = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "RunRecord":
        values = {k: row[k] for k in _COLUMNS}
        values["config"] = json.loads(values["config"])
        return cls(**values)


class Registry:
    """Thread-safe access to the runs table. Each call is one transaction on a short-lived connection."""

    def __init__(self, path: str | Path, lock: bool = True):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RegistryError(f"{self.path}: cannot create the registry directory ({e.strerror})") from None
        self._lock_file = None
        if lock:
            self._take_ownership()
        self._mutex = threading.Lock()
        try:
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RegistryError(f"{self.path}: written by a newer server (schema {version} > {SCHEMA_VERSION})")
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            raise RegistryError(f"{self.path}: not a usable SQLite registry ({e})") from None

    def _take_ownership(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        f = open(lock_path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise RegistryError(f"{self.path}: in use by another `lad serve` (pid {owner}); "
                                "one server per registry") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._lock_file = f  # held open for the life of the process; the kernel drops it if we die

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout=10000")
        return db

    def _execute(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._mutex:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")
                rows = db.execute(sql, tuple(params)).fetchall()
                db.execute("COMMIT")
                return rows
            except BaseException:
                db.execute("ROLLBACK")
                raise
            finally:
                db.close()

    # ---- writes -------------------------------------------------------------------------------------------
    def insert(self, rec: RunRecord) -> None:
        values = {k: getattr(rec, k) for k in _COLUMNS}
        values["config"] = json.dumps(rec.config, sort_keys=True)
        cols = ", ".join(_COLUMNS)
        marks = ", ".join("?" for _ in _COLUMNS)
        self._execute(f"INSERT INTO runs ({cols}) VALUES ({marks})", [values[k] for k in _COLUMNS])

    def update(self, run_id: str, *, expect_state: Optional[str] = None, **changes: Any) -> bool:
        """Set columns of one run; with `expect_state`, only if the run is still in that state (compare-and-set).
        Returns whether a row changed."""
        bad = set(changes) - set(_COLUMNS) - {"config"}
        if bad:
            raise KeyError(f"unknown registry columns: {sorted(bad)}")
        if "config" in changes:
            changes["config"] = json.dumps(changes["config"], sort_keys=True)
        sets = ", ".join(f"{k} = ?" for k in changes)
        sql = f"UPDATE runs SET {sets} WHERE id = ?"
        params = [*changes.values(), run_id]
        if expect_state is not None:
            sql += " AND state = ?"
            params.append(expect_state)
        sql += " RETURNING id"
        return bool(self._execute(sql, params))

    def finish(self, run_id: str, state: str, error: Optional[str] = None, *, expect_state: str = "running") -> bool:
        return self.update(run_id, expect_state=expect_state, state=state, error=error, finished_at=time.time())

    # ---- reads --------------------------------------------------------------------------------------------
    def get(self, run_id: str) -> Optional[RunRecord]:
        rows = self._execute("SELECT * FROM runs WHERE id = ?", [run_id])
        return RunRecord.from_row(rows[0]) if rows else None

    def find_by_run_dir(self, run_dir: str) -> Optional[RunRecord]:
        rows = self._execute("SELECT * FROM runs WHERE run_dir = ?", [run_dir])
        return RunRecord.from_row(rows[0]) if rows else None

    def list(self, states: Optional[Iterable[str]] = None, limit: Optional[int] = None,
             oldest_first: bool = False) -> list[RunRecord]:
        sql, params = "SELECT * FROM runs", []
        states = list(states) if states is not None else None
        if states is not None:
            sql += f" WHERE state IN ({', '.join('?' for _ in states)})"
            params += states
        sql += f" ORDER BY created_at {'ASC' if oldest_first else 'DESC'}, rowid {'ASC' if oldest_first else 'DESC'}"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        return [RunRecord.from_row(r) for r in self._execute(sql, params)]

    def count_by_state(self) -> dict[str, int]:
        rows = self._execute("SELECT state, COUNT(*) AS n FROM runs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

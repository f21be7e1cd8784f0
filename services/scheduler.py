"""The queue and the run state machine: pending -> running -> succeeded | failed | stopped.

One background loop calls `tick()` about once a second (and at once after a POST): it first reconciles every
running run with its launcher (finished? overdue stop?), then starts the oldest pending runs while fewer than
`max_concurrent` are running (FIFO by creation time; a run that cannot start because the cluster is unreachable
keeps its place and is retried on the next tick). All transitions happen under one lock, so a stop request
never races a launch.

On startup `recover()` re-attaches runs the registry says are running: a local process that is still the one
we started keeps running; one that is gone is concluded from its `progress.json` if it recorded a final state,
else marked failed ("process vanished while the server was down"). Ray jobs are simply polled again.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import threading
import time
from typing import Any, Optional

from schemas.api import FINAL_STATES
from schemas.config import RunConfig
from schemas.rundir import RunDir
from services.launcher import PENDING_NOTE, Launcher, LaunchError, Observation
from services.registry import Registry, RunRecord

log = logging.getLogger("lad.scheduler")

VANISHED = "process vanished while the server was down"
CPUS_PER_LOCAL_RUN = 2   # a training run keeps about two cores busy (step + data loading)
DEFAULT_RAY_CONCURRENT = 4


class NotFound(LookupError):
    pass


class Conflict(RuntimeError):
    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_max_concurrent(launcher_kind: str, cpus: Optional[int] = None) -> int:
    """Local: one run per CPUS_PER_LOCAL_RUN usable cores (at least 1). Ray: a fixed 4, since the cluster's
    size is not known here and Ray queues jobs beyond its resources itself; set --max-concurrent to match."""
    if launcher_kind == "ray":
        return DEFAULT_RAY_CONCURRENT
    return max(1, (cpus or usable_cpus()) // CPUS_PER_LOCAL_RUN)


def new_run_id() -> str:
    return "r-" + secrets.token_hex(6)


def conclude(obs: Observation, progress: Optional[dict[str, Any]], stop_requested: bool,
             stderr_tail: Optional[str] = None, killed_after_s: Optional[float] = None,
             gone_reason: str = "process exited without recording a final state") -> tuple[str, Optional[str]]:
    """The final (state, error) of a run that is no longer alive, from everything we know about its end."""
    p_state = (progress or {}).get("state")
    p_error = (progress or {}).get("error")
    if obs.outcome is not None:  # Ray's verdict
        if obs.outcome == "succeeded":
            return ("stopped", None) if p_state == "stopped" else ("succeeded", None)
        if obs.outcome == "stopped":
            return "stopped", None
        return "failed", p_error or obs.message or "Ray job failed"
    rc = obs.exit_code
    if rc == 0:  # the entrypoint's contract: exit 0 is success (or a clean stop)
        if p_state in FINAL_STATES:
            return p_state, (p_error if p_state == "failed" else None)
        return ("stopped" if stop_requested else "succeeded"), None
    if rc is not None:
        if stop_requested and rc < 0:
            note = f"did not stop within {killed_after_s:.0f} s; killed" if killed_after_s is not None else None
            return "stopped", note
        if rc < 0:
            return "failed", p_error or f"killed by signal {-rc}"
        return "failed", p_error or stderr_tail or f"exited with code {rc}"
    # exit code unknown: not our child (re-attached after a restart) or gone without a trace
    if p_state in FINAL_STATES:
        return p_state, (p_error if p_state == "failed" else None)
    if stop_requested:
        return "stopped", None
    return "failed", obs.message or gone_reason


class Scheduler:
    def __init__(self, registry: Registry, launcher: Launcher, max_concurrent: int, stop_grace_s: float = 30.0):
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.registry = registry
        self.launcher = launcher
        self.max_concurrent = max_concurrent
        self.stop_grace_s = stop_grace_s
        self.lock = threading.RLock()
        self.launcher_reachable: Optional[bool] = None
        self._killed: dict[str, float] = {}

    # ---- submission and stop (called by the API) ---------------------------------------------------------
    def submit(self, cfg: RunConfig, run_id: str) -> RunRecord:
        """Claim the run directory, write `config.yaml` into it and queue the run."""
        files = RunDir(cfg.run_dir)
        with self.lock:
            other = self.registry.find_by_run_dir(str(files.path))
            if other is not None:
                raise Conflict(f"run {other.id} already uses {files.path}; choose another name", "name")
            if not files.remote and files.path.local.is_symlink():  # it would write wherever the link points
                raise Conflict(f"{files.path} is a symbolic link; choose another name", "name")
            if not files.path.is_empty_folder():
                raise Conflict(f"{files.path} already exists and is not empty; choose another name", "name")
            files.create(cfg)
            rec = RunRecord(id=run_id, name=cfg.name, mode=cfg.mode, config=cfg.to_dict(), state="pending",
                            created_at=time.time(), run_dir=str(files.path), config_path=str(files.config_path),
                            launcher=self.launcher.kind)
            try:
                self.registry.insert(rec)
            except sqlite3.IntegrityError as e:
                raise Conflict(f"cannot register the run: {e}", "name") from None
        log.info("queued run %s (%s) in %s", rec.id, rec.name, rec.run_dir)
        return rec

    def stop(self, run_id: str) -> RunRecord:
        """Pending: stopped at once. Running: ask it to stop (idempotent). Finished: Conflict."""
        with self.lock:
            rec = self.registry.get(run_id)
            if rec is None:
                raise NotFound(run_id)
            if rec.state in FINAL_STATES:
                raise Conflict(f"run {run_id} already {rec.state}")
            if rec.state == "pending":
                self.registry.finish(run_id, "stopped", None, expect_state="pending")
            elif rec.stop_requested_at is None:
                self.launcher.stop(rec)  # LaunchError propagates: the caller answers 503
                self.registry.update(run_id, stop_requested_at=time.time())
                log.info("stop requested for run %s", run_id)
            return self.registry.get(run_id)

    # ---- the loop ------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """At startup: re-attach or conclude the runs a previous server left running."""
        with self.lock:
            for rec in self.registry.list(["running"]):
                if rec.launcher != self.launcher.kind or rec.launcher != "local":
                    continue  # Ray jobs are polled by the first tick
                obs = self.launcher.observe(rec)
                if obs.alive:
                    log.info("re-attached run %s (pid %s)", rec.id, rec.pid)
                    continue
                self._finish(rec, obs, gone_reason=VANISHED)

    def tick(self) -> None:
        with self.lock:
            for rec in self.registry.list(["running"]):
                self._reconcile(rec)
            free = self.max_concurrent - len(self.registry.list(["running"]))
            if free <= 0:
                return
            for rec in self.registry.list(["pending"], limit=free, oldest_first=True):
                if not self._launch(rec):
                    break  # the cluster is unreachable: keep the queue's order and retry next tick

    async def run_forever(self, wake: asyncio.Event, interval_s: float = 1.0) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:  # a bad tick must not end the loop: log it and try again
                log.exception("scheduler tick failed")
            try:
                await asyncio.wait_for(wake.wait(), timeout=interval_s)
            except asyncio.TimeoutError:
                pass
            wake.clear()

    # ---- transitions ---------------------------------------------------------------------------------------
    def _reconcile(self, rec: RunRecord) -> None:
        if rec.launcher != self.launcher.kind:
            note = (f"cannot watch this run: it was launched by the {rec.launcher} launcher but this server uses "
                    f"the {self.launcher.kind} one; restart the server as it was")
            if rec.error != note:
                self.registry.update(rec.id, error=note)
            return
        obs = self.launcher.observe(rec)
        if obs.alive is None:
            self.launcher_reachable = False
            return
        if self.launcher.kind == "ray":
            self.launcher_reachable = True
        if obs.alive:
            note = obs.message if obs.message and obs.message.startswith(PENDING_NOTE) else None
            if note != rec.error and (rec.error is None or rec.error.startswith(PENDING_NOTE)):
                self.registry.update(rec.id, error=note)  # Ray queues it: say so, and clear it once placed
            overdue = rec.stop_requested_at is not None and time.time() - rec.stop_requested_at > self.stop_grace_s
            if overdue and rec.id not in self._killed:
                log.warning("run %s did not stop within %.0f s; killing it", rec.id, self.stop_grace_s)
                self.launcher.kill(rec)
                self._killed[rec.id] = self.stop_grace_s
            return
        self._finish(rec, obs)

    def _finish(self, rec: RunRecord, obs: Observation, gone_reason: Optional[str] = None) -> None:
        files = RunDir(rec.run_dir)
        kwargs = {"gone_reason": gone_reason} if gone_reason else {}
        state, error = conclude(obs, files.progress(), rec.stop_requested_at is not None, files.stderr_tail(),
                                self._killed.pop(rec.id, None), **kwargs)
        self.registry.finish(rec.id, state, error)
        log.info("run %s %s%s", rec.id, state, f": {error}" if error else "")

    def _launch(self, rec: RunRecord) -> bool:
        try:
            ids = self.launcher.start(rec)
        except LaunchError as e:
            if e.transient:
                self.launcher_reachable = False
                note = f"waiting to launch: {e}"
                if rec.error != note:
                    self.registry.update(rec.id, expect_state="pending", error=note)
                return False
            self.registry.finish(rec.id, "failed", str(e), expect_state="pending")
            return True
        if self.launcher.kind == "ray":
            self.launcher_reachable = True
        self.registry.update(rec.id, expect_state="pending", state="running", started_at=time.time(), error=None,
                             **ids)
        log.info("started run %s (%s)", rec.id, ", ".join(f"{k}={v}" for k, v in ids.items() if v is not None))
        return True


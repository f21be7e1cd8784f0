"""The run directory (a contract read by tools and the control plane):

    config.yaml          the resolved run config
    categories.json      the training file's categories, [{"id", "name"}] in class-index order (checkpoints copy it)
    metrics.jsonl        one JSON object per logged step
    eval.json            a list of {"epoch", "step", "network", "stats": {AP, AP50, ...}}
    progress.json        {"state", "step", "total_steps", "epoch", "error", "pid", "time"}, rewritten atomically;
                         state running | recovering (with "recovery": attempt, max, reason) | succeeded |
                         stopped | failed
    checkpoints/last.pt  and best.pt (by AP)
    tensorboard/         TensorBoard event files of the same metrics and evaluations (`schemas.events`)
    control/roles.json   written by the control plane to change the CoLAD role policy mid-run
    logs/stdout.log      the run's output, and logs/stderr.log (its last line: the one-line failure message),
                         written by the control plane's local launcher
    .lock                held (flock) by the driver training the run, with its pid: a second one is refused

One class for both sides: the trainer writes through it, the control plane reads through it (and writes
control/roles.json). Torch-free on purpose: the server imports it and must start in a second, never loading torch.
Every reader tolerates a file that does not exist yet, and a `metrics.jsonl` line being appended right now.

A run directory may be on object storage (`output_dir: s3://bucket/runs`, `schemas.storage`). Every file there is
written whole by one upload, so readers see the old object or the new one. What has no object-store equivalent:
- append: the logging process keeps the `metrics.jsonl` lines it has not written yet and, at most every
  `REMOTE_FLUSH_S` seconds and at every checkpoint and state change, reads the object, adds them and writes it
  back (one process logs a run's metrics at a time; a resume rewinds the object as it does a file);
  `progress.json` is written on the same beat;
- TensorBoard's event files are written on this machine (`Location.cache`) and uploaded on the same beat;
- the lock: a flock on a file in the local cache, so two drivers on one machine never train one run (across
  machines an object store offers no lock: give runs distinct names);
- `logs/`: the control plane's launcher writes them in the local cache.
"""
from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from schemas.events import EventLog
from schemas.config import RunConfig, dump_config
from schemas.storage import Location

_TAIL_CHUNK = 64 * 1024
REMOTE_FLUSH_S = 10.0  # on object storage: the most seconds metrics, progress and events wait to be written


def json_ready(value: Any) -> Any:
    """JSON has no NaN: write null instead, so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def _read_json(path: Location) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None  # unreadable or torn by a non-atomic writer: treat as absent, the next poll sees it whole


def _records(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """metrics.jsonl records in order, stopping at a torn last line (one without its newline: being appended)."""
    for line in lines:
        if not line.endswith(b"\n"):
            return
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            return
        if isinstance(record, dict):
            yield record


class RunDirBusy(ValueError):
    """Another driver is training this run directory now."""


class RunDir:
    """Paths, writers and readers of one run directory."""

    def __init__(self, path: "str | Path | Location"):
        self.path = Location(path)
        self.config_path = self.path / "config.yaml"
        self.categories_path = self.path / "categories.json"
        self.metrics_path = self.path / "metrics.jsonl"
        self.eval_path = self.path / "eval.json"
        self.progress_path = self.path / "progress.json"
        self.checkpoints_dir = self.path / "checkpoints"
        self.roles_path = self.path / "control" / "roles.json"
        self.remote = self.path.remote
        self.logs_dir = Location(self.path.cache() / "logs") if self.remote else self.path / "logs"
        self.stdout_path = self.logs_dir / "stdout.log"
        self.stderr_path = self.logs_dir / "stderr.log"
        # tensorboard/: the same metrics and evaluations as TensorBoard events (staged here, uploaded when remote)
        self.events = EventLog(self.path / "tensorboard")
        self._roles_seen: Optional[dict] = None
        self._roles_checked = 0.0
        self._lock_fd: Optional[int] = None
        self._pending: list[dict] = []  # remote: metrics lines not written yet
        self._progress: Optional[dict] = None  # remote: the progress record not written yet
        self._flushed = 0.0

    def __getstate__(self) -> dict:
        return {"path": self.path.uri}  # a RunDir sent to another process starts with nothing pending there

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    # ---- the driver's lock ------------------------------------------------------------------------------
    def claim(self) -> None:
        """Hold the run's lock until `release` (or this process ends: the kernel drops it, so a killed run never
        leaves a stale lock). Raises `RunDirBusy` naming the holder's pid when another process holds it."""
        import fcntl

        self.path.mkdir()
        lock = self.path.cache() / ".lock" if self.remote else self.path.local / ".lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(f"{self.path}: another `lad train` (pid {holder}) is training this run now; wait for "
                             "it to end, stop it (SIGTERM, or POST /runs/{id}/stop), or give this run another "
                             "name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # ---- config and checkpoints -------------------------------------------------------------------------
    def create(self, cfg: RunConfig) -> None:
        """Make the directory (and checkpoints/) and write config.yaml."""
        self.checkpoints_dir.mkdir()
        self.config_path.write_text(dump_config(cfg))

    def write_categories(self, categories: list[dict[str, Any]]) -> None:
        self.categories_path.write_text(json.dumps([{"id": c["id"], "name": c.get("name")} for c in categories]))

    def categories(self) -> Optional[list[dict[str, Any]]]:
        """The run's categories in class order, or None (a run directory made before they were recorded)."""
        data = _read_json(self.categories_path)
        return data if isinstance(data, list) else None

    @property
    def last(self) -> Location:
        return self.checkpoints_dir / "last.pt"

    @property
    def best(self) -> Location:
        return self.checkpoints_dir / "best.pt"

    def checkpoints(self) -> list[dict[str, Any]]:
        """The checkpoint files: {"name", "path", "size", "modified_at"}, by name."""
        return [{"name": loc.name, "path": str(loc), "size": size,
                 "modified_at": datetime.fromtimestamp(mtime, timezone.utc)}
                for loc, size, mtime in self.checkpoints_dir.files()
                if not loc.name.startswith(".")]  # temporary files of an atomic write in progress

    # ---- metrics.jsonl ----------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """Append one line. A failed append (a full disk) may leave a torn last line: every reader stops before
        it, and a resume rewinds it away. On object storage the line waits for the next `flush`."""
        self.events.metrics(record)
        if self.remote:
            self._pending.append(json_ready(record))
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(json_ready(record)) + "\n")
        except OSError as e:
            raise OSError(e.errno, f"{self.metrics_path}: appending a metrics line failed ({e.strerror or e}); "
                          "the lines before it are kept") from e

    def flush(self, force: bool = True) -> None:
        """On object storage: write the pending metrics lines, progress and TensorBoard events (unless `force` is
        off and the last write is under `REMOTE_FLUSH_S` old). Locally everything is written already."""
        if not self.remote or (not force and time.monotonic() - self._flushed < REMOTE_FLUSH_S):
            return
        if self._pending:
            old = self._metrics_bytes()
            self.metrics_path.write_bytes(old + "".join(json.dumps(m) + "\n" for m in self._pending).encode())
            self._pending = []
        if self._progress is not None:
            self.progress_path.write_text(json.dumps(self._progress))
            self._progress = None
        self.events.upload()
        self._flushed = time.monotonic()

    def _metrics_bytes(self) -> bytes:
        try:
            data = self.metrics_path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return b""
        return data if data.endswith(b"\n") or not data else data[:data.rfind(b"\n") + 1]

    def iter_metrics(self) -> Iterator[dict[str, Any]]:
        """Records in file order; stops at a torn last line (the writer is appending it)."""
        if self.remote:
            yield from _records(self._metrics_bytes().splitlines(keepends=True))
            return
        try:
            f = open(self.metrics_path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return
        with f:
            yield from _records(f)

    def metrics_page(self, since: Optional[int], limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Up to `limit` records with step > since (all when since is None), and whether more follow."""
        items: list[dict[str, Any]] = []
        for record in self.iter_metrics():
            step = record.get("step")
            if since is not None and (not isinstance(step, (int, float)) or step <= since):
                continue
            if len(items) == limit:
                return items, True
            items.append(record)
        return items, False

    def latest_metrics(self) -> Optional[dict[str, Any]]:
        """The last complete record, read from the end of the file (metrics files grow to many MB)."""
        if self.remote:  # one ranged read of the tail; the whole object only for a last line longer than it
            try:
                tail = self.metrics_path.read_from(-_TAIL_CHUNK)
            except (FileNotFoundError, OSError):
                return None
            lines = tail.split(b"\n")[:-1] if len(tail) < _TAIL_CHUNK else tail.split(b"\n")[1:-1]
            for line in reversed(lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    return record
            records = [] if len(tail) < _TAIL_CHUNK else list(self.iter_metrics())
            return records[-1] if records else None
        try:
            with open(self.metrics_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                end = f.tell()
                start = max(0, end - _TAIL_CHUNK)
                while True:
                    f.seek(start)
                    chunk = f.read(end - start)
                    lines = chunk.split(b"\n")
                    # lines[-1] is "" after a complete last line, else a torn line: skip it either way
                    candidates = lines[:-1] if start == 0 else lines[1:-1]
                    for line in reversed(candidates):
                        try:
                            record = json.loads(line)
                        except ValueError:
                            continue
                        if isinstance(record, dict):
                            return record
                    if start == 0:
                        return None
                    start = max(0, start - _TAIL_CHUNK)
        except (FileNotFoundError, NotADirectoryError):
            return None

    # ---- eval.json --------------------------------------------------------------------------------------
    def evals(self) -> list[dict[str, Any]]:
        data = _read_json(self.eval_path)
        return data if isinstance(data, list) else []

    def _write_evals(self, evals: list[dict[str, Any]]) -> None:
        self.eval_path.write_text(json.dumps(evals, indent=1))

    def add_eval(self, record: dict) -> None:
        """Add an evaluation; one of the same (epoch, step, network) is replaced: an attempt that evaluated and died
        before its checkpoint leaves an entry of the step it resumes at, and the resumed run evaluates it again."""
        record = json_ready(record)

        def key(e: dict) -> tuple:
            return e.get("epoch"), e.get("step"), e.get("network")

        self._write_evals([e for e in self.evals() if key(e) != key(record)] + [record])
        self.events.evaluation(record)
        self.flush()

    # ---- resume -----------------------------------------------------------------------------------------
    def rewind(self, step: int) -> None:
        """On resume from the checkpoint of `step`: drop the metrics.jsonl lines and eval.json entries of later
        steps (the resumed run logs and evaluates them again). Each file is rewritten atomically; a file that
        does not exist is left absent."""
        self.rewound(step)
        if self.metrics_path.exists():
            kept = [m for m in self.iter_metrics() if m.get("step", 0) <= step]
            self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        if self.eval_path.exists():
            self._write_evals([e for e in self.evals() if e.get("step", 0) <= step])

    def rewound(self, step: int) -> None:
        """This process's side of a rewind to `step` (done here or by another process): the lines it has not
        written yet that come after `step` are dropped, and its next TensorBoard event starts a new session."""
        self._pending = [m for m in self._pending if m.get("step", 0) <= step]
        self.flush()
        self.events.reset()

    # ---- other files ------------------------------------------------------------------------------------
    def write_json(self, name: str, data: Any) -> None:
        """A run file of its own (e.g. co-learning's colearn.json), written whole, NaN as null."""
        (self.path / name).write_text(json.dumps(json_ready(data)))

    # ---- progress.json ----------------------------------------------------------------------------------
    def set_progress(self, state: str, step: int, total_steps: int, epoch: int, error: str | None = None,
                     recovery: dict[str, Any] | None = None) -> None:
        """`recovery` ({"attempt", "max", "reason"}) goes with state `recovering`: a lost process is being
        replaced and the run resumes from `step`, its last checkpoint, until the new workers log a step.
        On object storage a `running` record waits for the next flush; every other state is written at once."""
        record = {"state": state, "step": step, "total_steps": total_steps, "epoch": epoch, "error": error,
                  "pid": os.getpid(), "time": time.time()}
        if recovery is not None:
            record["recovery"] = recovery
        if self.remote:
            self._progress = record
            self.flush(force=state != "running" or not self._flushed)
            return
        self.progress_path.write_text(json.dumps(record))

    def fail(self, error: str) -> None:
        """State `failed` with its one-line reason, at the step and epoch the run had reached."""
        p = self.progress() or {}
        self.set_progress("failed", p.get("step", 0), p.get("total_steps", 0), p.get("epoch", 0), error=error)

    def progress(self) -> Optional[dict[str, Any]]:
        if self._progress is not None:
            return dict(self._progress)  # this process's, not written yet (object storage)
        data = _read_json(self.progress_path)
        return data if isinstance(data, dict) else None

    # ---- logs/ ------------------------------------------------------------------------------------------
    def stderr_tail(self) -> Optional[str]:
        """The last non-empty stderr line: the entrypoint's one-line failure message."""
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 8192))
                text = f.read().decode("utf-8", "replace")
        except (FileNotFoundError, NotADirectoryError):
            return None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return lines[-1][:2000] if lines else None

    # ---- control/roles.json -----------------------------------------------------------------------------
    def request_roles(self, policy: str) -> dict[str, Any]:
        """The control plane's side: ask the running trainer to switch the role policy."""
        payload = {"policy": policy, "requested_at": time.time()}
        self.roles_path.write_text(json.dumps(payload))
        return payload

    def roles_request(self) -> Optional[dict[str, Any]]:
        """The current request ({"policy", "requested_at"}), or None when there is none (or it is malformed)."""
        data = _read_json(self.roles_path)
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            return None
        return data

    def new_roles_request(self) -> Optional[dict[str, Any]]:
        """The trainer's side: the request, when it differs from the one seen at the last look (by content: two
        requests within an mtime's resolution, a second on object storage, would look like one). On object
        storage looked at once a second: each look is a request."""
        if self.remote:
            if time.monotonic() - self._roles_checked < 1.0:
                return None
            self._roles_checked = time.monotonic()
        request = self.roles_request()
        if request is None or request == self._roles_seen:
            return None
        self._roles_seen = request
        return request

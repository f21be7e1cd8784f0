"""Read-only views of a run directory (the CONTRACT files) for the control plane, plus the one file it writes.

Kept separate from `pipeline.rundir` on purpose: that module imports torch (checkpoint I/O), and the server
must start in a second and never load torch. Every reader tolerates a file that does not exist yet or a
`metrics.jsonl` line being appended right now.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

from schemas.files import atomic_write_json

_TAIL_CHUNK = 64 * 1024


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        return None  # unreadable or torn by a non-atomic writer: treat as absent, the next poll sees it whole


class RunFiles:
    """Paths and readers for one run directory."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self.config_path = self.path / "config.yaml"
        self.metrics_path = self.path / "metrics.jsonl"
        self.eval_path = self.path / "eval.json"
        self.progress_path = self.path / "progress.json"
        self.checkpoints_dir = self.path / "checkpoints"
        self.roles_path = self.path / "control" / "roles.json"
        self.logs_dir = self.path / "logs"
        self.stdout_path = self.logs_dir / "stdout.log"
        self.stderr_path = self.logs_dir / "stderr.log"

    def progress(self) -> Optional[dict[str, Any]]:
        data = _read_json(self.progress_path)
        return data if isinstance(data, dict) else None

    def evals(self) -> list[dict[str, Any]]:
        data = _read_json(self.eval_path)
        return data if isinstance(data, list) else []

    def checkpoints(self) -> list[dict[str, Any]]:
        out = []
        try:
            entries = sorted(os.scandir(self.checkpoints_dir), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            return []
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_file():
                continue  # temporary files of an atomic write in progress
            st = entry.stat()
            out.append({"name": entry.name, "path": entry.path, "size": st.st_size,
                        "modified_at": datetime.fromtimestamp(st.st_mtime, timezone.utc)})
        return out

    def iter_metrics(self) -> Iterator[dict[str, Any]]:
        """Records in file order; stops at a torn last line (the writer is appending it)."""
        try:
            f = open(self.metrics_path, "rb")
        except (FileNotFoundError, NotADirectoryError):
            return
        with f:
            for line in f:
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

    def roles_request(self) -> Optional[dict[str, Any]]:
        data = _read_json(self.roles_path)
        if not isinstance(data, dict) or not isinstance(data.get("policy"), str):
            return None
        return data

    def request_roles(self, policy: str) -> dict[str, Any]:
        payload = {"policy": policy, "requested_at": time.time()}
        atomic_write_json(self.roles_path, payload)
        return payload

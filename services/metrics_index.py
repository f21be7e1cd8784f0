"""The control plane's incremental view of a run's growing metrics.jsonl, for GET /runs/{id}/metrics and /roles.

Both routes used to read the whole file per call: a 90,000-step co-learning run's is 81 MB, 0.85 s to read here
(bench/metrics_index.py), and the run page asks for both every 2 s (on object storage, a download of the whole object each time). An index
per run keeps where each record's line starts, its step, and the roles view (teacher ratios, policy changes); a
call reads only what was appended since the last one, in one ranged read, and a page only its own lines. A run
that resumes rewrites the file without the lines after its checkpoint: the bytes just before the index's end then
differ, and the index starts over from the top.
"""
from __future__ import annotations

import json
import math
import threading
from array import array
from collections import deque
from typing import Any, Optional

import numpy as np

from schemas.api import RolesChange, RolesPoint
from schemas.rundir import RunDir

CHECK_BYTES = 64        # the indexed bytes that must be unchanged at the next look for the file to have only grown
ROLES_HISTORY_MAX = 10_000


class MetricsIndex:
    """One run's index; `lock` it around `refresh` and what reads the index after it (routes run in threads)."""

    def __init__(self, run: RunDir):
        self.run = run
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.end = 0                      # bytes indexed: whole, readable lines only
        self.check = b""                  # the last CHECK_BYTES of them
        self.starts = array("q")          # where each record's line starts
        self.steps = array("d")           # its step (NaN: none)
        self.history: deque[RolesPoint] = deque(maxlen=ROLES_HISTORY_MAX)
        self.changes: list[RolesChange] = []
        self.reported: Optional[str] = None   # the policy the trainer logged last

    def refresh(self) -> None:
        """Index what was appended since the last call (all of it when the file was rewritten or is new)."""
        data = self._read(self.end - len(self.check))
        if data is None or not data.startswith(self.check):
            self._reset()
            data = self._read(0) or b""
        self._index(data[len(self.check):])

    def _read(self, start: int, size: Optional[int] = None) -> Optional[bytes]:
        try:
            return self.run.metrics_path.read_from(start, size)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _index(self, new: bytes) -> None:
        pos = 0
        while (newline := new.find(b"\n", pos)) >= 0:
            line = new[pos:newline].strip()
            if line:
                try:
                    record = json.loads(line)
                except ValueError:
                    break                 # as `RunDir.iter_metrics`: nothing after an unreadable line
                if isinstance(record, dict):
                    step = record.get("step")
                    self.starts.append(self.end + pos)
                    self.steps.append(float(step) if isinstance(step, (int, float)) else math.nan)
                    self._add_roles(record)
            pos = newline + 1
        self.check = (self.check + new[:pos])[-CHECK_BYTES:]
        self.end += pos

    def _add_roles(self, m: dict[str, Any]) -> None:
        if "teacher_ratio" not in m and "policy" not in m:
            return
        if m.get("event") == "policy" and isinstance(m.get("policy"), str):
            self.changes.append(RolesChange(from_step=int(m.get("step", 0)) + 1, policy=m["policy"]))
        ratio = m.get("teacher_ratio")
        by_level, by_size = m.get("teacher_ratio_by_level"), m.get("teacher_ratio_by_size")
        self.history.append(RolesPoint(step=int(m.get("step", 0)), epoch=m.get("epoch"), policy=m.get("policy"),
                                       teacher_ratio=ratio if isinstance(ratio, (int, float)) else None,
                                       teacher_ratio_by_level=by_level if isinstance(by_level, list) else None,
                                       teacher_ratio_by_size=by_size if isinstance(by_size, dict) else None))
        if isinstance(m.get("policy"), str):
            self.reported = m["policy"]

    def page(self, since: Optional[int], limit: int) -> tuple[list[dict[str, Any]], bool]:
        """`RunDir.metrics_page` from the index: up to `limit` records with step > since (all when since is None),
        and whether more follow; one ranged read of their lines."""
        steps = np.frombuffer(self.steps, dtype=np.float64)
        picked = (np.arange(len(steps)) if since is None else np.flatnonzero(steps > since)).tolist()  # NaN: never
        more, picked = len(picked) > limit, picked[:limit]
        if not picked:
            return [], more
        first, last = picked[0], picked[-1]
        stop = self.starts[last + 1] if last + 1 < len(self.starts) else self.end
        data = self._read(self.starts[first], stop - self.starts[first]) or b""
        items = []
        for i in picked:
            at = self.starts[i] - self.starts[first]
            try:
                record = json.loads(data[at:data.index(b"\n", at)])
            except ValueError:
                record = None
            step = record.get("step") if isinstance(record, dict) else None
            indexed = float(step) if isinstance(step, (int, float)) else math.nan
            if record is None or not (indexed == self.steps[i] or math.isnan(indexed) and math.isnan(self.steps[i])):
                return self.run.metrics_page(since, limit)   # rewritten since the refresh: the way the index spares
            items.append(record)
        return items, more

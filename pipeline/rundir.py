"""The run directory (a contract read by tools and the control plane):

    config.yaml          the resolved run config
    metrics.jsonl        one JSON object per logged step
    eval.json            a list of {"epoch", "step", "network", "stats": {AP, AP50, ...}}
    progress.json        {"state", "step", "total_steps", "epoch", "error", "pid"}, rewritten atomically
    checkpoints/last.pt  and best.pt (by AP)
    control/roles.json   written by the control plane to change the CoLAD role policy mid-run
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from schemas.config import RunConfig, dump_config
from schemas.files import atomic_write_text


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead, so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_path = self.path / "metrics.jsonl"
        self.eval_path = self.path / "eval.json"
        self.progress_path = self.path / "progress.json"
        self.roles_path = self.path / "control" / "roles.json"
        self._roles_mtime = 0.0

    def create(self, cfg: RunConfig) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / "config.yaml", dump_config(cfg))

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(_clean(record)) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written right now
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop lines logged after the checkpoint we resume from (they will be logged again)."""
        kept = [m for m in self.read_metrics() if m.get("step", 0) <= after_step]
        atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in kept))

    def read_evals(self) -> list[dict]:
        if not self.eval_path.exists():
            return []
        return json.loads(self.eval_path.read_text())

    def add_eval(self, record: dict) -> None:
        evals = self.read_evals() + [_clean(record)]
        atomic_write_text(self.eval_path, json.dumps(evals, indent=1))

    def set_progress(self, state: str, step: int, total_steps: int, epoch: int, error: str | None = None) -> None:
        atomic_write_text(self.progress_path, json.dumps(
            {"state": state, "step": step, "total_steps": total_steps, "epoch": epoch, "error": error,
             "pid": os.getpid(), "time": time.time()}))

    def requested_policy(self) -> str | None:
        """The role policy the control plane asked for, if the request file changed since the last look."""
        try:
            mtime = self.roles_path.stat().st_mtime
        except FileNotFoundError:
            return None
        if mtime == self._roles_mtime:
            return None
        try:
            policy = json.loads(self.roles_path.read_text()).get("policy")
        except (OSError, json.JSONDecodeError):
            return None
        self._roles_mtime = mtime
        return policy

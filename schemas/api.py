"""REST request/response models of the control plane (no torch, no server code: clients can import these).

A POSTed run body *is* a run config (`RunCreate` = `schemas.config.RunConfig`), validated by the same models as
YAML files and `--set`. Every error the service returns has one shape, `ErrorResponse`:

    {"detail": {"message": "...", "field": "train.lr" | null, "errors": [{"field": ..., "message": ...}]}}

`field` is the dotted path of the (first) field at fault; `errors` lists all of them for 422 responses.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from schemas.config import RunConfig
from schemas.policy import PolicyName

RunState = Literal["pending", "running", "succeeded", "failed", "stopped"]
RUN_STATES: tuple[str, ...] = ("pending", "running", "succeeded", "failed", "stopped")
FINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "stopped"})
Launcher = Literal["local", "ray"]

RunCreate = RunConfig
"""The body of `POST /runs`: a run config. `name` defaults to the run id, `output_dir` to the server's runs root."""


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- errors -------------------------------------------------------------------------------------------------
class FieldError(_Out):
    field: Optional[str] = Field(None, description="dotted path of the field, e.g. `train.lr`; null: the whole body")
    message: str


class ErrorDetail(_Out):
    message: str
    field: Optional[str] = None
    errors: list[FieldError] = Field(default_factory=list, description="every field at fault (422 only)")


class ErrorResponse(_Out):
    detail: ErrorDetail


# ---- runs ---------------------------------------------------------------------------------------------------
class Progress(BaseModel):
    """`progress.json` as the run last wrote it (extra keys the trainer adds are kept)."""
    model_config = ConfigDict(extra="allow")
    state: Optional[str] = None
    step: Optional[int] = None
    total_steps: Optional[int] = None
    epoch: Optional[int] = None
    error: Optional[str] = None
    pid: Optional[int] = None
    recovery: Optional[dict[str, Any]] = Field(
        None, description="with state 'recovering' (engine ray): a lost process (a training worker, the stream "
        "monitor, the co-learning coordinator) is being replaced and the run resumes from its last checkpoint, "
        "`step`. {attempt, max (pipeline.max_failures), reason, since (epoch seconds)}. The run's own state stays "
        "'running'")


class Checkpoint(_Out):
    name: str
    path: str
    size: int
    modified_at: datetime


class RunSummary(_Out):
    id: str
    name: str
    mode: str
    state: RunState
    created_at: datetime
    started_at: Optional[datetime] = None
    finished_at: Optional[datetime] = None
    run_dir: str
    launcher: Launcher
    ray_job_id: Optional[str] = None
    pid: Optional[int] = None
    stop_requested: bool = Field(False, description="a stop was asked for; the run ends after its current step")
    error: Optional[str] = None


class RunDetail(RunSummary):
    config: dict[str, Any]
    progress: Optional[Progress] = None
    latest_metrics: Optional[dict[str, Any]] = None
    checkpoints: list[Checkpoint] = Field(default_factory=list)
    eval: list[dict[str, Any]] = Field(default_factory=list, description="`eval.json`: one entry per evaluation")


class RunList(_Out):
    runs: list[RunSummary]


class MetricsPage(_Out):
    run_id: str
    items: list[dict[str, Any]] = Field(description="`metrics.jsonl` records with step > since, in file order")
    next_since: Optional[int] = Field(None, description="pass as `since` to get the next page; null: no records")
    has_more: bool = Field(description="more records follow this page right now")


# ---- co-learning roles --------------------------------------------------------------------------------------
class RolesUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: PolicyName = Field(description="auto | pin-a | pin-b | alternate:N", examples=["auto", "alternate:100"])


class RolesRequest(_Out):
    """The last policy change asked for (`<run_dir>/control/roles.json`)."""
    policy: str
    requested_at: datetime


class RolesPoint(_Out):
    step: int
    epoch: Optional[int] = None
    policy: Optional[str] = None
    teacher_ratio: Optional[float] = Field(None, description="share of (GT, level) pairs where network B taught")
    teacher_ratio_by_level: Optional[list[Optional[float]]] = Field(
        None, description="the same per FPN level, finest first (null: no object had candidates there)")
    teacher_ratio_by_size: Optional[dict[str, Optional[float]]] = Field(
        None, description="the same per object size (small/medium/large by GT area in input pixels, COCO bounds)")


class RolesChange(_Out):
    """A policy the trainer switched to, and the first step (metrics.jsonl numbering) trained under it."""
    from_step: int
    policy: str


class RolesState(_Out):
    run_id: str
    policy: str = Field(description="the policy in force: the trainer's last report, else the request, else config")
    requested: Optional[RolesRequest] = None
    applied: bool = Field(description="the trainer reported the requested policy (true when nothing was requested)")
    history: list[RolesPoint] = Field(default_factory=list)
    changes: list[RolesChange] = Field(default_factory=list, description="policy switches the trainer logged "
                                       "(`{\"event\": \"policy\"}` lines of metrics.jsonl), oldest first")


# ---- health -------------------------------------------------------------------------------------------------
class Health(_Out):
    status: Literal["ok"] = "ok"
    launcher: Launcher
    ray_address: Optional[str] = None
    ray_reachable: Optional[bool] = Field(None, description="last poll of the Ray job server (null: local launcher)")
    max_concurrent: int
    runs: dict[str, int] = Field(description="number of runs per state")

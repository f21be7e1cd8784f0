"""Where the pipeline's Ray runs, what it may use, and the small actor that watches the stream.

Which Ray: `pipeline.ray_address` if set; else `RAY_ADDRESS` (set by `ray job submit` for its entrypoint);
else a private local Ray started in this process with `ray.init(address="local")`, so a cluster someone left
running on this machine never captures a local run. A Ray this module started is shut down by it.

Resources (see docs/pipeline.md, "Sizing"): every Ray process the pipeline starts asks for the fractional
CPUs/GPUs of the config, and Ray Data gets an explicit budget = the cluster minus what the Train workers hold,
because Ray's defaults (a whole CPU for each task, actor and worker) deadlock a 2-core machine.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray

from schemas.config import ConfigError, RunConfig
from schemas.modes import mode_spec

PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class PipelineResourceError(ConfigError):
    """The configured pool and workers cannot fit the Ray cluster; the message says what to change."""


def connect(cfg: RunConfig, *, verbose: bool = False) -> bool:
    """Make sure Ray is initialised for this run. Returns True when this call started it (then call `shutdown`).

    Quiet unless `verbose`: the workers' and actors' output (Ray Train's controller, Ray Data, C++ core lines)
    stays in Ray's log files (`<session>/logs`), and the driver's Ray logger shows errors only. Our own errors
    still reach the console, as one line through the hub (`RunLost`, "training failed: ...")."""
    if ray.is_initialized():
        return False
    address = cfg.pipeline.ray_address or os.environ.get("RAY_ADDRESS")
    common = dict(log_to_driver=verbose, configure_logging=True,
                  logging_level=logging.INFO if verbose else logging.ERROR)
    if address:
        # An existing cluster (`ray job submit`, or pipeline.ray_address). Token auth: the token comes from
        # RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, as for every Ray client (docs/pipeline.md).
        ray.init(address=address, **common)
    else:
        init_local(**common)
    return True


def init_local(num_cpus: Optional[float] = None, object_store_memory: Optional[int] = None, **kwargs) -> None:
    """A private Ray in this process (never an existing cluster), whose workers import this project.

    The dashboard stays on (Ray Train V2 reads actor states through it, the state API) on a free port, and
    every process of this Ray is told that address (`RAY_API_SERVER_ADDRESS`): otherwise, with another Ray on
    the same machine, Train's placement-group cleaner cannot tell which cluster is its own and logs errors.
    Train's print patch and its preemption watcher are off in its workers (see below).
    """
    port = _free_port()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p),
           "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
           # Ray Train sends every print() of a worker to its logger, past redirect_stdout: pycocotools' tables
           # would reach the console from each evaluation. Our own lines go to stderr directly.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
           # Train's preemption watcher (one more actor process per worker group) polls for nodes being drained;
           # a private Ray on one machine has none to drain.
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), object_store_memory=object_store_memory,
             include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": env}, **kwargs)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown(started: bool) -> None:
    if started and ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class Budget:
    """What the Train workers hold, and what is left to Ray Data (`configure_data_context`)."""
    train_cpus: float
    data_cpus: float
    data_gpus: float


def worker_resources(cfg: RunConfig, group: str) -> tuple[float, float]:
    """(CPUs, GPUs) of each Train worker of a group; side B of split co-learning may have its own."""
    p, c = cfg.pipeline, cfg.colearn
    if group == "b":
        return (p.cpus_per_worker if c.cpus_per_worker_b is None else c.cpus_per_worker_b,
                p.gpus_per_worker if c.gpus_per_worker_b is None else c.gpus_per_worker_b)
    return p.cpus_per_worker, p.gpus_per_worker


def local_resources() -> dict[str, float]:
    """What the private local Ray of `init_local` will have: every CPU of this machine, and its CUDA devices."""
    import torch

    return {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}


def budget(cfg: RunConfig, groups: tuple[str, ...] = ("a",), stream: bool = True,
           resources: Optional[dict] = None, teacher_pool: bool = True) -> Budget:
    """Check that the Train worker group(s) (co-learning split: side B's may differ), the assigner pool and at least
    one read task (the stream) fit, before anything starts (Ray would otherwise wait forever for a resource that
    never frees). `resources`: the cluster's, default what the connected Ray reports (`local_resources()` checks
    a local run before its Ray starts). `teacher_pool` off: a LAD stream whose labels are all stored."""
    p = cfg.pipeline
    res = ray.cluster_resources() if resources is None else resources
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    train_cpus, train_gpus = (sum(p.num_workers * worker_resources(cfg, g)[k] for g in groups) for k in (0, 1))
    assigners = p.assigners if stream and teacher_pool and mode_spec(cfg.mode).needs_teacher else 0
    pool_cpus, pool_gpus = assigners * p.cpus_per_assigner, assigners * p.gpus_per_assigner
    read_cpus = p.cpus_per_read_task if stream else 0.0
    need_cpus = train_cpus + pool_cpus + read_cpus
    side_b = " / colearn.cpus_per_worker_b / gpus_per_worker_b" if "b" in groups else ""
    problems = []
    if need_cpus > cpus + 1e-9:
        problems.append(
            f"CPU: {len(groups)} x {p.num_workers} workers ({train_cpus:g}) + {assigners} assigners x "
            f"{p.cpus_per_assigner} + {'one read task x ' + str(p.cpus_per_read_task) if stream else 'no read task'}"
            f" = {need_cpus:g} > {cpus:g} in the cluster; lower pipeline.num_workers / cpus_per_worker / "
            f"cpus_per_assigner / assigners{side_b}")
    if train_gpus + pool_gpus > gpus + 1e-9:
        problems.append(f"GPU: workers need {train_gpus:g} and assigners {pool_gpus:g} but the cluster has "
                        f"{gpus:g}; set pipeline.gpus_per_worker / gpus_per_assigner{side_b} to 0 (CPU) or fewer")
    if problems:
        raise PipelineResourceError("the pipeline does not fit the Ray cluster: " + "; ".join(problems))
    return Budget(train_cpus, cpus - train_cpus, gpus - train_gpus)


def configure_data_context(b: Budget):
    """Ray Data settings of the stream: ordered output, the CPU/GPU budget left by the Train workers, a teacher pool
    that grows once all its actors are busy (each takes one batch at a time, so Ray's default threshold, 1.75 tasks
    per actor, is never reached). Returns the ExecutionOptions the Train ingest must use (copied per shard)."""
    import dataclasses

    from ray.data import DataContext, ExecutionOptions, ExecutionResources

    ctx = DataContext.get_current()
    ctx.autoscaling_config = dataclasses.replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True
    limits = ExecutionResources(cpu=b.data_cpus, gpu=b.data_gpus)
    ctx.execution_options.resource_limits = limits
    return ExecutionOptions(resource_limits=limits, preserve_order=True)


@ray.remote(num_cpus=0)
class StreamMonitor:
    """Counters of the stream, the bound on its run-ahead, the stop request of the driver (SIGTERM), the first error
    of a worker and the final result of the run. Tiny, zero-CPU, one per run: the stream's hub, as the coordinator
    is co-learning's (`pipeline.ray_driver`).

    Run-ahead: a stage that makes a batch asks `admit(key)` first, and waits until the batch is among the next
    `max_ahead` of the plan counted from the first batch not yet trained on (`consumed(key)`, from the worker that
    stepped on it). A window in plan order, not a count: the stream delivers batches in plan order, so a count
    could admit later batches ahead of an earlier one that then never gets in. Batches are keyed by (epoch,
    batch_index) and placed in the plan by `set_plan`'s epoch offsets; a batch re-run after a lost actor is
    admitted again at once."""

    def __init__(self, max_ahead: int = 1 << 30):
        self.max_ahead = int(max_ahead)
        self.stop = False
        self.error: Optional[str] = None
        self.result_: dict = {}
        self.rewind(0, {})

    def rewind(self, step: int, best: dict) -> None:
        """A new attempt (after a lost worker, resuming from the checkpoint of `step`) starts a new stream."""
        self.offsets: dict = {}
        self.pending: set = set()    # admitted, not yet consumed: within [low, low + max_ahead)
        self.consumed: set = set()   # consumed, at or above low
        self.low = 0                 # the first batch of the plan not yet consumed
        self.peak_backlog = 0

    def set_plan(self, offsets: dict) -> None:
        """The plan of this attempt: epoch -> the position of its first batch in the run's order."""
        self.offsets = {int(e): int(o) for e, o in offsets.items()}

    def _seq(self, key) -> int:
        epoch, index = (int(v) for v in key)
        return self.offsets.get(epoch, 0) + index

    def admit(self, key) -> bool:
        """Whether the batch `key` may be made now."""
        seq = self._seq(key)
        if seq in self.pending or seq < self.low + self.max_ahead:
            self.pending.add(seq)
            self.peak_backlog = max(self.peak_backlog, len(self.pending))
            return True
        return False

    def report_consumed(self, key) -> None:
        seq = self._seq(key)
        self.pending.discard(seq)
        self.consumed.add(seq)
        while self.low in self.consumed:
            self.consumed.discard(self.low)
            self.low += 1

    def backlog_stats(self) -> dict:
        """backlog: batches admitted and not yet trained on, the stream's queue depth (in the making, queued,
        prefetched)."""
        return {"backlog": len(self.pending), "peak_backlog": self.peak_backlog}

    def request_stop(self) -> None:
        self.stop = True

    def should_stop(self) -> bool:
        return self.stop

    def set_result(self, result: dict) -> None:
        self.result_ = result

    def result(self) -> dict:
        return self.result_

    def abort(self, message: str) -> None:
        """A worker failed in our code (not a lost process): the first message is the run's error."""
        if self.error is None:
            self.error = message

    def error_message(self) -> Optional[str]:
        return self.error

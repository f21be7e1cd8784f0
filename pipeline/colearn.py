"""The co-learning coordinator: one named Ray actor per CoLAD run that owns the teacher/student role exchange.

    control plane ──PUT /runs/{id}/roles──> <run_dir>/control/roles.json ──(polled every 50 ms)──> coordinator
    coordinator ──(version bump, long-poll answer)──> trainers: the new policy applies from their next step

What it holds: the role policy (`auto`, `pin-a`, `pin-b`, `alternate:N`) and a version number bumped by every
change; the history of policy changes with the step each took effect from; the role statistics of every step
(teacher ratio = share of (GT, level) pairs where B taught, per FPN level and per object size); the run's stop
request and final result.

Found by name: `ray.get_actor(coordinator_name(cfg), namespace=NAMESPACE)`; created with `get_if_exists`, so a
driver that restarts (or a tool attached to the cluster) finds the live one instead of a second one.

Trainers read the policy each step without waiting (`PolicyWatch`, measured in bench/colearn.py): a change
reaches them at their first step after the file poll (50 ms) saw it.

Split co-learning (`exchange`, `finish`, `sync`): the two worker groups meet here every step, keyed by (step,
rank) with the image ids checked, and the coordinator merges their sparse candidate losses under the policy it
freezes for that step (`trainer.colad.merge_sparse`: `colad_merge` + PAA selection, the in-process code) and
returns the common assignment to both; it also writes the run directory (metrics lines, eval.json, checkpoints
merged from the two halves), because it is the one process that sees both networks.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any, Optional

import ray

from schemas.config import RunConfig
from schemas.policy import RolePolicy
from schemas.rundir import RunDir, json_ready
from schemas.storage import Location

NAMESPACE = "lad"
POLL_S = 0.05


def coordinator_name(cfg: RunConfig) -> str:
    """Unique per run directory (two runs never share one), readable by run name."""
    where = Location(cfg.run_dir)
    digest = hashlib.sha1(str(where if where.remote else where.local.resolve()).encode()).hexdigest()[:10]
    return f"colearn:{cfg.name}:{digest}"


class RoleBook:
    """The policy, its version and history, the per-step role statistics and the roles.json watch (plain Python,
    used by the actor; tested without Ray)."""

    def __init__(self, policy: str, run: Optional[RunDir], start_step: int = 0, source: str = "config"):
        RolePolicy.parse(policy)
        self.policy = policy                  # the policy requested last (in force from the next step)
        self.version = 0
        self.stop = False
        self.run = run
        self.requested_at: Optional[float] = None
        self._source = source
        self.history: list[dict] = [{"policy": policy, "from_step": start_step + 1, "source": source,
                                     "requested_at": None, "applied_at": time.time()}]
        self.steps: list[dict] = []           # per step: step, epoch, policy, counts

    @property
    def applied_policy(self) -> str:
        return self.history[-1]["policy"]

    def control(self) -> dict:
        return {"version": self.version, "policy": self.policy, "stop": self.stop}

    def request(self, policy: str, source: str, requested_at: Optional[float] = None) -> bool:
        RolePolicy.parse(policy)
        if policy == self.policy:
            return False
        self.policy, self.requested_at = policy, requested_at or time.time()
        self.version += 1
        self._source = source
        return True

    def request_stop(self) -> bool:
        if self.stop:
            return False
        self.stop = True
        self.version += 1
        return True

    def poll_file(self) -> bool:
        """Pick up a new request the control plane wrote (`RunDir.new_roles_request`); True if the policy changed.
        A torn or hand-written bad file is ignored (the control plane validates its own)."""
        request = self.run.new_roles_request() if self.run is not None else None
        try:
            return request is not None and self.request(request["policy"], "rest", request.get("requested_at"))
        except ValueError:
            return False

    def applied(self, step_index: int, policy: str) -> None:
        """A trainer switched to `policy` before its step number `step_index + 1` (metrics.jsonl numbering)."""
        if policy == self.applied_policy:
            return
        self.history.append({"policy": policy, "from_step": step_index + 1,
                             "source": self._source, "requested_at": self.requested_at,
                             "applied_at": time.time()})

    def record(self, step: int, epoch: int, policy: str, counts: dict) -> None:
        self.steps.append({"step": int(step), "epoch": int(epoch), "policy": policy, "counts": counts})

    def rewind(self, step: int) -> None:
        """A worker group resumes from the checkpoint of `step`: the steps after it (and the policy changes they
        applied) will be taken again."""
        self.steps = [s for s in self.steps if s["step"] <= step]
        self.history = self.history[:1] + [h for h in self.history[1:] if h["from_step"] <= step + 1]

    def summary(self) -> dict:
        """Policy, history and the teacher ratio over steps (total, per level, per size), plus run totals."""
        from trainer.colad import add_counts, count_metrics

        def ratios(counts: dict) -> dict:
            m = count_metrics(counts)
            return {"teacher_ratio": m["teacher_ratio"], "by_level": m["teacher_ratio_by_level"],
                    "by_size": m["teacher_ratio_by_size"], "counts": counts}

        totals: Optional[dict] = None
        series = []
        for rec in self.steps:
            totals = add_counts(totals, rec["counts"])
            series.append({"step": rec["step"], "epoch": rec["epoch"], "policy": rec["policy"],
                           **ratios(rec["counts"])})
        out = {"policy": self.applied_policy, "requested": self.policy, "version": self.version,
               "stop": self.stop, "history": list(self.history), "steps": series}
        if totals:
            out["totals"] = ratios(totals)
        return json_ready(out)


class CoordinatorAborted(RuntimeError):
    """The run failed elsewhere (a worker of the other group died or raised); waiting any longer is pointless."""


@ray.remote(num_cpus=0, max_restarts=0)
class ColearnCoordinator:
    """See the module docstring. An asyncio actor: long polls and split rendezvous wait without holding a thread;
    the merge itself (a few ms per batch) runs on the event loop, one batch at a time."""

    def __init__(self, cfg: dict, policy: str, start_step: int = 0, source: str = "config",
                 best: Optional[dict] = None):
        import torch

        self.cfg = RunConfig.model_validate(cfg)
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.run = RunDir(self.cfg.run_dir)
        self.book = RoleBook(policy, self.run, start_step, source)
        self.book.poll_file()  # a request made before the run started applies from its first step
        self._event: Optional[asyncio.Event] = None
        self._poller: Optional[asyncio.Task] = None
        self.error: Optional[str] = None     # the run's error: the driver fails with it
        self.aborted: Optional[str] = None   # why the split rendezvous are closed (until `rewind`)
        self.result_: dict = {}
        # split co-learning
        self._slots: dict[tuple, dict] = {}
        self._frozen: dict[int, tuple[str, bool]] = {}
        self._counts: dict[int, dict] = {}
        self._evals: dict[str, dict] = {}
        self._closed: dict[int, tuple] = {}
        self._lines: dict[int, dict] = {}
        self.best = dict(best or {"AP": -1.0, "step": 0})
        self.merge_ms = 0.0
        self.merges = 0

    # -- control ---------------------------------------------------------------------------------------------------
    def _loop_ready(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll_loop())

    async def _poll_loop(self) -> None:
        while True:
            if self.book.poll_file():
                self._notify()
            await asyncio.sleep(POLL_S)

    def _notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    async def start(self) -> dict:
        """Start watching control/roles.json; returns the control state (version, policy, stop)."""
        self._loop_ready()
        return self.book.control()

    async def control(self) -> dict:
        return self.book.control()

    async def wait_control(self, version: int, timeout_s: float = 10.0) -> dict:
        """Long poll: answers when the control version differs from `version`, or after `timeout_s`."""
        self._loop_ready()
        if self.book.version == version:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), timeout_s)
        return self.book.control()

    async def set_policy(self, policy: str, source: str = "api") -> dict:
        """Change the policy (from the next step). The control plane writes roles.json instead (it is not attached
        to the Ray cluster); a tool on the cluster can call this directly."""
        if self.book.request(policy, source):
            self._notify()
        return self.book.control()

    async def request_stop(self) -> None:
        if self.book.request_stop():
            self._notify()

    async def applied(self, step_index: int, policy: str) -> None:
        self.book.applied(step_index, policy)

    async def record(self, step: int, epoch: int, policy: str, counts: dict) -> None:
        self.book.record(step, epoch, policy, counts)

    async def summary(self) -> dict:
        out = self.book.summary()
        if self.merges:
            out["merge_ms_mean"] = self.merge_ms / self.merges
        return out

    async def rewind(self, step: int, best: dict) -> None:
        """A new attempt resumes from the checkpoint of `step`: forget what came after it, open the rendezvous."""
        self.book.rewind(step)
        self.run.rewound(step)  # its unwritten metrics lines and TensorBoard events after `step` are dropped
        self.best = dict(best)
        self.result_ = {}
        self.aborted = None
        for store in (self._slots, self._frozen, self._counts, self._closed, self._lines):
            store.clear()

    async def set_result(self, result: dict) -> None:
        self.result_ = result

    async def result(self) -> dict:
        return self.result_

    async def abort(self, message: str, error: bool = True) -> None:
        """Fail every pending and future rendezvous (the other side of a split run is gone). `error`: the first
        such message is the run's error (a bug, a stuck side); not for a lost worker group, which the driver
        resumes (`rewind`)."""
        if error and self.error is None:
            self.error = message
        if self.aborted is None:
            self.aborted = message
        for slot in self._slots.values():
            if not slot["future"].done():
                slot["future"].set_exception(CoordinatorAborted(self.aborted))
        self._slots.clear()

    # -- split co-learning -----------------------------------------------------------------------------------------
    def _freeze(self, step_index: int) -> tuple[str, bool]:
        """The policy and stop flag of step `step_index + 1`, fixed at the first contact of any rank of any side,
        so every batch of a step merges under one policy and both groups stop after the same step."""
        if step_index not in self._frozen:
            policy = self.book.policy
            if policy != self.book.applied_policy:
                self.book.applied(step_index, policy)
                self.run.log({"step": step_index, "event": "policy", "policy": policy})
            self._frozen[step_index] = (policy, self.book.stop)
            for old in [s for s in self._frozen if s < step_index - 8]:
                del self._frozen[old]
        return self._frozen[step_index]

    async def _meet(self, key: tuple, side: str, value: Any, combine, timed: bool = True) -> Any:
        """Both sides put `value` under `key`; the second arrival runs `combine(value_a, value_b)` and both get
        its result. Waits at most `colearn.exchange_timeout_s` (unless not `timed`); then, or on `abort`, both
        fail."""
        if self.aborted is not None:
            raise CoordinatorAborted(self.aborted)
        self._loop_ready()
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = {"future": asyncio.get_running_loop().create_future(), "parts": {}, "left": 2}
        if side in slot["parts"]:
            raise RuntimeError(f"side {side} met twice at {key}")
        slot["parts"][side] = value
        if len(slot["parts"]) == 2:
            try:
                slot["future"].set_result(combine(slot["parts"]["a"], slot["parts"]["b"]))
            except Exception as e:
                slot["future"].set_exception(e)
                await self.abort(f"{key[0]} of step {key[1] + 1} failed: {type(e).__name__}: {e}")
            slot["parts"].clear()
        try:
            timeout = self.cfg.colearn.exchange_timeout_s if timed else None
            return await asyncio.wait_for(asyncio.shield(slot["future"]), timeout)
        except asyncio.TimeoutError:
            other = "b" if side == "a" else "a"
            msg = (f"side {side} waited {self.cfg.colearn.exchange_timeout_s:g} s at the coordinator for side "
                   f"{other} ({key[0]} of step {key[1] + 1}, rank {key[2]}): that worker group is stuck or gone")
            await self.abort(msg)
            raise CoordinatorAborted(msg) from None
        finally:
            slot["left"] -= 1
            if slot["left"] <= 0 and self._slots.get(key) is slot:
                del self._slots[key]

    async def exchange(self, step_index: int, rank: int, side: str, payload: dict) -> dict:
        """Rendezvous 1 of a split step: both sides' sparse candidate losses of one batch (keyed by step and rank,
        image ids checked) in; the common assignment under the step's frozen policy out."""
        from trainer.colad import add_counts, merge_sparse

        policy, stop = self._freeze(step_index)

        def combine(pa: dict, pb: dict) -> dict:
            t0 = time.perf_counter()
            res = merge_sparse(self.cfg, pa, pb, RolePolicy(policy), step_index)
            ms = (time.perf_counter() - t0) * 1e3
            self.merge_ms += ms
            self.merges += 1
            seen = self._counts.get(step_index, {"counts": None, "num_pos": 0})
            self._counts[step_index] = {"counts": add_counts(seen["counts"], res["counts"]),
                                        "num_pos": seen["num_pos"] + res["num_pos"]}
            res.update(stop=stop, merge_ms=ms)
            return res

        return await self._meet(("exchange", step_index, rank), side, payload, combine)

    async def finish(self, step_index: int, rank: int, side: str, norms: Any, info: dict) -> dict:
        """Rendezvous 2: per-parameter gradient norms (the clip is over both networks) and the step's epoch.
        Answers both sides' norms and whether to stop after this step."""
        _, stop = self._freeze(step_index)

        def combine(a: tuple, b: tuple) -> dict:
            (na, ia), (nb, _) = a, b
            if rank == 0:
                self._close_step(step_index, int(ia["epoch"]))
            return {"norms_a": na, "norms_b": nb, "stop": stop}

        return await self._meet(("finish", step_index, rank), side, (norms, info), combine)

    def _close_step(self, step_index: int, epoch: int) -> None:
        """Every exchange of the step is done (rank 0's backward waited for its group): record its statistics."""
        merged = self._counts.pop(step_index, None)
        if merged:
            policy = self._frozen.get(step_index, (self.book.policy, False))[0]
            self.book.record(step_index + 1, epoch, policy, merged["counts"])
            self._closed[step_index] = (policy, merged)
            for old in [s for s in self._closed if s < step_index - 64]:
                del self._closed[old]

    async def log_side(self, step_index: int, side: str, metrics: dict) -> None:
        """Rank 0 of a side, on logged steps (fire and forget): its losses and timings. With both halves in, write
        the step's metrics.jsonl line as `pipeline.local` does."""
        import numpy as np

        from trainer.colad import count_metrics

        halves = self._lines.setdefault(step_index, {})
        halves[side] = metrics
        if len(halves) < 2:
            return
        del self._lines[step_index]
        ma, mb = halves["a"], halves["b"]
        policy, merged = self._closed.pop(step_index, (self._frozen.get(step_index, (self.book.policy, False))[0],
                                                        None))
        step, epoch = step_index + 1, int(ma["epoch"]) if "epoch" in ma else None
        record: dict[str, Any] = {"step": step, "epoch": epoch}
        record.update({k: v for m in (ma, mb) for k, v in m.items() if k not in _TIMING + ("total_steps",)})
        record["loss"] = float(np.float32(ma["loss_a"]) + np.float32(mb["loss_b"]))
        record["num_pos"] = merged["num_pos"] if merged else 0
        record.update(count_metrics(merged["counts"] if merged else None))
        record["policy"] = policy
        record.update({f"{k}_{name}": m[k] for k in _TIMING for name, m in (("a", ma), ("b", mb)) if k in m})
        record["step_ms"] = round(max(ma["step_ms"], mb["step_ms"]), 2)
        record["data_wait_ms"] = round(max(ma["data_wait_ms"], mb["data_wait_ms"]), 2)
        record["images_per_s"] = round(ma["images"] / max(record["step_ms"] + record["data_wait_ms"], 1e-6) * 1e3, 2)
        self.run.log(record)
        self.run.set_progress("running", step, int(ma["total_steps"]), epoch or 0)

    async def error_message(self) -> Optional[str]:
        return self.error

    async def sync(self, step: int, side: str, part: dict) -> dict:
        """Rendezvous 3 (rare: checkpoints, evaluations, the end): both halves' states and evaluations in; writes
        eval.json, best.pt and last.pt as the in-process loop does, the checkpoint merged into the in-process
        layout (`trainer.colad.merge_states`), so it resumes and evaluates like any colad checkpoint."""
        from pipeline.loop import write_commit
        from trainer.colad import merge_states

        def combine(pa: dict, pb: dict) -> dict:
            state = merge_states(pa["state"], pb["state"])
            state["policy"] = self.book.applied_policy
            epoch = int(pa["epoch"])
            evals = {"a": pa["eval"], "b": pb["eval"]} if pa["eval"] is not None else None
            self.best = write_commit(self.run, self.cfg, state, step, epoch, (pa["last"]["epoch"],
                                     pa["last"]["trained_ids"]), self.best, evals, pa["final"])
            self._evals = evals or self._evals
            if pa["final"]:
                self.result_ = {"state": pa["final"], "step": step, "epoch": epoch, "eval": dict(self._evals)}
            return {"best": dict(self.best)}

        # no timeout: the other side may be evaluating (minutes on a large validation set); `abort` still ends it
        return await self._meet(("sync", step, 0), side, part, combine, timed=False)


# per-side timing keys of a split side's metrics (suffixed _a/_b in the line)
_TIMING = ("forward_ms", "exchange_ms", "backward_ms", "finish_ms", "step_ms", "data_wait_ms")


class PolicyWatch:
    """Rank 0's view of the coordinator's control state, refreshed without blocking a step: one long-poll call
    (`wait_control`) is always in flight and its result lands in a `concurrent.futures.Future`, so a step only
    reads that future's done flag (well under a microsecond); when it is done, the new state is taken and the
    next long poll sent (a fraction of a millisecond, once per change or per `timeout_s` of quiet)."""

    def __init__(self, coordinator, timeout_s: float = 10.0):
        self.coordinator, self.timeout_s = coordinator, timeout_s
        self.state = ray.get(coordinator.start.remote())
        self._arm()

    def _arm(self) -> None:
        self._future = self.coordinator.wait_control.remote(self.state["version"], self.timeout_s).future()

    def poll(self) -> dict:
        """The newest control state the coordinator has pushed."""
        if self._future.done():
            self.state = self._future.result()
            self._arm()
        return self.state


def get_or_create(cfg: RunConfig, policy: str, *, start_step: int = 0, source: str = "config",
                  best: Optional[dict] = None):
    """The run's coordinator: the live one if this run has one (a restarted driver), else a new one."""
    return ColearnCoordinator.options(name=coordinator_name(cfg), namespace=NAMESPACE, get_if_exists=True,
                                      lifetime=None).remote(cfg.to_dict(), policy, start_step, source, best)


def lookup(cfg: RunConfig):
    """The coordinator of a running run, from any driver attached to its Ray cluster (None if there is none)."""
    try:
        return ray.get_actor(coordinator_name(cfg), namespace=NAMESPACE)
    except ValueError:
        return None

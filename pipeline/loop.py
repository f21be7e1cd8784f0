"""The training loop: one for every engine (in-process, the Ray stream, co-learning inline and split).

A run's bookkeeping lives here and nowhere else: the plan of each epoch without the ids already trained, the step
budget, checkpoints, stop requests, evaluation and the best checkpoint, metrics and progress, resume, and the
exactly-once accounting of trained image ids. An engine only says where its batches come from (an iterator of
`Batch`) and how one step is taken (a `Stepper`).

    for every step:
        next batch of this rank (or none: an idle step, so data-parallel ranks stay in step)
        rank 0 polls stop / role policy; all ranks agree (one MIN all-reduce: epoch, stop, policy)
        the epoch changed -> end of epoch: evaluate if due, checkpoint, keep the best
        stepper.step(batch)  -> metrics; ids trained -> (gathered on rank 0 at each checkpoint)
        log, checkpoint every `train.checkpoint_every` steps, stop at the step budget

With one rank every collective is a no-op, so the in-process run is this loop with world size 1.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from schemas.config import RunConfig
from schemas.rundir import RunDir

NO_MORE = 2 ** 62  # the "epoch" of a rank whose batches are all done


# ------------------------------------------------------------------------------------------------ the plan

def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image order of an epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def total_steps(cfg: RunConfig, num_images: int, workers: int = 1) -> int:
    """Optimizer steps of the run: each step takes one batch of `train.batch_size` per worker."""
    per_epoch = math.ceil(num_images / (cfg.train.batch_size * workers))
    steps = per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def plan_batches(order: list[int], batch_size: int, num_workers: int) -> list[list[int]]:
    """Cut one epoch's remaining image order into per-worker batches, in order.

    Every global step takes `num_workers` batches of `batch_size`; the images left for the last step (fewer than
    `num_workers * batch_size`) are split as evenly as possible over the workers, so no image is dropped and no
    worker idles longer than needed. With one worker these are consecutive batches of `batch_size`.
    """
    per_step = batch_size * num_workers
    full = len(order) // per_step * per_step
    batches = [order[i:i + batch_size] for i in range(0, full, batch_size)]
    rest = order[full:]
    if rest:  # the first len(rest) % k workers take one image more
        k = min(num_workers, len(rest))
        bounds = [i * (len(rest) // k) + min(i, len(rest) % k) for i in range(k + 1)]
        batches += [rest[a:b] for a, b in zip(bounds, bounds[1:])]
    return batches


def group_by_orientation(order: list[int], wide: Sequence[bool], batch_size: int) -> list[int]:
    """`order` rearranged so that each batch cut from it holds landscape images only or portrait images only.

    A keep-ratio batch is padded to its tallest and its widest image, so one portrait image among landscape ones
    pads the whole batch to a square: 1.7x the pixels and anchors at (1333, 800). Images are taken in the shuffled
    order and a batch is closed when its orientation's bucket fills (MMDetection's `AspectRatioBatchSampler`);
    what is left in both buckets ends the epoch. A permutation of `order`: the batch count, the step budget and
    the exactly-once accounting do not change.
    """
    buckets: dict[bool, list[int]] = {True: [], False: []}
    out: list[int] = []
    for i in order:
        bucket = buckets[bool(wide[i])]
        bucket.append(i)
        if len(bucket) == batch_size:
            out.extend(bucket)
            bucket.clear()
    return out + buckets[True] + buckets[False]


def batches_in(num_images: int, steps: int, batch_size: int, world: int) -> int:
    """How many batches `plan_batches` makes of `num_images`, cut after `steps` steps."""
    full, rest = divmod(num_images, batch_size * world)
    if steps < full + bool(rest):
        return steps * world
    return full * world + min(world, rest)


def epoch_budgets(cfg: RunConfig, image_ids: list[int], start_epoch: int, trained_ids: list[int],
                  remaining_steps: int, world: int) -> list[tuple[int, int, int]]:
    """(epoch, steps, batches) of every epoch left in the run, by arithmetic alone: what a plan costs before any
    epoch's order is drawn (each epoch takes ceil(images / (batch_size * world)) steps, cut at the budget)."""
    done = {int(i) for i in trained_ids}
    first = sum(int(i) not in done for i in image_ids)
    budgets = []
    for epoch in range(start_epoch, cfg.train.epochs):
        if remaining_steps <= 0:
            break
        n = first if epoch == start_epoch else len(image_ids)
        steps = min(remaining_steps, math.ceil(n / (cfg.train.batch_size * world)))
        budgets.append((epoch, steps, batches_in(n, steps, cfg.train.batch_size, world)))
        remaining_steps -= steps
    return budgets


def plan_epoch(cfg: RunConfig, image_ids: list[int], epoch: int, trained_ids: list[int], steps: int,
               world: int, wide: Optional[Sequence[bool]] = None) -> list[list[list[int]]]:
    """One epoch's steps, each the batches (dataset indices) of the ranks that have one: `epoch_order` without the
    ids already trained (`trained_ids`, those of the resumed epoch), grouped by orientation where the inputs keep
    their ratio (`wide[i]`: dataset image i is at least as wide as it is tall), cut into batches, cut at
    `steps`."""
    done = {int(i) for i in trained_ids}
    order = [int(i) for i in epoch_order(len(image_ids), cfg.seed, epoch) if int(image_ids[i]) not in done]
    if cfg.data.group_by_orientation and not isinstance(cfg.data.input_size, int):
        if wide is None:  # every engine must plan the same batches: none may silently skip the grouping
            raise ValueError("plan_epoch: keep-ratio inputs with data.group_by_orientation need each image's "
                             "orientation (wide)")
        order = group_by_orientation(order, wide, cfg.train.batch_size)
    batches = plan_batches(order, cfg.train.batch_size, world)
    return [batches[k:k + world] for k in range(0, len(batches), world)][:steps]


def plan_run(cfg: RunConfig, image_ids: list[int], start_epoch: int, trained_ids: list[int],
             remaining_steps: int, world: int,
             wide: Optional[Sequence[bool]] = None) -> Iterator[tuple[int, list[list[list[int]]]]]:
    """The rest of the run, one epoch at a time: per epoch, per step, the batches (dataset indices) of the ranks
    that have one. A pure function of the config and the checkpoint, so every process plans the same run; an
    epoch is planned only when it is reached."""
    for epoch, steps, _ in epoch_budgets(cfg, image_ids, start_epoch, trained_ids, remaining_steps, world):
        yield epoch, plan_epoch(cfg, image_ids, epoch, trained_ids if epoch == start_epoch else [], steps, world,
                                wide)


# ------------------------------------------------------------------------------------------------ the start

@dataclass
class Start:
    """Where a run (re)starts: from nothing, or from `checkpoints/last.pt`."""
    step: int = 0
    epoch: int = 0
    trained_ids: list[int] = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"AP": -1.0, "step": 0})
    policy: Optional[str] = None
    resumed: bool = False
    checkpoint: Optional[dict] = field(default=None, repr=False)  # last.pt, for the process that resumes from it


def read_start(run: RunDir, resume: bool) -> Start:
    """The start of this attempt; a resumed run forgets the metrics and evaluations logged after its checkpoint
    (they are made again), and one that starts over (`resume` False) the checkpoints of the run before it."""
    from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    start = Start()
    if not resume:
        run.last.delete()
        run.best.delete()
    elif run.last.exists():
        try:
            ckpt = load_checkpoint(run.last)
        except CheckpointError as e:  # damaged from outside: our writes are whole or absent
            raise CheckpointError(f"cannot resume: {e}; restore it, or start the run over with --no-resume") from None
        start = Start(int(ckpt["step"]), int(ckpt["progress"]["epoch"]), list(ckpt["progress"]["trained_ids"]),
                      dict(ckpt["best"]), ckpt.get("policy"), True, ckpt)
        if start.best["step"] == start.step > 0 and (not run.best.exists()
                                                     or int(load_checkpoint(run.best)["step"]) != start.step):
            save_checkpoint(run.best, ckpt)  # the attempt died between last.pt, which says it is the best, and best.pt
    run.rewind(start.step)
    return start


def write_commit(run: RunDir, cfg: RunConfig, state: dict, step: int, epoch: int, last: tuple[int, list[int]],
                 best: dict, evals: Optional[dict], final: Optional[str]) -> dict:
    """Rank 0's record of a commit, whichever engine made it: the evaluations to eval.json, last.pt (`last`: the
    epoch and ids a resume starts from), best.pt when network A's AP improved, and best.pt at the end if there is
    none. last.pt goes first and records the new best, so an attempt that dies before best.pt leaves what
    `read_start` mends it from; the end's best.pt goes before last.pt, so a finished run always has one. `state`
    is the engine's (`Engine.state()`, or both sides' merged). Returns the best so far."""
    from trainer.checkpoint import save_checkpoint

    categories = run.categories()
    run.flush()  # on object storage: the metrics up to this checkpoint are written before it

    def payload(ep: int, ids: list[int]) -> dict:
        return {"config": cfg.to_dict(), **state, "epoch": ep, "progress": {"epoch": ep, "trained_ids": list(ids)},
                "best": dict(best), **({"categories": categories} if categories is not None else {})}

    for name, stats in (evals or {}).items():
        run.add_eval({"epoch": epoch, "step": step, "network": name, "stats": stats})
    improved = bool(evals) and evals["a"]["AP"] > best["AP"]
    if improved:
        best = {"AP": evals["a"]["AP"], "step": step}
    elif final == "succeeded" and not run.best.exists():
        save_checkpoint(run.best, payload(epoch + 1, []))
    save_checkpoint(run.last, payload(*last))
    if improved:
        save_checkpoint(run.best, payload(epoch + 1, []))
    return best


# ------------------------------------------------------------------------------------------------ the interface

@dataclass
class Batch:
    """One rank's batch of one step, ready for its stepper."""
    epoch: int
    image_ids: list[int]
    data: Any
    decode_ms: float = 0.0


@dataclass
class Stepped:
    """What a step returns: its metrics (logged by rank 0; None: nothing to log) and the labels it trained on."""
    record: Optional[dict]
    labels: Any = None


class Stepper:
    """How one engine takes a step. The defaults are the in-process run's; engines override what differs."""

    run: RunDir
    cfg: RunConfig
    engine: Any  # what trains: `trainer.engine.Engine`, or split's `SideEngine`

    def poll(self) -> tuple[bool, Optional[int]]:
        """Rank 0, before each step: (stop requested, the role policy's code or None)."""
        return False, None

    def set_policy(self, code: int) -> None:
        """Every rank, before the step: the policy all ranks agreed on (co-learning only)."""

    def step(self, batch: Optional[Batch], num_active: int, epoch: int) -> Stepped:
        """One optimisation step on this rank's batch (None: an idle step); `num_active` ranks have a batch."""
        raise NotImplementedError

    def log(self, record: dict, total: int) -> None:
        self.run.log(record)
        self.run.set_progress("running", record["step"], total, record["epoch"])

    def predict(self, shard: tuple[int, int]) -> dict:
        """Every rank, when a commit evaluates: {network: detections of this rank's shard (rank, world) of the
        validation images, as `pipeline.validate.detections_array`}."""
        return {}

    def commit(self, epoch: int, last: tuple[int, list[int]], best: dict, *, detections: Optional[dict],
               final: Optional[str]) -> tuple[Optional[dict], dict]:
        """Rank 0: score `detections` (every rank's, merged; None: no evaluation), keep the best, write last.pt.
        Returns ({network: stats} or None, best)."""
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ collectives

class Collective:
    """The per-step agreement of data-parallel ranks (no-ops with one rank)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def reduce(self, values: list[int], op: str) -> list[int]:
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


# ------------------------------------------------------------------------------------------------ the loop

@dataclass
class Outcome:
    state: str          # "succeeded" or "stopped"
    step: int
    epoch: int
    eval: dict          # the last evaluation, {network: stats}


def say(line: str, bar=None) -> None:
    """A progress line on the console (stderr, through the bar when there is one)."""
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        sys.stderr.write(line + "\n")  # not print: Ray Train's print patch in workers would log it twice
        sys.stderr.flush()


def train_loop(cfg: RunConfig, stepper: Stepper, batches: Iterator[Batch], start: Start, *, total: int,
               num_images: int, has_val: bool, collective: Collective = Collective(), progress: bool = False,
               bar: bool = False, tag: str = "", observers: tuple = ()) -> Outcome:
    """Train until the step budget, the end of the plan, or a stop request; see the module docstring.

    `progress`: print progress (a tqdm bar when `bar`, else a line every `log_every` steps). `observers`: objects
    told about every step of this rank (`before_step(step, rank, tag)`, `after_step(step, epoch, rank, tag,
    image_ids, labels)`), e.g. a tracer; `tag` names this worker group for them ('' for the only one)."""
    from trainer.engine import on_host

    rank, engine = collective.rank, stepper.engine
    t = cfg.train
    epoch, trained, best = start.epoch, list(start.trained_ids) if rank == 0 else [], dict(start.best)
    new_ids: list[int] = []
    last_eval: dict = {e["network"]: e["stats"] for e in stepper.run.evals()} if rank == 0 else {}
    if engine.step_count >= total:  # a finished run resumed: nothing left to train
        return Outcome("succeeded", engine.step_count, epoch, last_eval)
    pbar = None
    if progress and bar and rank == 0:
        from tqdm import tqdm
        pbar = tqdm(total=total, initial=engine.step_count, desc=f"{cfg.mode} {cfg.name}", dynamic_ncols=True)

    def commit(evaluate: bool, final: Optional[str], epoch_end: bool = False) -> bool:
        """Checkpoint (and evaluate: every rank predicts its shard of the validation images, rank 0 scores them
        all) at the current step; True when it ends a complete epoch (then last.pt starts the next one, so a
        resume never skips this epoch's evaluation)."""
        nonlocal best, last_eval, new_ids
        check_finite()  # a checkpoint is never written after a non-finite loss
        everyone, new_ids = collective.gather(new_ids), []
        if rank == 0:
            trained.extend(i for ids in everyone for i in ids)
        full = epoch_end and len(trained) >= num_images
        detections = None
        if evaluate:
            shards = collective.gather(stepper.predict((rank, collective.world)))
            detections = {name: np.concatenate([s[name] for s in shards]) for name in shards[0]}
        if rank == 0:
            last = (epoch + 1, []) if full else (epoch, trained)
            ev, best = stepper.commit(epoch, last, best, detections=detections, final=final)
            if ev:
                last_eval = ev
                if progress:
                    say(f"epoch {epoch} step {engine.step_count}: " + ", ".join(
                        f"{n.upper()} AP {s['AP']:.3f} AP50 {s['AP50']:.3f}" for n, s in ev.items()), pbar)
        return full

    def end_epoch(finished: bool) -> None:
        nonlocal trained
        due = bool(t.eval_every) and (epoch + 1) % t.eval_every == 0
        if commit(evaluate=has_val and (finished or due), final="succeeded" if finished else None, epoch_end=True):
            trained = []

    def check_finite() -> None:
        """Every rank, together: stop the run if any rank's loss was not finite since the start (each engine keeps
        a flag on its device, so a step never waits for it; this reads it)."""
        if collective.reduce([int(not engine.losses_finite())], "MAX")[0]:
            raise FloatingPointError(f"step {engine.step_count}: a loss was not finite (at this step or since the "
                                     "last log); lower train.lr or check the data")

    pending: Optional[Batch] = None
    state = "succeeded"
    try:
        while True:
            t_wait = time.perf_counter()
            if pending is None:  # (a generator, once done, stays done)
                pending = next(batches, None)
            t_control = time.perf_counter()
            wait_ms = (t_control - t_wait) * 1e3
            stop, code = stepper.poll() if rank == 0 else (False, None)
            mine = pending.epoch if pending is not None else NO_MORE
            agreed, stop, code = collective.reduce([mine, -int(stop), NO_MORE if code is None else code], "MIN")
            if stop:
                commit(evaluate=False, final="stopped")
                state = "stopped"
                break
            if agreed > epoch:  # no rank has a batch of this epoch left
                end_epoch(finished=agreed == NO_MORE)
                if agreed == NO_MORE:
                    break
                epoch = agreed
            if code != NO_MORE:
                stepper.set_policy(code)
            control_ms = (time.perf_counter() - t_control) * 1e3
            batch = pending if pending is not None and pending.epoch == epoch else None
            if batch is not None:
                pending = None
            ids = batch.image_ids if batch is not None else []
            n_active, n_images = collective.reduce([int(batch is not None), len(ids)], "SUM")
            for o in observers:
                o.before_step(engine.step_count + 1, rank, tag)
            t0 = time.perf_counter()
            out = stepper.step(batch, n_active, epoch)
            step_ms = (time.perf_counter() - t0) * 1e3
            step = engine.step_count
            new_ids.extend(ids)
            for o in observers:
                o.after_step(step, epoch, rank, tag, ids, out.labels)
            logged = step % t.log_every == 0 or step == 1
            if logged:
                check_finite()
            if rank == 0 and out.record is not None and logged:
                data_wait_ms = max(wait_ms - (batch.decode_ms if batch is not None else 0.0), 0.0)
                record = {"step": step, "epoch": epoch, **on_host(out.record, step), "step_ms": round(step_ms, 2),
                          "data_wait_ms": round(data_wait_ms, 2), "control_ms": round(control_ms, 3),
                          "images": n_images, "images_per_s": round(n_images / max(step_ms + wait_ms, 1e-6) * 1e3, 2),
                          "workers_active": n_active}
                stepper.log(record, total)
                if progress and pbar is None:
                    say(f"step {step}/{total} epoch {epoch} loss {record.get('loss', float('nan')):.4f} "
                        f"lr {record.get('lr', float('nan')):.2e} step {step_ms:.0f} ms "
                        f"wait {data_wait_ms:.0f} ms {record['images_per_s']:.1f} img/s")
                if pbar is not None and "loss" in record:
                    pbar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
            if pbar is not None:
                pbar.update(1)
            if step >= total:
                end_epoch(finished=True)
                break
            if step % t.checkpoint_every == 0:
                commit(evaluate=False, final=None)
    finally:
        if pbar is not None:
            pbar.close()
    return Outcome(state, engine.step_count, epoch, last_eval)

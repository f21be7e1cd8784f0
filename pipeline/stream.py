"""Training through the label-assignment service: `pipeline.engine: ray`.

    from_items(planned batches) ─> read_batch (CPU tasks: decode, letterbox, flip)
        ─> TeacherAssigner pool (actors: teacher forward + batched PAA assignment, one Arrow batch per batch)
        ─> streaming_split(N, equal=False) ─> N Ray Train (TorchTrainer) student workers, DDP

The run directory, the epoch order, the batches, the evaluation and the checkpoint payload are those of the
in-process loop (`pipeline.local`); with one worker the student takes the same steps on the same labels.

Exactly once per epoch: the driver plans the batches from `checkpoints/last.pt` (`progress.trained_ids`), so ids
already trained never reach the teacher; nothing is dropped (`equal=False`, and a step where some workers have
no batch left averages the gradient over the workers that have one, see `trainer.worker.ActiveMean`). When a
Train worker dies, the driver (not Ray Train, which would replay the epoch from its start) re-plans from
`last.pt` and starts a new worker group, up to `pipeline.max_failures` times. A dead assigner actor is restarted
by Ray and its batch retried (`max_restarts`, `max_task_retries`): an actor call returns its batch or nothing.
"""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.assigner import StreamSpec, TeacherAssigner, batch_items, plan_batches, read_batch
from pipeline.local import StopRequested, epoch_order, prepare_run
from pipeline.rundir import RunDir
from schemas.config import RunConfig
from trainer.checkpoint import load_checkpoint

TRACE_NAME = "trace.rank{rank}.jsonl"
FAULTS_ENV = "LAD_PIPELINE_FAULTS"



def plan_run(cfg: RunConfig, records: list, start_epoch: int, trained_ids: list[int], remaining_steps: int) -> list:
    """Ray Data items for the rest of the run: every remaining epoch's order (`epoch_order`, the in-process
    one) without the ids trained already, cut into per-worker batches, up to the steps left."""
    n = len(records)
    ids = np.array([r.image_id for r in records])
    done = set(int(i) for i in trained_ids)
    workers = cfg.pipeline.num_workers
    items: list = []
    for epoch in range(start_epoch, cfg.train.epochs):
        if remaining_steps <= 0:
            break
        order = [int(i) for i in epoch_order(n, cfg.seed, epoch) if epoch != start_epoch or int(ids[i]) not in done]
        batches = plan_batches(order, cfg.train.batch_size, workers)
        steps = math.ceil(len(batches) / workers)
        if steps > remaining_steps:
            batches = batches[:remaining_steps * workers]
            steps = remaining_steps
        items += batch_items(records, epoch, batches)
        remaining_steps -= steps
    return items



def build_dataset(cfg: RunConfig, items: list, monitor: Any = None, faults: Optional[dict] = None):
    """The stream: planned batches -> images (CPU tasks) -> assignments (the actor pool), one block per batch."""
    import ray

    p = cfg.pipeline
    spec = StreamSpec.of(cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                        num_cpus=p.cpus_per_read_task,
                        fn_kwargs=dict(spec=spec, seed=cfg.seed, flip_prob=cfg.data.flip_prob))
    if cfg.mode == "paa":  # data only: the student assigns its own labels
        return ds
    return ds.map_batches(
        TeacherAssigner, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=p.assigners),
        num_cpus=p.cpus_per_assigner, num_gpus=p.gpus_per_assigner or None,
        fn_constructor_kwargs=dict(cfg=cfg.to_dict(), monitor=monitor, faults=faults))
    # Fault tolerance: Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1 (its
    # defaults; passing them explicitly is deprecated in 2.60), so a lost actor is restarted and its batch
    # re-run. An exception raised by the assigner is not retried: it fails the run with its message.


def _data_config(execution_options):
    """Ray Train's DataConfig, but splitting with equal=False: `equal=True` drops up to N-1 rows per epoch
    (and may cut a training batch in two); here every block (one training batch) reaches exactly one worker."""
    from ray.train import DataConfig

    class ExactlyOnceDataConfig(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = copy.deepcopy(execution_options)
                for i, split in enumerate(ds.streaming_split(world_size, equal=False)):
                    output[i][name] = split
            return output

    return ExactlyOnceDataConfig(execution_options=execution_options)


# ------------------------------------------------------------------------------------------------ the worker

class _Sync:
    """The per-step agreement of the data-parallel workers (no-ops with one worker)."""

    def __init__(self, world: int):
        self.world = world

    def min(self, values: list[int]) -> list[int]:
        return self._reduce(values, "MIN")

    def sum(self, values: list[int]) -> list[int]:
        return self._reduce(values, "SUM")

    def _reduce(self, values, op):
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

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _trace(faults: dict, rank: int, resume_step: int):
    """Test instrumentation: per rank, the ids of every step (a resumed run first drops the steps it redoes)."""
    if not faults.get("trace_dir"):
        return None
    path = Path(faults["trace_dir"]) / TRACE_NAME.format(rank=rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
    return path


def _say(line: str) -> None:
    """A progress line from a worker to the driver's console (Ray Train's print patch would log it twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train student worker. Rank 0 also logs, checkpoints and evaluates (the others wait)."""
    import ray.train
    import torch

    from pipeline.coco import load_coco
    from pipeline.local import checkpoint_payload, evaluate_and_keep_best
    from trainer.checkpoint import save_checkpoint
    from trainer.engine import Engine
    from trainer.worker import EPOCH_COLUMN, ActiveMean, decode_stream_batch, null_batch, split_batches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = RunConfig.model_validate(config["cfg"])
    monitor, faults = config["monitor"], dict(config.get("faults") or {})
    try:
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = ray.train.torch.get_device() if cfg.pipeline.gpus_per_worker > 0 else torch.device("cpu")
        run = RunDir(cfg.run_dir)
        steps, n_images = config["total_steps"], config["num_images"]
        engine = Engine(cfg, device, steps, load_teacher=False)
        if config["resume"]:
            engine.load_state(load_checkpoint(run.last))
        sync = _Sync(world)
        hook = ActiveMean()
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            engine.wrap(lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None))
            hook.register(engine.forward_a)
        spec = StreamSpec.of(cfg)
        hard, soft = cfg.mode in ("lad", "solad"), cfg.mode in ("kd", "solad")
        val = load_coco(cfg.data.val, cfg.data.image_root) if rank == 0 and cfg.data.val else None
        trace = _trace(faults, rank, engine.step_count)
        trained = list(config["trained_ids"]) if rank == 0 else []
        best = dict(config["best"])
        shard = ray.train.get_dataset_shard("train")
        blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                    prefetch_batches=cfg.pipeline.prefetch_batches)
        stream = (part for block in blocks for part in split_batches(block))
        empty = null_batch(cfg.data.input_size, spec.num_anchors, spec.num_classes, device, hard=hard, soft=soft)

        BIG = 2 ** 62
        epoch, pending, exhausted = config["start_epoch"], None, False
        new_ids: list[int] = []
        last_eval: dict = {}
        stop_ref, stop_seen, newest_version = None, False, 0
        state = "succeeded"

        def gather_ids() -> None:
            nonlocal new_ids
            everyone = sync.gather(new_ids)
            new_ids = []
            if rank == 0:
                trained.extend(i for ids in everyone for i in ids)

        def save_last(ep: int, ids: list[int]) -> None:
            if rank == 0:
                save_checkpoint(run.last, checkpoint_payload(engine, cfg, ep, ids, best))

        def end_epoch(finished: bool) -> bool:
            """Evaluate and checkpoint as pipeline.local does at the end of an epoch (or of the run)."""
            nonlocal trained, best, last_eval
            gather_ids()
            epoch_done = len(trained) >= n_images
            due = cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0
            if val is not None and (finished or due):
                last_eval, best = evaluate_and_keep_best(engine, cfg, val, device, run, epoch, best,
                                                         say=_say if config["progress"] else None)
            sync.barrier()
            if epoch_done:
                trained = []
                save_last(epoch + 1, [])
            else:
                save_last(epoch, trained)
            if rank == 0:
                run.set_progress("running", engine.step_count, steps, epoch)
            return epoch_done

        while True:
            t_wait = time.perf_counter()
            if pending is None and not exhausted:
                pending = next(stream, None)
                exhausted = pending is None
            data_wait_ms = (time.perf_counter() - t_wait) * 1e3
            if rank == 0 and monitor is not None and not stop_seen:
                if stop_ref is None:
                    stop_ref = monitor.should_stop.remote()
                ready, _ = ray.wait([stop_ref], timeout=0)
                if ready:
                    stop_seen, stop_ref = bool(ray.get(stop_ref)), None
            mine = int(pending.column(EPOCH_COLUMN)[0].as_py()) if pending is not None else BIG
            agreed, stop = sync.min([mine, -int(stop_seen)])
            if stop:
                gather_ids()
                save_last(epoch, trained)
                state = "stopped"
                break
            if agreed > epoch:  # no worker has a batch of this epoch left
                end_epoch(finished=agreed == BIG)
                if agreed == BIG:
                    break
                epoch = agreed
            active = pending is not None and mine == epoch
            batch, t0 = None, time.perf_counter()
            if active:
                batch = decode_stream_batch(pending, spec.anchor_hash, spec.num_anchors, spec.num_classes, device,
                                            hard=hard, soft=soft)
                if batch.epoch != epoch:
                    raise RuntimeError(f"stream batch of epoch {batch.epoch} in epoch {epoch}")
                pending = None
            decode_ms = (time.perf_counter() - t0) * 1e3
            n_active, n_imgs = sync.sum([int(active), len(batch) if batch else 0])
            hook.set(active, n_active)
            t0 = time.perf_counter()
            if cfg.mode == "paa":
                images, boxes = (batch.images, batch.gt_boxes) if batch else empty[:2]
                result = engine.step(images, boxes, batch.gt_labels if batch else [torch.zeros(0, dtype=torch.long,
                                                                                               device=device)])
            elif batch is not None:
                result = engine.step_on_labels(batch.images, batch.gt_boxes, batch.labels, batch.soft)
            else:
                result = engine.step_on_labels(empty[0], empty[1], empty[2], empty[3])
            step_ms = (time.perf_counter() - t0) * 1e3
            if batch is not None:
                new_ids.extend(batch.image_ids)
                newest_version = max(newest_version, batch.teacher_version)
                if trace is not None:
                    with open(trace, "a") as f:
                        f.write(json.dumps({"step": engine.step_count, "epoch": epoch, "rank": rank,
                                            "ids": batch.image_ids}) + "\n")
            if faults.get("step_sleep_s"):  # a slow student, so a test can stop or kill it mid-epoch
                time.sleep(faults["step_sleep_s"])
            if faults.get("kill_worker_at_step") == engine.step_count and faults.get("worker_rank", 0) == rank:
                marker = Path(faults["marker"])
                if not marker.exists():
                    marker.write_text(str(engine.step_count))
                    os.kill(os.getpid(), signal.SIGKILL)
            if rank == 0:
                if monitor is not None:
                    monitor.report_consumed.remote(n_active)
                log_now = engine.step_count % cfg.train.log_every == 0 or engine.step_count == 1
                if batch is not None and log_now:
                    m = result.metrics
                    backlog = ray.get(monitor.backlog.remote()) if monitor is not None else None
                    record = {"step": engine.step_count, "epoch": epoch, **m, "step_ms": round(step_ms, 2),
                              "data_wait_ms": round(data_wait_ms, 2), "decode_ms": round(decode_ms, 2),
                              "images_per_s": round(n_imgs / max(step_ms + data_wait_ms + decode_ms, 1e-6) * 1e3, 2),
                              "workers_active": n_active, "backlog": backlog,
                              "teacher_version": batch.teacher_version,
                              "teacher_lag": newest_version - batch.teacher_version,
                              "payload_bytes": batch.payload_bytes, "image_bytes": batch.image_bytes}
                    if cfg.mode != "paa":
                        record["assign_ms"] = round(batch.assign_ms, 3)
                    run.log(record)
                    if config["progress"]:
                        _say(f"step {engine.step_count}/{steps} epoch {epoch} loss {m['loss']:.4f} "
                             f"lr {m['lr']:.2e} step {step_ms:.0f} ms wait {data_wait_ms:.0f} ms "
                             f"backlog {backlog} {record['images_per_s']:.1f} img/s")
            if engine.step_count >= steps:  # every rank steps every iteration: they agree without a collective
                end_epoch(finished=True)
                break
            if engine.step_count % cfg.train.checkpoint_every == 0:
                gather_ids()
                save_last(epoch, trained)
                if rank == 0:
                    run.set_progress("running", engine.step_count, steps, epoch)
        if rank == 0 and state == "succeeded" and not run.best.exists():
            save_checkpoint(run.best, checkpoint_payload(engine, cfg, epoch + 1, [], best))
        if rank == 0 and monitor is not None:
            ray.get(monitor.set_result.remote({"state": state, "step": engine.step_count, "epoch": epoch,
                                               "eval": last_eval}))
    except Exception as e:
        if monitor is not None:  # a failure of ours, not a lost process: the driver must not retry it
            ray.get(monitor.set_result.remote({"state": "failed", "error": f"{type(e).__name__}: {e}",
                                               "rank": rank}))
        raise


# ------------------------------------------------------------------------------------------------ the driver

def train(cfg: RunConfig, *, progress: bool = True, resume: bool = True, faults: Optional[dict] = None) -> dict:
    """Train `cfg` through the assigner service on Ray; returns the last evaluation ({network: stats}) or {}.

    `faults` is test instrumentation (kill an assigner or a worker once, trace trained ids; see the tests); a
    process that cannot pass it (`lad train` in a subprocess) can set the JSON in `LAD_PIPELINE_FAULTS`.
    """
    if faults is None and os.environ.get(FAULTS_ENV):
        faults = json.loads(os.environ[FAULTS_ENV])
    if cfg.mode == "colad":  # both networks assign each other's labels: no frozen-teacher pool applies
        from pipeline.colearn_run import train as colearn_train
        return colearn_train(cfg, progress=progress, resume=resume)
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline import ray_env

    # Ray Train gives a worker group 60 s to start; a loaded small machine can need more (propagated to Train).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    cfg, data, run, steps = prepare_run(cfg, workers=cfg.pipeline.num_workers)
    records = data.train.records
    stop = StopRequested()
    monitor = None

    def on_term(*_):  # finish the step, checkpoint, state "stopped" (the workers poll the monitor)
        stop.flag = True
        if monitor is not None:
            monitor.request_stop.remote()

    previous_handler, installed = None, False
    step, epoch = 0, 0
    started = False
    try:
        started = ray_env.connect(cfg)
        monitor = ray_env.StreamMonitor.remote()
        try:  # after ray.init, which installs its own SIGTERM handler in the driver
            previous_handler, installed = signal.signal(signal.SIGTERM, on_term), True
        except ValueError:  # not the main thread: whoever runs us handles signals
            pass
        budget = ray_env.budget(cfg, needs_assigners=cfg.mode != "paa")
        execution_options = ray_env.configure_data_context(cfg, budget)
        p = cfg.pipeline
        failures = 0
        while True:
            resuming = (resume or failures > 0) and run.last.exists()
            start_epoch, trained, best = 0, [], {"AP": -1.0, "step": 0}
            if resuming:
                ckpt = load_checkpoint(run.last)
                step = int(ckpt["step"])
                start_epoch, trained, best = (ckpt["progress"]["epoch"], list(ckpt["progress"]["trained_ids"]),
                                              ckpt["best"])
                del ckpt
                run.truncate_metrics(step)
            elif failures:
                run.truncate_metrics(0)
            epoch = start_epoch
            run.set_progress("running", step, steps, start_epoch)
            if stop.flag:
                run.set_progress("stopped", step, steps, start_epoch)
                return {}
            if step >= steps:  # a finished run resumed: nothing left to train (as pipeline.local)
                run.set_progress("succeeded", step, steps, start_epoch)
                return {}
            ray.get(monitor.reset_counters.remote())
            items = plan_run(cfg, records, start_epoch, trained, steps - step)
            ds = build_dataset(cfg, items, monitor, faults)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config=dict(cfg=cfg.to_dict(), monitor=monitor, faults=faults, total_steps=steps,
                                       num_images=len(records), resume=resuming, start_epoch=start_epoch,
                                       trained_ids=trained, best=best, progress=progress),
                scaling_config=ray.train.ScalingConfig(
                    num_workers=p.num_workers, use_gpu=p.gpus_per_worker > 0,
                    resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker}
                                                                        if p.gpus_per_worker else {})}),
                run_config=ray.train.RunConfig(
                    name=f"{cfg.name}-{int(time.time())}", storage_path=str(run.path / ".ray_train"),
                    failure_config=ray.train.FailureConfig(max_failures=0)),
                datasets={"train": ds}, dataset_config=_data_config(execution_options))
            try:
                trainer.fit()
                break
            except ray.train.TrainingFailedError as e:
                result = ray.get(monitor.snapshot.remote())["result"]
                if result.get("state") == "failed":  # an error in our code: retrying would fail the same way
                    raise RuntimeError(f"training worker rank {result.get('rank')} failed: {result['error']}") from e
                if failures >= p.max_failures or stop.flag:
                    raise
                failures += 1
                print(f"warning: a training worker was lost ({type(e).__name__}); resuming from {run.last} "
                      f"(recovery {failures} of {p.max_failures})", file=sys.stderr)
        result = ray.get(monitor.snapshot.remote())["result"]
        step, epoch = result.get("step", step), result.get("epoch", epoch)
        state = result.get("state", "failed")
        if state == "failed":
            raise RuntimeError(f"training failed: {result.get('error', 'no result from the workers')}")
        run.set_progress(state, step, steps, epoch)
        return result.get("eval", {})
    except BaseException as e:
        run.set_progress("failed", step, steps, epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if installed:  # None: the previous handler was not Python's (Ray's, from C): back to the default
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if monitor is not None and ray.is_initialized():
            ray.kill(monitor)
        ray_env.shutdown(started)

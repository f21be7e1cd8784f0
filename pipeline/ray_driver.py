"""The Ray driver of every Ray engine (`pipeline.engine: ray`): the assignment stream, co-learning inline and split.

    connect (private local Ray, RAY_ADDRESS or pipeline.ray_address) and check the resource budget
    a hub actor: the stream's monitor, or the co-learning coordinator (stop requests, the result, first error)
    worker group(s): one TorchTrainer (stream, inline) or two at once (split), each worker running `worker_loop`
    SIGTERM -> the hub's stop flag -> the workers checkpoint and leave with state 'stopped'
    a lost worker group -> a new one resumes from last.pt (the driver re-plans; Ray Train would replay the epoch)
    a lost hub -> a new hub from last.pt, and new worker groups as above; past pipeline.max_failures: RunLost

Every worker runs the one loop (`pipeline.loop.train_loop`) with its engine's batches and stepper.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Optional

import ray
import torch
import torch.distributed as dist

from pipeline import ray_env
from pipeline.coco import load_coco
from pipeline.errors import RunLost
from pipeline.local import NetworkStepper, absolute_paths, load_val, planned_batches, prepare_run
from pipeline.follow import FollowBar
from pipeline.loop import Collective, Start, epoch_budgets, read_start, train_loop
from schemas.config import RunConfig
from schemas.modes import mode_spec
from schemas.rundir import RunDir
from schemas.storage import Location
from trainer.checkpoint import load_checkpoint
from trainer.colad import SideEngine, side_state
from trainer.engine import Engine
from trainer.network import trainable
from trainer.worker import StreamSpec


# ------------------------------------------------------------------------------------------------ the workers

def lost_peer(error: BaseException) -> bool:
    """A collective failed because another rank's process is gone (gloo: "Connection closed by peer"; NCCL: a
    DistBackendError), or Ray Train, having seen it go, already tore this rank's process group down beneath the
    loop ("Default process group has not been initialized": seen under load in CI): the group is lost, which the
    driver recovers, not a bug of ours."""
    return isinstance(error, (dist.DistNetworkError, dist.DistBackendError)) or any(
        sign in str(error) for sign in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                        "Default process group has not been initialized"))


def worker_loop(config: dict) -> None:
    """One Ray Train worker of group 'stream', 'inline', 'a' or 'b'. Errors of ours reach the hub first (the
    driver must not retry them); a lost process, or a survivor's collective failing because of it, does not, and
    the driver resumes the run."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    group, hub = config["group"], config["hub"]
    try:
        _work(config, group, hub, rank, world)
    except Exception as e:
        from pipeline.colearn import CoordinatorAborted

        if lost_peer(e) or isinstance(e, CoordinatorAborted):  # the other group was lost (or failed first)
            raise
        msg = f"{'side ' + group if group in ('a', 'b') else group} rank {rank}: {type(e).__name__}: {e}"
        with contextlib.suppress(Exception):  # the hub is gone too: the driver reports the worker's error
            ray.get(hub.abort.remote(msg), timeout=30)
        raise


def _work(config: dict, group: str, hub, rank: int, world: int) -> None:
    import ray.train

    cfg = RunConfig.model_validate(config["cfg"])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = ray.train.torch.get_device() if ray_env.worker_resources(cfg, group)[1] > 0 else torch.device("cpu")
    run = RunDir(cfg.run_dir)
    start = Start(**config["start"])
    total, collective = config["total_steps"], Collective(rank, world)
    val = load_val(cfg, run.categories())  # each rank predicts a shard
    checkpoint = load_checkpoint(run.last) if start.resumed else None
    if group in ("stream", "inline"):  # batches read, decoded and (but for inline) assigned by Ray Data
        from pipeline.split import CoordinatorControl
        from pipeline.stream import StreamStepper, stream_batches

        engine = Engine(cfg, device, total, load_teacher=False)
        if checkpoint is not None:
            engine.load_state(checkpoint)
        if group == "stream":
            stepper = StreamStepper(cfg, run, engine, device, val, hub, collective)
        else:
            control = CoordinatorControl(hub, run) if rank == 0 else None
            stepper = NetworkStepper(cfg, run, engine, device, val, control, collective)
        batches = stream_batches(ray.train.get_dataset_shard("train"), cfg, device)
    else:  # split: both groups must see the same images in the same order, so each follows the plan itself
        from pipeline.split import SplitStepper

        batches = planned_batches(cfg, load_coco(cfg.data.train, cfg.data.image_root), start, total, rank, world)
        engine = SideEngine(cfg, group, device, total)
        if checkpoint is not None:
            engine.load_state(side_state(checkpoint, group, len(trainable(engine.model))))
        stepper = SplitStepper(cfg, run, group, engine, device, val, hub, collective)
    del checkpoint
    out = train_loop(cfg, stepper, batches, start, total=total, num_images=config["num_images"],
                     has_val=cfg.data.val is not None, collective=collective, progress=config["progress"],
                     tag=group if group != "stream" else "", observers=tuple(config["observers"]))
    if rank == 0 and group in ("stream", "inline"):  # split: the coordinator has it from the last commit
        ray.get(hub.set_result.remote({"state": out.state, "step": out.step, "epoch": out.epoch, "eval": out.eval}))


def torch_config(cfg: RunConfig, group: str):
    """The group's process group: gloo on CPUs; on GPUs NCCL for CUDA tensors (DDP's gradient buckets) and gloo for
    CPU tensors (the loop's per-step agreement), so no collective meets a device its group cannot carry."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="cpu:gloo,cuda:nccl" if ray_env.worker_resources(cfg, group)[1] > 0 else "gloo")


def ray_storage(where: Location) -> dict:
    """Ray Train's `storage_path` (its own run state; our checkpoints are the run directory's) beside the run:
    on object storage through the same pyarrow filesystem as the run directory, so the same endpoint and
    credentials serve both."""
    if not where.remote:
        return {"storage_path": str(where)}
    fs, key = where.filesystem_and_key()
    return {"storage_path": key, "storage_filesystem": fs}


def fit_group(cfg_dict: dict, group: str, loop_config: dict, datasets: Optional[dict] = None,
              dataset_config=None) -> str:
    """Run one worker group (a TorchTrainer) to its end; in split co-learning this runs in a zero-CPU task."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = RunConfig.model_validate(cfg_dict)
    cpus, gpus = ray_env.worker_resources(cfg, group)
    extra = dict(datasets=datasets, dataset_config=dataset_config) if datasets else {}
    TorchTrainer(
        worker_loop, train_loop_config={**loop_config, "group": group},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.pipeline.num_workers, use_gpu=gpus > 0,
                                               resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})}),
        torch_config=torch_config(cfg, group),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-{group}-{int(time.time())}",
                                       **ray_storage(Location(cfg.run_dir) / ".ray_train"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
        **extra).fit()
    return group


def _fit_split(cfg: RunConfig, loop_config: dict, coordinator) -> None:
    """Both groups at once, each TorchTrainer driven from a zero-CPU task; the first failure closes the other side's
    rendezvous at the coordinator, so it fails at once instead of waiting out the exchange timeout. A lost group is
    not the run's error (the driver resumes both); an error of ours reached the coordinator first."""
    task = ray.remote(num_cpus=0, max_retries=0)(fit_group)
    refs = {task.remote(cfg.to_dict(), side, loop_config): side for side in ("a", "b")}
    pending, first_error = list(refs), None
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception as e:
            if first_error is None:
                first_error = e
                coordinator.abort.remote(f"worker group {refs[done[0]]} was lost", error=False)
    if first_error is not None:
        raise first_error


# ------------------------------------------------------------------------------------------------ the driver

def new_hub(cfg: RunConfig, start: Start):
    """The run's hub actor: the co-learning coordinator (from the checkpoint's policy, step and best when there
    is one), or the stream's monitor."""
    if mode_spec(cfg.mode).co_learning:
        from pipeline.colearn import get_or_create

        deadline = time.monotonic() + 60
        while True:  # the run's coordinator has a fixed name (the control plane finds it by it); a lost one holds
            hub = get_or_create(cfg, start.policy or cfg.colearn.policy, start_step=start.step,  # it a moment
                                source="checkpoint" if start.policy else "config", best=start.best)
            try:
                ray.get(hub.start.remote())
                return hub
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    return ray_env.StreamMonitor.remote(cfg.pipeline.batches_ahead)


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = True, observers: tuple = (),
          verbose: bool = False) -> dict:
    """Train `cfg` on Ray; returns the last evaluation ({network: stats}) or {}. `observers`: told about
    every step of every worker and every batch assigned (`pipeline.loop.train_loop`), e.g. a test's tracer."""
    # Ray Train gives a worker group 60 s to start; a loaded small machine can need more (propagated to Train).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    if cfg.pipeline.assignment_store:  # a store made for other labels is refused before the run directory is made
        from pipeline.assignment_store import open_store

        open_store(absolute_paths(cfg), StreamSpec.of(cfg).anchor_hash, create=False)
    with prepare_run(cfg, workers=cfg.pipeline.num_workers) as (cfg, data, run, steps):
        if cfg.pipeline.assignment_store:  # the teacher and data are valid: a new store's manifest may be written
            open_store(cfg, StreamSpec.of(cfg).anchor_hash)
        return _drive(cfg, data, run, steps, resume=resume, progress=progress, observers=observers, verbose=verbose)


def _drive(cfg: RunConfig, data, run: RunDir, steps: int, *, resume: bool, progress: bool, observers: tuple,
           verbose: bool = False) -> dict:
    """`train` once its run is prepared (and its directory held): the hub, the worker group(s), the recoveries."""
    import ray.train

    colad = mode_spec(cfg.mode).co_learning
    split = colad and cfg.colearn.mode == "split"
    records = data.train.records
    ids = [r.image_id for r in records]
    start = read_start(run, resume)
    start.checkpoint = None  # each worker reads last.pt itself
    if start.step >= steps:  # a finished run resumed: nothing left to train
        run.set_progress("succeeded", start.step, steps, start.epoch)
        return {e["network"]: e["stats"] for e in run.evals()}
    pool = (cfg.pipeline.assigners,) * 3  # (min, initial, max) teacher actors; a store shrinks it to its misses
    if cfg.pipeline.assignment_store:
        from pipeline.assignment_store import epoch_misses, pool_sizes

        epochs = [e for e, _, _ in epoch_budgets(cfg, ids, start.epoch, start.trained_ids, steps - start.step,
                                                 cfg.pipeline.num_workers)]
        pool = pool_sizes(cfg.pipeline.assigners, epoch_misses(cfg, ids, epochs), len(ids))
    stopped, hub, started, follow = False, None, False, None
    previous_handler, installed = None, False

    def on_term(*_):  # the workers poll the hub: they checkpoint and leave with state "stopped"
        nonlocal stopped
        stopped = True
        if hub is not None:
            hub.request_stop.remote()

    try:
        groups = ("a", "b") if split else ("a",)
        if not (ray.is_initialized() or cfg.pipeline.ray_address or os.environ.get("RAY_ADDRESS")):
            ray_env.budget(cfg, groups, stream=not split, resources=ray_env.local_resources(),
                           teacher_pool=pool[2] > 0)  # before Ray
        started = ray_env.connect(cfg, verbose=verbose)
        budget = ray_env.budget(cfg, groups=groups, stream=not split, teacher_pool=pool[2] > 0)
        hub = new_hub(cfg, start)
        # after ray.init, which installs its own SIGTERM handler; off the main thread, whoever runs us handles them
        with contextlib.suppress(ValueError):
            previous_handler, installed = signal.signal(signal.SIGTERM, on_term), True
        failures, records_ref = 0, None
        run.set_progress("running", start.step, steps, start.epoch)  # "recovering" below until a step is logged
        if progress and not verbose:  # the workers' output stays in Ray's logs; the driver shows the bar
            follow = FollowBar(run, steps, start.step, f"{cfg.mode} {cfg.name}")
        while True:
            if stopped:
                run.set_progress("stopped", start.step, steps, start.epoch)
                return {}
            loop_config = dict(cfg=cfg.to_dict(), hub=hub, total_steps=steps, num_images=len(records),
                               start={k: v for k, v in vars(start).items() if k != "checkpoint"},
                               progress=progress, observers=tuple(observers))
            try:
                if split:
                    _fit_split(cfg, loop_config, hub)
                else:  # the stream (assigned by the pool), or inline co-learning's (read and decoded only)
                    from pipeline.plan_source import PlanSource, records_table
                    from pipeline.stream import build_dataset, data_config

                    options = ray_env.configure_data_context(budget)  # before the dataset takes the context
                    if records_ref is None:
                        records_ref = ray.put(records_table(records))
                    source = PlanSource(cfg, ids, start, steps - start.step, [r.width >= r.height for r in records])
                    if not colad:
                        ray.get(hub.set_plan.remote(source.offsets))
                    ds = build_dataset(cfg, source, records_ref, None if colad else hub, observers, pool)
                    fit_group(cfg.to_dict(), "inline" if colad else "stream", loop_config, datasets={"train": ds},
                              dataset_config=data_config(options))
                break
            except Exception as e:
                try:
                    error, hub_lost = ray.get(hub.error_message.remote()), False
                except ray.exceptions.RayActorError:  # the hub's process died (the workers failed calling it)
                    error, hub_lost = None, True
                if error:  # an error in our code: retrying would fail the same way
                    raise RuntimeError(f"training failed: {error}") from e
                if hub_lost:
                    what = "the co-learning coordinator" if colad else "the stream monitor"
                elif isinstance(e, (ray.train.TrainingFailedError, ray.exceptions.WorkerCrashedError,
                                    ray.exceptions.NodeDiedError)):
                    what = "a training worker"  # of the group, or (split) the task that drives its TorchTrainer
                else:  # not a lost process
                    raise
                if stopped:
                    raise
                reason = f"{what} was lost ({type(e).__name__})"
                if failures >= cfg.pipeline.max_failures:
                    raise RunLost(f"{reason} after {failures} recoveries (pipeline.max_failures); {run.last} is "
                                  "whole: run the same command again to resume from it") from None
                failures += 1
                warning = (f"warning: {reason}; resuming from {run.last} "
                           f"(recovery {failures} of {cfg.pipeline.max_failures})")
                follow.write(warning) if follow else print(warning, file=sys.stderr)
                start = read_start(run, True)
                start.checkpoint = None
                run.set_progress("recovering", start.step, steps, start.epoch, recovery={
                    "attempt": failures, "max": cfg.pipeline.max_failures, "reason": reason, "since": time.time()})
                if hub_lost:  # a new one, from the checkpoint (policy, step, best), as a restarted driver makes
                    ray.kill(hub)  # frees the lost one's name in the cluster for the new one
                    hub = new_hub(cfg, start)
                else:
                    ray.get(hub.rewind.remote(start.step, start.best))  # forget what came after the checkpoint
        result = ray.get(hub.result.remote())
        if result.get("state") not in ("succeeded", "stopped"):
            raise RuntimeError(f"training failed: {result.get('error', 'no result from the workers')}")
        if colad:
            run.write_json("colearn.json", ray.get(hub.summary.remote()))
        run.set_progress(result["state"], result["step"], steps, result["epoch"])
        return result.get("eval", {})
    except BaseException as e:
        run.fail(f"{type(e).__name__}: {e}")
        raise
    finally:
        if follow is not None:
            follow.close()
        if installed:  # None: the previous handler was not Python's (Ray's, from C): back to the default
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if hub is not None and ray.is_initialized():
            ray.kill(hub)
        ray_env.shutdown(started)

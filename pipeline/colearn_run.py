"""CoLAD through Ray: `mode: colad` with `pipeline.engine: ray` (what `pipeline.run` dispatches to).

inline (`colearn.mode: inline`, the default)
    One Ray Train TorchTrainer of `pipeline.num_workers` workers (gloo DDP on CPU, NCCL on GPUs). Every worker
    holds both networks and runs `Engine.step` (mode colad: forward A and B, `colad_choose` under the policy,
    PAA selection, both train) on its own batch. Rank 0 reads the coordinator's policy each step from a
    long-poll (`pipeline.colearn.PolicyWatch`, one `ray.wait(timeout=0)`) and broadcasts it with the stop flag
    to the other ranks in one 2-int collective, so every rank switches at the same step.

split (`colearn.mode: split`)
    Two TorchTrainers, one per network, each with `pipeline.num_workers` workers and its own DDP group and
    resources (`pipeline.cpus/gpus_per_worker` for A, `colearn.cpus/gpus_per_worker_b` for B); each is driven
    from a zero-CPU Ray task, so both groups run at once. Both groups plan the same batches (the plan is a pure
    function of the seed, see `plan_run`), so rank r of A and rank r of B see the same images in the same
    order. Per step each side scores its candidates (`trainer.colearn.SideEngine.score`), sends them sparse to
    the coordinator (`exchange`), trains on the common assignment it gets back, and exchanges per-parameter
    gradient norms (`finish`: the clip is over both networks, as in-process). The coordinator writes the run
    directory (metrics lines from both halves, eval.json, checkpoints merged to the in-process layout).

Data: every worker decodes its own batches with the in-process `DetectionDataset` (the flip is a pure function of
(image id, epoch, seed)); the plan is the assigner stream's (`pipeline.assigner.plan_batches`): per epoch the
in-process order minus ids already trained (resume), cut into per-worker batches, nothing dropped, a worker
without a batch at the last step steps on a blank image whose gradient is discarded (`ActiveMean`). With one
worker, inline and split train exactly the batches, assignments, losses and weights of `pipeline.local`.

The run directory is the in-process one: config.yaml, metrics.jsonl (+ `{"event": "policy"}` lines), eval.json
(networks a and b), progress.json, checkpoints/last.pt and best.pt (both networks), plus colearn.json (the
coordinator's summary: policy history, teacher ratio per step, per level, per size).
"""
from __future__ import annotations

import hashlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional


from pipeline.local import StopRequested, epoch_order, prepare_run
from pipeline.rundir import RunDir
from schemas.config import ConfigError, RunConfig
from schemas.files import atomic_write_text
from trainer.checkpoint import load_checkpoint

Plan = list  # [(epoch, [[dataset indices | None] per rank] per step)]



def plan_run(cfg: RunConfig, image_ids: list[int], start_epoch: int, trained_ids: list[int],
             remaining_steps: int, world: int) -> Plan:
    """Per remaining epoch, per step, per rank: the dataset indices of that rank's batch (None: no batch)."""
    from pipeline.assigner import plan_batches

    done = set(int(i) for i in trained_ids)
    plan = []
    for epoch in range(start_epoch, cfg.train.epochs):
        if remaining_steps <= 0:
            break
        order = [int(i) for i in epoch_order(len(image_ids), cfg.seed, epoch)
                 if epoch != start_epoch or int(image_ids[i]) not in done]
        batches = plan_batches(order, cfg.train.batch_size, world)
        steps = [batches[k:k + world] for k in range(0, len(batches), world)][:remaining_steps]
        plan.append((epoch, [s + [None] * (world - len(s)) for s in steps]))
        remaining_steps -= len(steps)
    return plan



def _digest(labels) -> str:
    h = hashlib.sha1()
    for t in (labels.labels, labels.gt_index, labels.ignore):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the workers

def worker_loop(config: dict) -> None:
    """One Ray Train worker: side 'both' (inline: both networks), or 'a' / 'b' (split: one network)."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    side, coordinator = config["side"], config["coordinator"]
    try:
        _worker(config, rank, world)
    except Exception as e:
        msg = f"{'inline' if side == 'both' else 'side ' + side} rank {rank}: {type(e).__name__}: {e}"
        try:
            if side == "both":
                import ray
                ray.get(coordinator.set_result.remote({"state": "failed", "error": msg}))
            else:
                coordinator.abort.remote(msg)
        except Exception:  # the coordinator is gone too: the driver reports the worker's error
            pass
        raise


def _worker(config: dict, rank: int, world: int) -> None:
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from pipeline.assigner import StreamSpec
    from pipeline.coco import load_coco
    from pipeline.colearn import PolicyWatch, policy_code, policy_name
    from pipeline.dataset import DetectionDataset, collate
    from pipeline.local import checkpoint_payload, evaluate_and_keep_best, to_device
    from pipeline.validate import evaluate_network
    from trainer.assigner_core import sparse_to_labels
    from trainer.checkpoint import save_checkpoint
    from trainer.colearn import SideEngine, count_metrics, side_metrics, side_state, to_sparse
    from trainer.engine import Engine
    from trainer.worker import ActiveMean, null_batch

    cfg = RunConfig.model_validate(config["cfg"])
    side, coordinator = config["side"], config["coordinator"]
    inline = side == "both"
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    use_gpu = (cfg.pipeline.gpus_per_worker if side != "b" else
               (cfg.colearn.gpus_per_worker_b if cfg.colearn.gpus_per_worker_b is not None
                else cfg.pipeline.gpus_per_worker)) > 0
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    run = RunDir(cfg.run_dir)
    steps, n_images = config["total_steps"], config["num_images"]
    engine = Engine(cfg, device, steps, load_teacher=False) if inline else SideEngine(cfg, side, device, steps)
    if config["resume"]:
        ckpt = load_checkpoint(run.last)
        if inline:
            engine.load_state(ckpt)
        else:
            engine.load_state(side_state(ckpt, side, len(list(engine.model.parameters()))))
        del ckpt
    hook = ActiveMean()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine.wrap(lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None))
        for module in ((engine.forward_a, engine.forward_b) if inline else (engine.forward,)):
            hook.register(module)
    train_data = load_coco(cfg.data.train, cfg.data.image_root)
    image_ids = [r.image_id for r in train_data.records]
    dataset = DetectionDataset(train_data, cfg.data.input_size, train=True, seed=cfg.seed,
                               flip_prob=cfg.data.flip_prob)
    val = load_coco(cfg.data.val, cfg.data.image_root) if rank == 0 and cfg.data.val else None
    spec = StreamSpec.of(cfg)
    empty = null_batch(cfg.data.input_size, spec.num_anchors, spec.num_classes, device, hard=True, soft=False)
    no_labels = [torch.zeros(0, dtype=torch.long, device=device)]
    plan = plan_run(cfg, image_ids, config["start_epoch"], config["trained_ids"], steps - engine.step_count, world)
    trained = list(config["trained_ids"])
    best = dict(config["best"])
    watch = PolicyWatch(coordinator) if inline and rank == 0 else None
    faults = dict(config.get("faults") or {})
    trace = Path(faults["trace_dir"]) / f"trace.{side}.rank{rank}.jsonl" if faults.get("trace_dir") else None
    last_eval: dict = {}
    state, epoch = "succeeded", config["start_epoch"]

    def save_last(ep: int, ids: list[int]) -> None:  # inline only: split checkpoints go through the coordinator
        if rank == 0:
            save_checkpoint(run.last, checkpoint_payload(engine, cfg, ep, ids, best))

    def sync(ep: int, *, evaluate: bool, last: Optional[tuple] = None, final: Optional[str] = None) -> None:
        """Split: both sides' rank 0 meet at the coordinator with their states (and evaluations)."""
        nonlocal best, last_eval
        if rank != 0:
            return
        ev = None
        if evaluate and val is not None:
            ev = evaluate_network(engine.model, engine.anchors, val, cfg.data.input_size, cfg.inference, device)[0]
        part = {"state": engine.state(), "epoch": ep, "eval": ev, "final": final, "total_steps": steps,
                "last": {"epoch": last[0], "trained_ids": list(last[1])} if last is not None else None}
        best = ray.get(coordinator.sync.remote(engine.step_count, side, part))["best"]
        if ev is not None:
            last_eval = {side: ev}

    stop = False
    for epoch, epoch_steps in plan:
        dataset.set_epoch(epoch)
        for per_rank in epoch_steps:
            t_wait = time.perf_counter()
            mine = per_rank[rank]
            batch = collate([dataset[i] for i in mine]) if mine else None
            images, boxes, labels = to_device(batch, device) if batch else (empty[0], empty[1], no_labels)
            data_wait_ms = (time.perf_counter() - t_wait) * 1e3
            step_index = engine.step_count
            fail = faults.get("fail_at_step") or {}
            if fail.get("step") == step_index + 1 and fail.get("side", side) == side and fail.get("rank", 0) == rank:
                raise RuntimeError(f"injected failure before step {step_index + 1} (test)")
            n_active = sum(1 for b in per_rank if b)
            hook.set(batch is not None, n_active)
            step_ids = [int(image_ids[i]) for b in per_rank if b for i in b]
            log_now = (step_index + 1) % cfg.train.log_every == 0 or step_index == 0
            if inline:
                # -- the policy (and the stop request) for this step: rank 0 reads, everyone applies the same
                t0 = time.perf_counter()
                code, stop_flag = 0, 0
                if rank == 0:
                    control = watch.poll()
                    code, stop_flag = policy_code(control["policy"]), int(control["stop"])
                if world > 1:
                    t = torch.tensor([code, stop_flag], dtype=torch.int64)
                    dist.broadcast(t, 0)
                    code, stop_flag = t.tolist()
                control_ms = (time.perf_counter() - t0) * 1e3
                if stop_flag:
                    save_last(epoch, trained)
                    state, stop = "stopped", True
                    break
                name = policy_name(code)
                if name != engine.policy.name:
                    engine.set_policy(name)
                    if rank == 0:
                        run.log({"step": step_index, "event": "policy", "policy": name})
                        coordinator.applied.remote(step_index, name)
                t0 = time.perf_counter()
                result = engine.step(images, boxes, labels)
                step_ms = (time.perf_counter() - t0) * 1e3
                counts = result.choice.role_counts(boxes) if batch is not None else None
                flat = [0] * (2 * len(cfg.model.fpn_levels) + 6 + 1)
                if counts is not None:
                    flat = (counts["taught_level"] + counts["defined_level"] + counts["taught_size"]
                            + counts["defined_size"] + [int(result.metrics["num_pos"])])
                if world > 1:
                    t = torch.tensor(flat, dtype=torch.int64)
                    dist.all_reduce(t)
                    flat = t.tolist()
                nl = len(cfg.model.fpn_levels)
                g_counts = {"taught_level": flat[:nl], "defined_level": flat[nl:2 * nl],
                            "taught_size": flat[2 * nl:2 * nl + 3], "defined_size": flat[2 * nl + 3:2 * nl + 6]}
                if trace is not None and batch is not None:
                    with open(trace, "a") as f:
                        f.write(json.dumps({"step": engine.step_count, "ids": [int(i) for i in batch["image_ids"]],
                                            "labels": _digest(result.labels)}) + "\n")
                if rank == 0:
                    coordinator.record.remote(engine.step_count, epoch, engine.policy.name, g_counts)
                    if log_now:
                        m = result.metrics
                        record = {"step": engine.step_count, "epoch": epoch, **m, **count_metrics(g_counts),
                                  "num_pos": flat[-1], "step_ms": round(step_ms, 2),
                                  "data_wait_ms": round(data_wait_ms, 2), "control_ms": round(control_ms, 3),
                                  "images_per_s": round(len(step_ids) / max(step_ms + data_wait_ms, 1e-6) * 1e3, 2),
                                  "workers_active": n_active}
                        run.log(record)
                        run.set_progress("running", engine.step_count, steps, epoch)
                        if config["progress"]:
                            _say(f"step {engine.step_count}/{steps} epoch {epoch} loss {m['loss']:.4f} "
                                 f"policy {m['policy']} teacher ratio {record['teacher_ratio']} "
                                 f"step {step_ms:.0f} ms")
            else:
                # -- split: one network; meet the other side at the coordinator twice
                t0 = time.perf_counter()
                scored = engine.score(images, boxes, labels)
                t1 = time.perf_counter()
                if batch is not None:
                    ids = [int(i) for i in batch["image_ids"]]
                    res = ray.get(coordinator.exchange.remote(step_index, rank, side,
                                                              to_sparse(scored, ids, boxes, labels)))
                    pos, gt, ign = zip(*res["assignment"])
                    common = sparse_to_labels(list(pos), list(gt), list(ign), labels, spec.num_anchors,
                                              spec.num_classes, device)
                else:
                    common = empty[2]
                t2 = time.perf_counter()
                losses = engine.loss(scored, common, boxes)
                total = sum(losses.values())
                norms = engine.backward(total)
                t3 = time.perf_counter()
                fin = ray.get(coordinator.finish.remote(
                    step_index, rank, side, norms.cpu().numpy() if norms is not None else None, {"epoch": epoch}))
                t4 = time.perf_counter()
                as_t = (lambda x: torch.from_numpy(x) if x is not None else None)
                engine.apply(as_t(fin["norms_a"]), as_t(fin["norms_b"]))
                t5 = time.perf_counter()
                if trace is not None and batch is not None:
                    with open(trace, "a") as f:
                        f.write(json.dumps({"step": engine.step_count, "ids": ids, "labels": _digest(common)}) + "\n")
                if rank == 0 and log_now:
                    m = side_metrics(side, losses, scored)
                    m.update(epoch=epoch, lr=engine.optimizer.param_groups[0]["lr"], forward_ms=round((t1 - t0) * 1e3, 3),
                             exchange_ms=round((t2 - t1) * 1e3, 3), backward_ms=round((t3 - t2) * 1e3, 3),
                             finish_ms=round((t4 - t3) * 1e3, 3), step_ms=round((t5 - t0) * 1e3, 2),
                             data_wait_ms=round(data_wait_ms, 2), images=len(step_ids), total_steps=steps)
                    coordinator.log_side.remote(step_index, side, m)
                stop = bool(fin["stop"])
            trained.extend(step_ids)
            if faults.get("stop_request_at_step") == engine.step_count and rank == 0 and side in ("both", "a"):
                ray.get(coordinator.request_stop.remote())  # as the driver's SIGTERM handler does (test)
            if engine.step_count % cfg.train.checkpoint_every == 0 and not stop:
                full = len(trained) >= n_images
                if inline:
                    save_last(epoch + int(full), [] if full else trained)
                else:
                    sync(epoch, evaluate=False, last=(epoch + int(full), [] if full else trained))
            if stop:
                if not inline:
                    sync(epoch, evaluate=False, last=(epoch, trained), final="stopped")
                state = "stopped"
                break
        if stop:
            break
        # -- end of the epoch (or of the run): as pipeline.local
        epoch_done = len(trained) >= n_images
        finished = engine.step_count >= steps
        due = bool(cfg.train.eval_every) and (epoch + 1) % cfg.train.eval_every == 0
        evaluate = val is not None and (finished or due)
        if inline:
            if rank == 0 and evaluate:
                last_eval, best = evaluate_and_keep_best(engine, cfg, val, device, run, epoch, best,
                                                         say=_say if config["progress"] else None)
            ids_after = [] if epoch_done else trained
            if finished:
                save_last(epoch + int(epoch_done), ids_after)
            elif rank == 0:
                run.set_progress("running", engine.step_count, steps, epoch)
        else:
            ids_after = [] if epoch_done else trained
            if finished:
                sync(epoch, evaluate=evaluate, last=(epoch + int(epoch_done), ids_after), final="succeeded")
            elif evaluate:
                sync(epoch, evaluate=True)
        trained = [] if epoch_done else trained
        if finished:
            break
    if inline and rank == 0:
        if state == "succeeded" and not run.best.exists():
            save_checkpoint(run.best, checkpoint_payload(engine, cfg, epoch + 1, [], best))
        ray.get(coordinator.set_result.remote({"state": state, "step": engine.step_count, "epoch": epoch,
                                               "eval": last_eval}))


# ------------------------------------------------------------------------------------------------ the driver

def _scaling(cfg: RunConfig, side: str):
    import ray.train

    p, c = cfg.pipeline, cfg.colearn
    cpus = c.cpus_per_worker_b if side == "b" and c.cpus_per_worker_b is not None else p.cpus_per_worker
    gpus = c.gpus_per_worker_b if side == "b" and c.gpus_per_worker_b is not None else p.gpus_per_worker
    return ray.train.ScalingConfig(num_workers=p.num_workers, use_gpu=gpus > 0,
                                   resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {})})


def fit_group(cfg_dict: dict, side: str, loop_config: dict) -> str:
    """Run one worker group (a TorchTrainer) to its end; in split mode this runs inside a zero-CPU Ray task."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = RunConfig.model_validate(cfg_dict)
    trainer = TorchTrainer(
        worker_loop, train_loop_config={**loop_config, "side": side},
        scaling_config=_scaling(cfg, side),
        run_config=ray.train.RunConfig(name=f"{cfg.name}-{side}-{int(time.time())}",
                                       storage_path=str(Path(cfg.run_dir) / ".ray_train"),
                                       failure_config=ray.train.FailureConfig(max_failures=0)))
    trainer.fit()
    return side


def _check_resources(cfg: RunConfig) -> None:
    import ray

    p, c = cfg.pipeline, cfg.colearn
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    need_cpu = p.num_workers * p.cpus_per_worker
    need_gpu = p.num_workers * p.gpus_per_worker
    if c.mode == "split":
        need_cpu += p.num_workers * (c.cpus_per_worker_b if c.cpus_per_worker_b is not None else p.cpus_per_worker)
        need_gpu += p.num_workers * (c.gpus_per_worker_b if c.gpus_per_worker_b is not None else p.gpus_per_worker)
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        from pipeline.ray_env import PipelineResourceError

        raise PipelineResourceError(
            f"co-learning ({c.mode}) needs {need_cpu:g} CPUs and {need_gpu:g} GPUs for its workers but the Ray "
            f"cluster has {cpus:g} and {gpus:g}; lower pipeline.num_workers / cpus_per_worker / gpus_per_worker"
            + (" / colearn.cpus_per_worker_b / gpus_per_worker_b" if c.mode == "split" else ""))


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = True, faults: Optional[dict] = None) -> dict:
    """Train a colad config on Ray (inline or split); returns the last evaluation ({network: stats}) or {}."""
    if cfg.mode != "colad":
        raise ConfigError(f"pipeline.colearn_run trains mode colad, not {cfg.mode!r}")
    import ray

    from pipeline import ray_env
    from pipeline.colearn import get_or_create
    cfg, data, run, steps = prepare_run(cfg, workers=cfg.pipeline.num_workers)
    records = data.train.records
    step, start_epoch, trained, best = 0, 0, [], {"AP": -1.0, "step": 0}
    policy, source = cfg.colearn.policy, "config"
    resuming = resume and run.last.exists()
    if resuming:
        ckpt = load_checkpoint(run.last)
        step = int(ckpt["step"])
        start_epoch, trained, best = ckpt["progress"]["epoch"], list(ckpt["progress"]["trained_ids"]), ckpt["best"]
        policy, source = ckpt.get("policy") or policy, "checkpoint"
        del ckpt
        run.truncate_metrics(step)
        evals = run.read_evals()  # evaluations after the checkpoint (a crash) will be made again
        if any(e.get("step", 0) > step for e in evals):
            atomic_write_text(run.eval_path, json.dumps([e for e in evals if e.get("step", 0) <= step], indent=1))
    if step >= steps:  # a finished run resumed: nothing left (as pipeline.local)
        run.set_progress("succeeded", step, steps, start_epoch)
        return {}
    stop = StopRequested()
    coordinator = None
    previous_handler, installed, started = None, False, False
    epoch = start_epoch

    def on_term(*_):
        stop.flag = True
        if coordinator is not None:
            coordinator.request_stop.remote()

    try:
        started = ray_env.connect(cfg)
        _check_resources(cfg)
        coordinator = get_or_create(cfg, policy, start_step=step, source=source, split=cfg.colearn.mode == "split",
                                    best=best)
        ray.get(coordinator.start.remote())
        try:  # after ray.init, which installs its own SIGTERM handler in the driver
            previous_handler, installed = signal.signal(signal.SIGTERM, on_term), True
        except ValueError:  # not the main thread
            pass
        run.set_progress("running", step, steps, start_epoch)
        loop_config = dict(cfg=cfg.to_dict(), coordinator=coordinator, total_steps=steps, num_images=len(records),
                           resume=resuming, start_epoch=start_epoch, trained_ids=trained, best=best,
                           progress=progress, faults=faults)
        if cfg.colearn.mode == "inline":
            try:
                fit_group(cfg.to_dict(), "both", loop_config)
            except Exception as e:
                result = ray.get(coordinator.result.remote())
                if result.get("state") == "failed":
                    raise RuntimeError(f"co-learning worker failed: {result.get('error')}") from e
                raise
        else:
            _fit_split(cfg, loop_config, coordinator)
        result = ray.get(coordinator.result.remote())
        state = result.get("state", "failed")
        step, epoch = result.get("step", step), result.get("epoch", epoch)
        if state == "failed":
            raise RuntimeError(f"co-learning failed: {result.get('error', 'no result from the workers')}")
        try:
            (run.path / "colearn.json").write_text(json.dumps(ray.get(coordinator.summary.remote()), default=_none))
        except Exception as e:  # the summary is a convenience; metrics.jsonl has every logged step
            print(f"warning: could not write colearn.json: {e}", file=sys.stderr)
        run.set_progress(state, step, steps, epoch)
        return result.get("eval", {})
    except BaseException as e:
        run.set_progress("failed", step, steps, epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous_handler if previous_handler is not None else signal.SIG_DFL)
        if coordinator is not None and ray.is_initialized():
            ray.kill(coordinator)
        ray_env.shutdown(started)


def _none(x):
    return None


def _fit_split(cfg: RunConfig, loop_config: dict, coordinator) -> None:
    """Both groups at once, each TorchTrainer driven from a zero-CPU task; the first failure aborts the other
    side's rendezvous at the coordinator so it fails at once instead of waiting out the exchange timeout."""
    import ray

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
                coordinator.abort.remote(f"worker group {refs[done[0]]} failed")
    if first_error is not None:
        error = ray.get(coordinator.error_message.remote())  # the first failure reported (the root cause)
        raise RuntimeError(f"split co-learning failed: {error or first_error}") from first_error

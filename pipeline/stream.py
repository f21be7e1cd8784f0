"""The assignment stream (`pipeline.engine: ray`): Ray Data feeds the student workers.

    planned batches ─> read_batch (CPU tasks: decode, letterbox, flip)
        ─> TeacherAssigner pool (actors: teacher forward + batched PAA assignment, one Arrow batch per batch;
           modes without a teacher, paa and co-learning inline, skip the pool)
        ─> streaming_split(N, equal=False) ─> N Ray Train (TorchTrainer) student workers, DDP

The plan, the loop and the checkpoints are those of every engine (`pipeline.loop`); the driver is
`pipeline.ray_driver`. With one worker the student takes the in-process run's steps on the same labels.

Exactly once per epoch: the driver plans the batches from `checkpoints/last.pt` (`progress.trained_ids`), so ids
already trained never reach the teacher; nothing is dropped (`equal=False`, and a step where some workers have
no batch left averages the gradient over the workers that have one, see `trainer.worker.ActiveMean`). A dead
assigner actor is restarted by Ray and its batch retried: an actor call returns its batch or nothing.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Iterator, Optional

from pipeline.assigner import StreamSpec, TeacherAssigner, batch_items, read_batch
from pipeline.local import Evaluating, data_parallel
from pipeline.loop import Batch, Collective, Stepped, Stepper, plan_run
from schemas.config import RunConfig
from schemas.modes import mode_spec
from schemas.rundir import RunDir


def stream_items(cfg: RunConfig, records: list, start, remaining_steps: int) -> list:
    """Ray Data items for the rest of the run: the plan of every engine (`pipeline.loop.plan_run`), one item per
    worker batch."""
    image_ids = [r.image_id for r in records]
    items: list = []
    for epoch, steps in plan_run(cfg, image_ids, start.epoch, start.trained_ids, remaining_steps,
                                 cfg.pipeline.num_workers):
        items += batch_items(records, epoch, [b for step in steps for b in step])
    return items


def build_dataset(cfg: RunConfig, items: list, monitor: Any = None, observers: tuple = ()):
    """The stream: planned batches -> images (CPU tasks) -> assignments (the actor pool), one block per batch."""
    import ray

    p = cfg.pipeline
    spec = StreamSpec.of(cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                        num_cpus=p.cpus_per_read_task,
                        fn_kwargs=dict(spec=spec, seed=cfg.seed, flip_prob=cfg.data.flip_prob))
    if not mode_spec(cfg.mode).needs_teacher:  # paa: data only, the student assigns its own labels
        return ds
    # Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1 (its defaults; passing them is
    # deprecated in 2.60), so a lost actor is restarted and its batch re-run. An exception raised by the
    # assigner is not retried: it fails the run with its message.
    return ds.map_batches(
        TeacherAssigner, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=p.assigners),
        num_cpus=p.cpus_per_assigner, num_gpus=p.gpus_per_assigner or None,
        fn_constructor_kwargs=dict(cfg=cfg.to_dict(), monitor=monitor, observers=observers))


def data_config(execution_options):
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

def stream_batches(shard, cfg: RunConfig, device) -> Iterator[Batch]:
    """This worker's share of the stream, decoded onto its device."""
    from trainer.worker import decode_stream_batch, split_batches

    spec, mode = StreamSpec.of(cfg), mode_spec(cfg.mode)
    blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=cfg.pipeline.prefetch_batches)
    for block in blocks:
        for part in split_batches(block):
            t0 = time.perf_counter()
            sb = decode_stream_batch(part, spec.anchor_hash, spec.num_anchors, spec.num_classes, device,
                                     hard=mode.teacher_hard, soft=mode.soft)
            yield Batch(sb.epoch, sb.image_ids, sb, (time.perf_counter() - t0) * 1e3)


class StreamStepper(Evaluating, Stepper):
    """The student's step on streamed labels (`Engine.step_on_labels`; mode paa assigns its own, `Engine.step`)."""

    def __init__(self, cfg: RunConfig, run: RunDir, engine, device, val, monitor: Any,
                 collective: Collective = Collective()):
        from trainer.worker import null_batch

        self.cfg, self.run, self.engine, self.device, self.val = cfg, run, engine, device, val
        self.monitor, self.rank = monitor, collective.rank
        self.mode = mode_spec(cfg.mode)
        self.hook = data_parallel(engine, device, collective.world, modules=("forward_a",))
        spec = StreamSpec.of(cfg)
        self.idle = null_batch(cfg.data.input_size, spec.num_anchors, spec.num_classes, device,
                               hard=self.mode.teacher_hard, soft=self.mode.soft)
        self.newest_version = 0
        self.stop_ref: Optional[Any] = None
        self.stop_seen = False

    def poll(self):
        """The driver's stop request (SIGTERM), read without waiting: one call to the monitor always in flight."""
        import ray

        if self.monitor is not None and not self.stop_seen:
            if self.stop_ref is None:
                self.stop_ref = self.monitor.should_stop.remote()
            ready, _ = ray.wait([self.stop_ref], timeout=0)
            if ready:
                self.stop_seen, self.stop_ref = bool(ray.get(self.stop_ref)), None
        return self.stop_seen, None

    def step(self, batch: Optional[Batch], num_active: int, epoch: int) -> Stepped:
        self.hook.set(batch is not None, num_active)
        sb = batch.data if batch is not None else None
        b = sb if sb is not None else self.idle
        if not self.mode.teacher_hard and not self.mode.soft:  # paa: the student assigns its own labels
            result = self.engine.step(b.images, b.gt_boxes, b.gt_labels)
        else:
            result = self.engine.step_on_labels(b.images, b.gt_boxes, b.labels, b.soft)
        if self.rank == 0 and self.monitor is not None:
            self.monitor.report_consumed.remote(num_active)
        if sb is None:
            return Stepped(None)
        self.newest_version = max(self.newest_version, sb.teacher_version)
        record = {**result.metrics, "decode_ms": round(batch.decode_ms, 2), "teacher_version": sb.teacher_version,
                  "teacher_lag": self.newest_version - sb.teacher_version, "payload_bytes": sb.payload_bytes,
                  "image_bytes": sb.image_bytes}
        if self.mode.teacher_hard or self.mode.soft:
            record["assign_ms"] = round(sb.assign_ms, 3)
        return Stepped(record, sb.labels)

    def log(self, record: dict, total: int) -> None:
        import ray

        record["backlog"] = ray.get(self.monitor.backlog.remote()) if self.monitor is not None else None
        super().log(record, total)

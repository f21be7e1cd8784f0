"""The assignment stream (`pipeline.engine: ray`): Ray Data feeds the student workers.

    planned batches ─> TeacherAssigner pool (actors: read the files, decode, teacher forward + batched PAA
                           assignment; one Arrow batch per training batch, images as their encoded files)
                       or, modes without a teacher (paa, co-learning inline), read_batch (CPU tasks: the files)
        ─> streaming_split(N, equal=False) ─> N Ray Train (TorchTrainer) student workers, DDP; each decodes its
           images in a background thread (`stream_batches`)

At most `pipeline.max_batches_ahead` batches exist ahead of the students (`pipeline.ray_env.StreamMonitor`).

The plan, the loop and the checkpoints are those of every engine (`pipeline.loop`); the driver is
`pipeline.ray_driver`. With one worker the student takes the in-process run's steps on the same labels.

Exactly once per epoch: the driver plans the batches from `checkpoints/last.pt` (`progress.trained_ids`), so ids
already trained never reach the teacher; nothing is dropped (`equal=False`, and a step where some workers have
no batch left averages the gradient over the workers that have one, see `trainer.worker.ActiveMean`). A dead
assigner actor is restarted by Ray and its batch retried: an actor call returns its batch or nothing.
"""
from __future__ import annotations

import copy
import functools
import queue
import threading
import time
from typing import Any, Iterator, Optional

from pipeline.assigner import (StreamSpec, TeacherAssigner, decode_threads, load_row_pixels, read_batch,
                               wait_for_room)
from pipeline.local import Evaluating, data_parallel, idle_batch
from pipeline.loop import Batch, Collective, Stepped, Stepper
from pipeline.plan_source import PlanSource, one_block_per_batch
from schemas.assignment import BATCH_COLUMN, EPOCH_COLUMN
from schemas.config import RunConfig
from schemas.modes import mode_spec
from schemas.rundir import RunDir
from trainer.worker import decode_stream_batch, split_batches


def build_dataset(cfg: RunConfig, source: PlanSource, records: Any, monitor: Any = None, observers: tuple = (),
                  pool: Optional[tuple[int, int, int]] = None):
    """The stream: the lazy plan -> one block per planned batch -> encoded files (CPU tasks) or assignments (the
    actor pool). `records` is the object-store reference of `pipeline.assigner.records_table`; `pool` the (min,
    initial, max) teacher actors (`assignment_store.pool_sizes`; default: the configured pool, fixed). With
    `pipeline.assignment_store` (checked by the driver's `open_store`) the actors read and fill it; a pool of 0:
    it holds every view of the run, so read tasks bring the labels with the images and no teacher is loaded."""
    import ray

    p = cfg.pipeline
    low, initial, high = pool or (p.assigners,) * 3
    spec = StreamSpec.of(cfg)
    ds = one_block_per_batch(ray.data.read_datasource(source, num_cpus=p.cpus_per_read_task), p.cpus_per_read_task)
    if not mode_spec(cfg.mode).needs_teacher or high == 0:  # paa, co-learning (the students assign their own
        # labels), or LAD whose labels are all in the store: data only
        return ds.map_batches(read_batch, batch_size=1, batch_format="pyarrow", zero_copy_batch=True,
                              num_cpus=p.cpus_per_read_task,
                              fn_kwargs=dict(records=records, spec=spec, seed=cfg.seed, flip_prob=cfg.data.flip_prob,
                                             monitor=monitor, store=p.assignment_store if high == 0 else None))
    if low == high:  # a fixed pool; its actors wait for room themselves
        compute = ray.data.ActorPoolStrategy(size=high, max_tasks_in_flight_per_actor=1)
    else:  # a pool sized by Ray Data's autoscaler to the teacher's work: the run-ahead wait moves in front of it,
        # so an actor counts as busy only while it labels (a lone zero-CPU task admits batches in plan order)
        ds = ds.map_batches(admit_in_order, batch_size=1, batch_format="pyarrow", zero_copy_batch=True, num_cpus=0,
                            concurrency=1, fn_kwargs=dict(monitor=monitor))
        compute = ray.data.ActorPoolStrategy(min_size=low, max_size=high, initial_size=initial,
                                             max_tasks_in_flight_per_actor=1)
    # Ray Data creates pool actors with max_restarts=-1 and max_task_retries=-1 (its defaults; passing them is
    # deprecated in 2.60), so a lost actor is restarted and its batch re-run. An exception raised by the
    # assigner is not retried: it fails the run with its message. One batch at a time per actor: a call waiting
    # for room must never hold up an earlier batch queued behind it in the same actor (the stream delivers in plan
    # order).
    return ds.map_batches(
        TeacherAssigner, batch_size=1, batch_format="pyarrow", zero_copy_batch=True, compute=compute,
        num_cpus=p.cpus_per_assigner, num_gpus=p.gpus_per_assigner or None,
        fn_constructor_kwargs=dict(cfg=cfg.to_dict(), records=records, monitor=monitor, observers=observers,
                                   store=bool(p.assignment_store)))


def admit_in_order(plan, *, monitor):
    """Planned batches, each once the stream's monitor admits it (the run-ahead bound), unchanged."""
    for epoch, index in zip(plan[EPOCH_COLUMN].to_pylist(), plan[BATCH_COLUMN].to_pylist()):
        wait_for_room(monitor, {EPOCH_COLUMN: epoch, BATCH_COLUMN: index})
    return plan


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
    """This worker's share of the stream, its images decoded (one background thread, a batch or two ahead, so
    the step does not wait for the decode) onto its device."""
    spec, mode = StreamSpec.of(cfg), mode_spec(cfg.mode)
    load_pixels = functools.partial(load_row_pixels, input_size=spec.input_size,
                                    pool=decode_threads(cfg.pipeline.cpus_per_worker))

    def decoded():
        blocks = shard.iter_batches(batch_size=None, batch_format="pyarrow",
                                    prefetch_batches=cfg.pipeline.prefetch_batches)
        for block in blocks:
            for part in split_batches(block):
                t0 = time.perf_counter()
                sb = decode_stream_batch(part, spec, device, hard=mode.teacher_hard, soft=mode.soft,
                                         load_pixels=load_pixels)
                yield Batch(sb.epoch, sb.image_ids, sb, (time.perf_counter() - t0) * 1e3)

    yield from in_background(decoded(), depth=2)


def in_background(iterator: Iterator, depth: int) -> Iterator:
    """Run `iterator` in a daemon thread, at most `depth` items ahead; its exceptions surface here, in order.
    (PIL's decode and resize and torch's copies release the GIL, so the thread overlaps the step.)"""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def run():
        try:
            for item in iterator:
                items.put((item, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised there
            items.put((None, e))
        items.put((done, None))

    threading.Thread(target=run, name="stream-decode", daemon=True).start()
    while True:
        item, error = items.get()
        if error is not None:
            raise error
        if item is done:
            return
        yield item


class StreamStepper(Evaluating, Stepper):
    """The student's step on streamed labels (`Engine.step_on_labels`; mode paa assigns its own, `Engine.step`)."""

    def __init__(self, cfg: RunConfig, run: RunDir, engine, device, val, monitor: Any,
                 collective: Collective = Collective()):
        self.cfg, self.run, self.engine, self.device, self.val = cfg, run, engine, device, val
        self.monitor, self.mode = monitor, mode_spec(cfg.mode)
        self.hook = data_parallel(engine, device, collective.world, modules=("forward_a",))
        self.idle = idle_batch(cfg, device, hard=self.mode.teacher_hard, soft=self.mode.soft)
        self.newest_version = 0
        self.store_peak = 0
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
        if sb is None:
            return Stepped(None)
        if self.monitor is not None:
            self.monitor.report_consumed.remote((sb.epoch, sb.batch_index))
        self.newest_version = max(self.newest_version, sb.teacher_version)
        record = {**result.metrics, "decode_ms": round(batch.decode_ms, 2), "teacher_version": sb.teacher_version,
                  "teacher_lag": self.newest_version - sb.teacher_version, "payload_bytes": sb.payload_bytes,
                  "image_bytes": sb.image_bytes, "batch_images": len(sb), "canvas": list(sb.images.shape[-2:])}
        if self.mode.teacher_hard or self.mode.soft:
            record["assign_ms"] = round(sb.assign_ms, 3)
            record["teacher_images"] = sb.teacher_images
        return Stepped(record, sb.labels)

    def log(self, record: dict, total: int) -> None:
        import ray

        if self.monitor is not None:
            record.update(ray.get(self.monitor.backlog_stats.remote()))
            record.update(object_store_use())
            self.store_peak = max(self.store_peak, record.get("object_store_bytes", 0))
            record["object_store_peak_bytes"] = self.store_peak
        super().log(record, total)


def object_store_use() -> dict:
    """The object store's bytes in use now, and created so far, summed over the cluster's nodes (the raylets'
    own counters; empty if they cannot be read)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        stats = get_memory_info_reply(get_state_from_address()).store_stats
    except Exception:  # noqa: BLE001 - a metric, never worth failing a step for
        return {}
    return {"object_store_bytes": int(stats.object_store_bytes_used),
            "object_store_created_bytes": int(stats.cumulative_created_bytes)}

"""The stream's plan as a lazy Ray Data source, torch-free (the plan's read tasks and the repartition that cuts it
into one block per batch run in plain Ray workers that never import torch).

`PlanSource` has one read task per epoch, which draws that epoch's order and cuts it into batches
(`pipeline.loop.plan_epoch`, the plan of every engine) only when the stream reaches it; the driver keeps the
per-epoch step budgets (`epoch_budgets`, arithmetic) and nothing per batch. Each source row is one planned batch
(`plan_table`: epoch, batch_index, dataset indices); the images' paths and GT are one Arrow table put into the
object store once (`records_table`), which the stages look the indices up in.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.loop import epoch_budgets, plan_epoch
from schemas.assignment import BATCH_COLUMN, EPOCH_COLUMN, list_array
from schemas.config import RunConfig
from schemas.storage import absolute

ROWS_PER_BLOCK = 1024  # planned batches per block of an epoch's read task


def records_table(records: list) -> pa.Table:
    """The training set as Arrow (id, absolute path, size, GT): what the stages look a plan's indices up in."""
    boxes, _ = list_array([r.boxes for r in records], np.float32, 4, "boxes")
    labels, _ = list_array([r.labels for r in records], np.int64, 1, "labels")
    return pa.table({
        "image_id": pa.array([int(r.image_id) for r in records], pa.int64()),
        "path": pa.array([absolute(r.path) for r in records], pa.string()),  # read tasks fetch URIs themselves
        "width": pa.array([int(r.width) for r in records], pa.int32()),
        "height": pa.array([int(r.height) for r in records], pa.int32()),
        "boxes": boxes, "labels": labels,
    })


def plan_table(epoch: int, batches: list[list[int]], first_index: int = 0) -> pa.Table:
    """Planned batches of one epoch as the stream's source rows: (epoch, batch_index, dataset indices)."""
    return pa.table({EPOCH_COLUMN: pa.array([int(epoch)] * len(batches), pa.int32()),
                     BATCH_COLUMN: pa.array(range(first_index, first_index + len(batches)), pa.int32()),
                     "index": pa.array([[int(i) for i in b] for b in batches], pa.list_(pa.int32()))})


class PlanSource(Datasource):
    """The rest of the run's plan as a lazy Ray Data source (see the module docstring): the driver's memory and
    start-up time do not grow with the number of epochs or batches. A streaming repartition makes each source row
    (one planned batch) one block."""

    def __init__(self, cfg: RunConfig, image_ids: list[int], start, remaining_steps: int,
                 wide: Optional[Sequence[bool]] = None):
        super().__init__()  # Ray Data's own state (its predicate-pushdown mixin), as every Datasource needs
        self.cfg, self.num_images = cfg, len(image_ids)
        # per image, whether it is landscape (`plan_epoch` groups batches by it): one byte an image
        self.wide = None if wide is None else np.asarray(wide, bool)
        self.budgets = epoch_budgets(cfg, image_ids, start.epoch, start.trained_ids, remaining_steps,
                                     cfg.pipeline.num_workers)
        # only the resumed epoch needs the ids (to leave out those already trained); the others only the count
        self.resumed = (start.epoch, list(image_ids), list(start.trained_ids)) if start.trained_ids else None
        # epoch -> the position of its first batch in this attempt's order (the monitor's run-ahead window)
        self.offsets, total = {}, 0
        for epoch, _, batches in self.budgets:
            self.offsets[epoch], total = total, total + batches

    def estimate_inmemory_data_size(self):
        return None

    def get_name(self) -> str:
        return "Plan"

    def get_read_tasks(self, parallelism: int, **kwargs) -> list:
        tasks = []
        for epoch, steps, _ in self.budgets:
            resumed = self.resumed and self.resumed[0] == epoch
            ids, trained = self.resumed[1:] if resumed else (range(self.num_images), [])
            read = functools.partial(epoch_rows, self.cfg, epoch, steps, ids, trained, self.wide)
            tasks.append(ReadTask(read, BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None)))
        return tasks


def epoch_rows(cfg: RunConfig, epoch: int, steps: int, image_ids, trained_ids: list, wide=None):
    """The source rows of one epoch, in blocks: what its read task yields."""
    batches = [b for step in plan_epoch(cfg, image_ids, epoch, trained_ids, steps, cfg.pipeline.num_workers, wide)
               for b in step]
    for k in range(0, len(batches), ROWS_PER_BLOCK):
        yield plan_table(epoch, batches[k:k + ROWS_PER_BLOCK], first_index=k)


def one_block_per_batch(ds, num_cpus: float):
    """A streaming repartition to one row (one planned batch) per block. Ray 2.60's `repartition` takes no resource
    arguments and asks for a whole CPU per task, which deadlocks a cluster whose CPUs the students and the pool
    hold; its logical operator's `ray_remote_args` is set here instead (ray is pinned in pyproject.toml)."""
    ds = ds.repartition(target_num_rows_per_block=1)
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    if not isinstance(getattr(op, "ray_remote_args", None), dict):
        raise RuntimeError("this Ray Data version hides the streaming repartition's resources; "
                           "pipeline.stream.one_block_per_batch must be ported")
    op.ray_remote_args["num_cpus"] = num_cpus
    return ds



"""The one Ray Data stage of the assignment stream: each planned training batch becomes one Arrow batch.

    read_batch        modes without a teacher (paa, co-learning inline), CPU tasks: the batch's encoded image files
                      as stored, with the augmented GT and geometry (no decode: the student decodes its images);
                      also LAD whose assignment store holds every view of the run (the labels come with the files).
    TeacherAssigner   modes with a teacher, the actor pool: reads the files, decodes, resizes and flips them (a few
                      threads), runs the frozen teacher and the batched PAA assignment (`trainer.teacher.
                      teacher_assign`, the code `Engine.step` runs) and fills in positives, ignores and (kd/solad)
                      the compact soft labels of `trainer.soft_codec`; with an assignment store, only for the views
                      it does not hold (`pipeline.assignment_store`).

Images travel once, as their encoded files (`image_file`): the pixels are made where they are used (the teacher
here, the student in `pipeline.stream`), by the same function of (file, input size, flip), so both see the same
pixels. Every batch is tagged with the schema's batch columns (`epoch`, `batch_index`, and its canvas
`pad_height` / `pad_width`), so the trainer steps on exactly the planned batches with the right anchors.

Run-ahead is bounded: before making a batch, a stage waits for the stream's monitor to admit it
(`pipeline.ray_env.StreamMonitor.admit`), so at most `pipeline.max_batches_ahead` batches exist ahead of the
students.
"""
from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from pipeline.assignment_store import AssignmentStore, Labels, stored_labels
from schemas.assignment import BATCH_COLUMN, EPOCH_COLUMN, AssignmentRow, encode_batch, tag_batch
from schemas.config import RunConfig
from trainer.worker import StreamSpec  # noqa: F401  (the stream's spec, re-exported for the pipeline)

ADMIT_POLL_S = 0.02
_EMPTY = np.zeros(0, np.int32)
_EMPTY_HARD = dict(pos_anchor=_EMPTY, pos_gt=_EMPTY, ignore_anchor=_EMPTY)


# ----------------------------------------------------------------------------------------------- the plan

_RECORDS: dict = {}


def _records(records) -> pa.Table:
    """The records table, given as itself or as an object-store reference (fetched once per process)."""
    if isinstance(records, pa.Table):
        return records
    key = records.hex()
    if key not in _RECORDS:
        import ray

        _RECORDS.clear()
        _RECORDS[key] = ray.get(records)
    return _RECORDS[key]


def planned_items(plan: pa.Table, records) -> list[dict]:
    """Source rows -> one dict per planned batch with everything its images need (ids, paths, sizes, GT)."""
    table = _records(records)
    return [{EPOCH_COLUMN: row[EPOCH_COLUMN], BATCH_COLUMN: row[BATCH_COLUMN],
             **table.take(pa.array(row["index"], pa.int32())).to_pydict(),
             **({"flip": row["flip"]} if "flip" in row else {})}  # a view asked for (`lad assign`)
            for row in plan.to_pylist()]


# ----------------------------------------------------------------------------------------------- the batch

class PlannedImage:
    """One image of a planned batch: its record, its encoded file and where its GT lands after the augmentation."""

    def __init__(self, item: dict, i: int, spec: StreamSpec, seed: int, flip_prob: float):
        from pipeline.coco import ImageRecord
        from pipeline.dataset import check_image_header, read_image_file
        from pipeline.transforms import aug_params_for

        boxes = np.asarray(item["boxes"][i], np.float32).reshape(-1, 4)
        self.record = ImageRecord(item["image_id"][i], item["path"][i], item["width"][i], item["height"][i], boxes,
                                  np.asarray(item["labels"][i], np.int64))
        self._place(bool(item["flip"][i]) if "flip" in item
                    else aug_params_for(self.record.image_id, item[EPOCH_COLUMN], seed, flip_prob), spec.input_size)
        self.file = read_image_file(self.record)
        check_image_header(self.record, self.file)

    def _place(self, flip: bool, input_size) -> None:
        """Flip or not, and where the GT lands then."""
        from pipeline.transforms import aug_params, boxes_to_resized

        self.flip = flip
        self.params = aug_params(self.record.width, self.record.height, input_size, flip)
        self.gt_boxes = boxes_to_resized(self.record.boxes, self.params).astype(np.float32)

    def view(self, canvas: tuple[int, int]) -> tuple:
        """Its key in the assignment store: (image id, flip, canvas height, canvas width)."""
        return int(self.record.image_id), bool(self.flip), *canvas

    def mirrored(self, input_size) -> "PlannedImage":
        """The same image with the other flip (the same file and size: only the GT moves)."""
        twin = copy.copy(self)
        twin._place(not self.flip, input_size)
        return twin

    def row(self, labels: Optional[Labels] = None, soft: Optional[dict] = None,
            assign_ms: float = 0.0) -> AssignmentRow:
        """Its stream row, with these hard labels (None: none, a mode without a teacher) and soft-label columns."""
        hard = _EMPTY_HARD if labels is None else dict(
            pos_anchor=labels.pos_anchor, pos_gt=labels.pos_gt, ignore_anchor=labels.ignore_anchor,
            teacher_version=labels.teacher_version)
        return AssignmentRow(image_id=self.record.image_id, height=self.params.resized_h, width=self.params.resized_w,
                             gt_boxes=self.gt_boxes, gt_labels=self.record.labels.astype(np.int32),
                             image_file=self.file, scale=self.params.scale, flip=self.flip, assign_ms=assign_ms,
                             **hard, **(soft or {}))


def planned_batch(item: dict, spec: StreamSpec, seed: int, flip_prob: float) -> tuple[list[PlannedImage], tuple]:
    """A planned batch's images, and the canvas (H, W) they are padded to."""
    from pipeline.transforms import canvas_shape

    images = [PlannedImage(item, i, spec, seed, flip_prob) for i in range(len(item["image_id"]))]
    return images, canvas_shape([(im.params.resized_h, im.params.resized_w) for im in images], spec.input_size)


def wait_for_room(monitor: Any, item: dict) -> None:
    """Block until the stream's monitor admits this batch (the run-ahead bound); no monitor, no bound."""
    if monitor is None:
        return
    import ray

    key = (int(item[EPOCH_COLUMN]), int(item[BATCH_COLUMN]))
    while not ray.get(monitor.admit.remote(key)):
        time.sleep(ADMIT_POLL_S)


def _stored_row(im: PlannedImage, s: Optional[Labels]) -> AssignmentRow:
    if s is None:  # the driver checked the store covers the run: a view missing now is a store changed under us
        raise RuntimeError(f"image {im.record.image_id} (flip {im.flip}): not in the assignment store, which held "
                           "every view of the run when it started; was it deleted or replaced meanwhile?")
    return im.row(s)


# ----------------------------------------------------------------------------------------------- data only

def read_batch(plan: pa.Table, *, records, spec: StreamSpec, seed: int, flip_prob: float,
               monitor: Any = None, store: Optional[str] = None) -> pa.Table:
    """Planned batches -> their encoded files, augmented GT and geometry (modes without a teacher, and LAD from an
    assignment store that holds every view of the run: `store` is its path, and the labels come with
    the images). The file's header is checked against the annotation here; the pixels are decoded by the
    student."""
    labels = stored_labels(store) if store is not None else None
    out = []
    for item in planned_items(plan, records):
        wait_for_room(monitor, item)
        images, canvas = planned_batch(item, spec, seed, flip_prob)
        # soft labels need a teacher: never here
        rows = [im.row() if labels is None else _stored_row(im, labels.index.get(im.view(canvas))) for im in images]
        rb = encode_batch(rows, spec.anchor_hash, spec.num_anchors(canvas), spec.num_classes, soft=False)
        out.append(tag_batch(rb, item[EPOCH_COLUMN], item[BATCH_COLUMN], canvas))
    return pa.concat_tables(out)


def load_row_pixels(rows: list[AssignmentRow], input_size, pool=None) -> list[np.ndarray]:
    """Stream rows that carry their encoded files -> resized, flipped uint8 [h, w, 3] pixels, checked against the
    sizes the rows promise. The one decode of the stream, run by the teacher and by the student alike (its
    `load_pixels`), so both see the same pixels."""
    from pipeline.dataset import decode_bytes
    from pipeline.transforms import resize_image

    def one(r: AssignmentRow) -> np.ndarray:
        image, params = resize_image(decode_bytes(r.image_file, r.image_id), input_size, r.flip)
        if (params.resized_h, params.resized_w) != (r.height, r.width):
            raise ValueError(f"image {r.image_id}: its file resizes to {params.resized_h}x{params.resized_w} but "
                             f"the stream says {r.height}x{r.width} (another input_size?)")
        return image

    return list(pool.map(one, rows) if pool is not None else map(one, rows))


def decode_threads(cpus: float) -> ThreadPoolExecutor:
    """Threads that decode a batch's images in parallel (PIL releases the GIL while it decodes and resizes): one
    per CPU the process was given, at least one, at most 8."""
    return ThreadPoolExecutor(max_workers=max(1, min(8, round(cpus))), thread_name_prefix="decode")


# ----------------------------------------------------------------------------------------------- the teacher

class TeacherAssigner:
    """A Ray Data callable class (one instance per actor of the pool): the frozen teacher + PAA assignment.
    `observers` (as the loop's) are told of every batch assigned before it is returned: `assigned(epoch, ids)`."""

    def __init__(self, cfg: dict, records, monitor: Any = None, observers: tuple = (), store: bool = False):
        """`store`: read and fill the run's assignment store (`pipeline.assignment_store.open_store` checked it)."""
        import torch

        from trainer.network import AnchorCache
        from trainer.teacher import load_teacher

        self.cfg = RunConfig.model_validate(cfg)
        p = self.cfg.pipeline
        want_gpu = p.gpus_per_assigner > 0
        if want_gpu and not torch.cuda.is_available():
            raise RuntimeError("pipeline.gpus_per_assigner > 0 but this assigner actor sees no CUDA device")
        self.device = torch.device("cuda" if want_gpu else "cpu")
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.spec = StreamSpec.of(self.cfg)
        self.teacher, self.version = load_teacher(self.cfg, self.device)
        self.anchors = AnchorCache(self.cfg, self.device)
        self.records = records
        self.monitor = monitor
        self.observers = observers
        self.decoders = decode_threads(p.cpus_per_assigner)
        self.store = AssignmentStore(p.assignment_store) if store else None

    def __call__(self, plan: pa.Table) -> pa.Table:
        parts = []
        for item in planned_items(plan, self.records):
            wait_for_room(self.monitor, item)
            parts.append(self.assign(item))
            for o in self.observers:
                o.assigned(item[EPOCH_COLUMN], list(item["image_id"]))
        return pa.concat_tables(parts)

    def assign(self, item: dict) -> pa.Table:
        """One planned batch's rows. With a store, the views it holds are taken from it (their rows say
        `assign_ms` 0) and the teacher runs on the others only, on the batch's canvas, so their labels are those of
        the whole batch; the new views go to the store."""
        t0 = time.perf_counter()
        spec = self.spec
        images, canvas = planned_batch(item, spec, self.cfg.seed, self.cfg.data.flip_prob)
        views = [im.view(canvas) for im in images]
        stored = self._stored(views)
        new = [im for im, s in zip(images, stored) if s is None]
        new += self._twins(new, views, canvas)
        computed = self._teacher(new, canvas) if new else []
        ms = (time.perf_counter() - t0) * 1e3
        if self.store is not None:
            for im, (labels, _) in zip(new, computed):
                self.store.put(im.view(canvas), labels)
            self.store.flush()
        fresh = iter(computed)  # the teacher's labels of the views the store lacked, in the batch's order
        rows = [_stored_row(im, s) if s is not None else im.row(*next(fresh), ms) for im, s in zip(images, stored)]
        table = encode_batch(rows, spec.anchor_hash, spec.num_anchors(canvas), spec.num_classes, spec.soft)
        return tag_batch(table, item[EPOCH_COLUMN], item[BATCH_COLUMN], canvas)

    def _twins(self, new: list, views: list, canvas: tuple[int, int]) -> list:
        """With a store and a recipe that flips, the other flip of each image the teacher labels now, where the store
        lacks it: labelled in the same forward, so a store filled while training holds both views of every image
        after one epoch (a view's labels do not depend on its batch companions: docs/decisions.md)."""
        if self.store is None or not 0 < self.cfg.data.flip_prob < 1:
            return []
        asked = set(views)
        twins = [im.mirrored(self.spec.input_size) for im in new]
        return [t for t in twins if t.view(canvas) not in asked and t.view(canvas) not in self.store.index]

    def _stored(self, views: list) -> list:
        """The store's labels of each view (None: not there); a miss first reads what other actors wrote since."""
        if self.store is None:
            return [None] * len(views)
        found = [self.store.index.get(v) for v in views]
        if None in found and self.store.refresh():
            found = [self.store.index.get(v) for v in views]
        return found

    def _teacher(self, images: list, canvas) -> list[tuple[Labels, dict]]:
        """Per image, (its hard labels, its soft-label columns), from one teacher forward."""
        import torch

        from trainer.teacher import teacher_assign
        from trainer.soft_codec import encode_soft
        from trainer.worker import images_tensor, labels_to_sparse

        cfg, spec, n = self.cfg, self.spec, len(images)
        pixels = load_row_pixels([im.row() for im in images], spec.input_size, self.decoders)
        batch = images_tensor(pixels, canvas, self.device)
        boxes = [torch.from_numpy(im.gt_boxes).to(self.device) for im in images]
        labels = [torch.from_numpy(im.record.labels).to(self.device) for im in images]
        result = teacher_assign(cfg, self.teacher, batch, boxes, labels, self.anchors)
        hard = labels_to_sparse(result.labels) if result.labels is not None else [(_EMPTY, _EMPTY, _EMPTY)] * n
        soft = (encode_soft(result.soft, spec.level_sizes(canvas), cfg.pipeline.soft_label_quality)
                if result.soft is not None else [{}] * n)
        return [(Labels(im.params.resized_h, im.params.resized_w, *h, self.version), s)
                for im, h, s in zip(images, hard, soft)]

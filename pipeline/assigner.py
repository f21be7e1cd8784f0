"""The two Ray Data stages of the assignment stream.

    read_batch        CPU tasks: one planned training batch (image ids + file paths + GT) -> decoded, letterboxed,
                      flipped images as an Arrow table in the stream's schema (`schemas.assignment`), positives
                      still empty. Mode `paa` streams exactly this (data only: the student assigns itself).
    TeacherAssigner   the actor pool: loads the frozen teacher once, runs its forward and the batched PAA
                      assignment (`trainer.teacher.teacher_assign`, the code `Engine.step` runs) on each training
                      batch and fills in positives, ignores and (kd/solad) sparse fp16 soft labels (+ `soft_fill`).

Every block that leaves a stage is one training batch, tagged with the schema's batch columns `epoch` and
`batch_index` (`schemas.assignment.tag_batch`), so the trainer can check that it steps on exactly the batches
that were planned.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.assignment import (BATCH_COLUMN, EPOCH_COLUMN, AssignmentRow, add_soft_fill, anchor_hash, batch_tag,
                                decode_table_rows, encode_batch, tag_batch)
from schemas.config import RunConfig
from schemas.modes import mode_spec
from trainer.worker import split_batches


@dataclass(frozen=True)
class StreamSpec:
    """What ties a stream to one anchor layout (the schema's hash) and how big its rows are."""
    anchor_hash: str
    num_anchors: int
    num_classes: int
    input_size: int
    soft: bool

    @classmethod
    def of(cls, cfg: RunConfig) -> "StreamSpec":
        from trainer.anchors import feature_sizes_for

        strides = cfg.model.strides
        sizes = feature_sizes_for(cfg.data.input_size, strides)
        return cls(anchor_hash(strides, cfg.model.octave_base_scale, cfg.data.input_size, cfg.model.num_classes),
                   sum(h * w for h, w in sizes), cfg.model.num_classes, cfg.data.input_size,
                   mode_spec(cfg.mode).soft)


# ----------------------------------------------------------------------------------------------- the plan

def batch_items(records: list, epoch: int, batches: list[list[int]], first_index: int = 0) -> list[dict]:
    """Planned batches -> Ray Data items: everything a read task needs, so it never reads the annotation file."""
    items = []
    for k, batch in enumerate(batches):
        recs = [records[i] for i in batch]
        items.append({
            EPOCH_COLUMN: int(epoch), BATCH_COLUMN: int(first_index + k),
            "image_id": [int(r.image_id) for r in recs],
            "path": [os.path.abspath(r.path) for r in recs],
            "width": [int(r.width) for r in recs], "height": [int(r.height) for r in recs],
            "boxes": [np.asarray(r.boxes, np.float32).reshape(-1).tolist() for r in recs],
            "labels": [np.asarray(r.labels).astype(np.int64).tolist() for r in recs],
        })
    return items


# ----------------------------------------------------------------------------------------------- stage 1: read

def read_batch(items: pa.Table, *, spec: StreamSpec, seed: int, flip_prob: float) -> pa.Table:
    """Decode + letterbox + flip the images of planned batches, as `DetectionDataset.__getitem__` does.

    The flip is `aug_params_for(image_id, epoch, seed, flip_prob)`, so the pixels equal the in-process loader's.
    """
    from pipeline.coco import ImageRecord
    from pipeline.dataset import load_image
    from pipeline.transforms import aug_params_for, letterbox

    out = []
    for item in items.to_pylist():
        epoch, index = item[EPOCH_COLUMN], item[BATCH_COLUMN]
        rows = []
        for image_id, path, w, h, boxes, labels in zip(item["image_id"], item["path"], item["width"],
                                                       item["height"], item["boxes"], item["labels"]):
            boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
            record = ImageRecord(image_id, path, w, h, boxes, np.asarray(labels, np.int64))
            flip = aug_params_for(image_id, epoch, seed, flip_prob)
            image, gt, scale = letterbox(load_image(record), boxes, spec.input_size, flip)
            rows.append(AssignmentRow(image_id=image_id, height=image.shape[0], width=image.shape[1],
                                      gt_boxes=gt, gt_labels=np.asarray(labels, np.int32),
                                      pos_anchor=_EMPTY, pos_gt=_EMPTY, ignore_anchor=_EMPTY,
                                      image=image, scale=scale, flip=flip, **(_EMPTY_SOFT if spec.soft else {})))
        rb = encode_batch(rows, spec.anchor_hash, spec.num_anchors, spec.num_classes, spec.soft)
        out.append(tag_batch(rb, epoch, index))
    return pa.concat_tables(out)


_EMPTY = np.zeros(0, np.int32)
_EMPTY_SOFT = dict(soft_anchor=_EMPTY, soft_class=np.zeros(0, np.int16), soft_prob=np.zeros(0, np.float16),
                   kd_anchor=_EMPTY, kd_box=np.zeros((0, 4), np.float32), kd_iou_prob=np.zeros(0, np.float32),
                   kd_weight=np.zeros(0, np.float32))


# ----------------------------------------------------------------------------------------------- stage 2: assign

class TeacherAssigner:
    """A Ray Data callable class (one instance per actor of the pool): the frozen teacher + PAA assignment.
    `observers` (as the loop's) are told of every batch assigned before it is returned: `assigned(epoch, ids)`."""

    def __init__(self, cfg: dict, monitor: Any = None, observers: tuple = ()):
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
        self.monitor = monitor
        self.observers = observers

    def __call__(self, table: pa.Table) -> pa.Table:
        parts = [self.assign(part) for part in split_batches(table)]
        for o in self.observers:
            for part in parts:
                o.assigned(batch_tag(part)[0], part.column("image_id").to_pylist())
        if self.monitor is not None:
            ms = sum(float(p.column("assign_ms")[0].as_py()) for p in parts)
            self.monitor.report_assigned.remote(len(parts), ms)
        return pa.concat_tables(parts) if parts else table

    def assign(self, part: pa.Table) -> pa.Table:
        import torch

        from trainer.teacher import teacher_assign
        from trainer.worker import images_tensor, labels_to_sparse, soft_fill, soft_to_sparse

        t0 = time.perf_counter()
        rows = decode_table_rows(part, self.spec.anchor_hash)
        images = images_tensor(rows, self.device)
        boxes = [torch.from_numpy(np.array(r.gt_boxes, np.float32)).reshape(-1, 4).to(self.device) for r in rows]
        labels = [torch.from_numpy(np.array(r.gt_labels, np.int64)).to(self.device) for r in rows]
        result = teacher_assign(self.cfg, self.teacher, images, boxes, labels, self.anchors)
        hard = labels_to_sparse(result.labels) if result.labels is not None else None
        soft = soft_to_sparse(result.soft, self.cfg.pipeline.soft_label_floor) if result.soft is not None else None
        ms = (time.perf_counter() - t0) * 1e3
        out_rows = []
        for i, r in enumerate(rows):
            pos_anchor, pos_gt, ignore = hard[i] if hard is not None else (_EMPTY, _EMPTY, _EMPTY)
            out_rows.append(AssignmentRow(
                image_id=r.image_id, height=r.height, width=r.width, gt_boxes=r.gt_boxes, gt_labels=r.gt_labels,
                pos_anchor=pos_anchor, pos_gt=pos_gt, ignore_anchor=ignore, image=None, scale=r.scale, flip=r.flip,
                teacher_version=self.version, assign_ms=ms, **(soft[i] if soft is not None else {})))
        rb = encode_batch(out_rows, self.spec.anchor_hash, self.spec.num_anchors, self.spec.num_classes,
                          self.spec.soft)
        # The pixels pass through untouched: reuse the input's image column instead of copying it again.
        table = pa.Table.from_batches([rb])
        i = table.schema.get_field_index("image")
        table = table.set_column(i, table.schema.field(i), part.column("image").combine_chunks())
        table = table.replace_schema_metadata(rb.schema.metadata)
        if result.soft is not None:
            fill = soft_fill(result.soft.cls_prob, self.cfg.pipeline.soft_label_floor)
            table = add_soft_fill(table, fill.cpu().numpy())
        return tag_batch(table, *batch_tag(part))

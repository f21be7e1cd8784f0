"""The student worker's side of the assignment stream (pure torch + pyarrow, no Ray): the codec between hard
labels (`BatchLabels`) and the stream's sparse per-image form (`schemas.assignment`; soft labels have their own,
`trainer.soft_codec`), decoding a streamed training batch into the tensors `Engine.step_on_labels` takes, and the
gradient averaging that lets a step go on when some data-parallel workers have no batch left.

Copies: the Arrow buffers are read through zero-copy numpy views (`schemas.assignment.decode_table_rows`);
images (sent as pixels, or as encoded files that the caller's `load_pixels` decodes) are copied once into the
contiguous, zero-padded `[B, 3, H, W]` uint8 batch on the batch's canvas (on the device when it is a GPU), and
the small per-image arrays (boxes, anchor indices) once into device tensors.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from schemas.assignment import BATCH_COLUMN, EPOCH_COLUMN, anchor_hash, batch_canvas, check_bounds, decode_table_rows
from schemas.config import PAD_DIVISOR, RunConfig
from schemas.modes import mode_spec
from trainer.anchors import feature_sizes_for, make_anchors
from trainer.losses import BatchLabels, SoftTargets
from trainer.soft_codec import decode_soft

# Stream arrays are read-only views of Arrow buffers; the trainer never writes into them (schemas.assignment).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


# ------------------------------------------------------------------------------------------- sparse <-> dense

def labels_to_sparse(labels: BatchLabels) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (pos_anchor int32, pos_gt int32, ignore_anchor int32): the stream's form of `BatchLabels`."""
    pos = labels.gt_index >= 0
    out = []
    for i in range(pos.shape[0]):
        anchor = pos[i].nonzero().flatten()
        parts = (anchor, labels.gt_index[i, anchor], labels.ignore[i].nonzero().flatten())
        out.append(tuple(t.to(torch.int32).cpu().numpy() for t in parts))
    return out


def sparse_to_labels(pos_anchor: list, pos_gt: list, ignore_anchor: list, gt_labels: list[Tensor],
                     num_anchors: int, num_classes: int, device: torch.device | str = "cpu") -> BatchLabels:
    """Inverse of `labels_to_sparse`: the same `BatchLabels` `trainer.assign.select_labels` builds (labels = class
    of the positive's GT, `num_classes` elsewhere; gt_index = the GT, -1 elsewhere; ignore as sent)."""
    b = len(pos_anchor)
    labels = torch.full((b, num_anchors), num_classes, dtype=torch.long, device=device)
    gt_index = torch.full((b, num_anchors), -1, dtype=torch.long, device=device)
    ignore = torch.zeros((b, num_anchors), dtype=torch.bool, device=device)
    for i in range(b):
        anchor = torch.as_tensor(pos_anchor[i], device=device).long()
        if anchor.numel():
            gt = torch.as_tensor(pos_gt[i], device=device).long()
            gt_index[i, anchor] = gt
            labels[i, anchor] = gt_labels[i].to(device=device, dtype=torch.long)[gt]
        ign = torch.as_tensor(ignore_anchor[i], device=device).long()
        if ign.numel():
            ignore[i, ign] = True
    return BatchLabels(labels, gt_index, ignore)


# ------------------------------------------------------------------------------------------- stream batches

@dataclass(frozen=True)
class StreamSpec:
    """What ties a stream to one anchor layout (the schema's hash), and what sizes its batches."""
    anchor_hash: str
    strides: tuple[int, ...]
    num_classes: int
    input_size: Union[int, tuple[int, int]]
    soft: bool
    octave_base_scale: float = 8.0

    @classmethod
    def of(cls, cfg: RunConfig) -> "StreamSpec":
        strides, size, octave = tuple(cfg.model.strides), cfg.data.input_size, cfg.model.octave_base_scale
        return cls(anchor_hash(strides, octave, size, cfg.model.num_classes, PAD_DIVISOR),
                   strides, cfg.model.num_classes, size, mode_spec(cfg.mode).soft, octave)

    def anchors(self, canvas: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
        """The [A, 4] anchors of a batch padded to `canvas` (H, W)."""
        return make_anchors(self.level_sizes(canvas), list(self.strides), self.octave_base_scale, device)[0]

    def level_sizes(self, canvas: Sequence[int]) -> list[tuple[int, int]]:
        """Each pyramid level's (H, W) for a batch padded to `canvas` (H, W)."""
        return feature_sizes_for(tuple(canvas), list(self.strides))

    def num_anchors(self, canvas: Sequence[int]) -> int:
        """Anchors of a batch padded to `canvas` (H, W)."""
        return sum(h * w for h, w in self.level_sizes(canvas))


@dataclass
class StreamBatch:
    """One training batch as the student consumes it."""
    epoch: int
    batch_index: int
    image_ids: list[int]
    images: Tensor                     # uint8 [B, 3, H, W] on the batch's canvas, contiguous, on the device
    gt_boxes: list[Tensor]             # float32 [G, 4]
    gt_labels: list[Tensor]            # int64 [G]
    labels: Optional[BatchLabels]      # lad / solad
    soft: Optional[SoftTargets]        # kd / solad
    teacher_version: int
    assign_ms: float                   # the assigner's teacher + assignment time for this batch
    teacher_images: int                # images whose labels the teacher computed (the rest came from a store)
    image_bytes: int                   # what the images cost in the stream (encoded files, or pixels)
    payload_bytes: int                 # everything but the images

    def __len__(self) -> int:
        return len(self.image_ids)


def split_batches(table: pa.Table) -> list[pa.Table]:
    """A stream block -> the training batches in it, in order (a block is normally exactly one batch; this
    keeps the student right if Ray Data ever coalesces blocks)."""
    if table.num_rows == 0:
        return []
    epoch = table.column(EPOCH_COLUMN).to_numpy()
    batch = table.column(BATCH_COLUMN).to_numpy()
    change = np.flatnonzero((epoch[1:] != epoch[:-1]) | (batch[1:] != batch[:-1])) + 1
    bounds = [0, *change.tolist(), table.num_rows]
    return [table.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def images_tensor(pixels: list[np.ndarray], canvas: Sequence[int], device: torch.device) -> Tensor:
    """HWC uint8 images -> one contiguous, zero-padded uint8 [B, 3, H, W] batch on `canvas`, each image copied
    once (to the device when it is a GPU, then transposed there)."""
    height, width = canvas
    out = torch.zeros((len(pixels), pixels[0].shape[2], height, width), dtype=torch.uint8, device=device)
    for i, image in enumerate(pixels):
        h, w = image.shape[:2]
        if h > height or w > width:
            raise ValueError(f"image {i} of the batch is {h}x{w}, larger than the batch's canvas {height}x{width}")
        out[i, :, :h, :w] = torch.as_tensor(image, device=device).permute(2, 0, 1)
    return out


def decode_stream_batch(table: pa.Table, spec: StreamSpec, device: torch.device, *, hard: bool, soft: bool,
                        load_pixels: Optional[Callable] = None) -> StreamBatch:
    """One training batch (all rows of one epoch/batch_index) -> `StreamBatch` on `device`. Rows that carry
    encoded files are decoded by `load_pixels(rows) -> [HWC uint8]` (the pipeline's decode, resize and flip).

    Raises `schemas.assignment.SchemaMismatch` for a stream of other anchors or another schema version.
    """
    rows = decode_table_rows(table, spec.anchor_hash)
    canvas = batch_canvas(table)
    num_anchors, num_classes = spec.num_anchors(canvas), spec.num_classes
    check_bounds(rows, num_anchors, num_classes)
    epochs = set(table.column(EPOCH_COLUMN).to_pylist())
    batches = set(table.column(BATCH_COLUMN).to_pylist())
    if len(epochs) != 1 or len(batches) != 1:
        raise ValueError(f"a training batch must come from one (epoch, batch_index), got {epochs} x {batches}")
    if soft and not rows[0].has_soft:
        raise ValueError("mode needs soft labels but the stream has none (assigner built for another mode?)")
    if all(r.image is not None for r in rows):   # sent as pixels
        pixels = [r.image for r in rows]
    elif load_pixels is None:
        raise ValueError("the stream carries encoded image files but no decoder was given (load_pixels)")
    else:
        pixels = load_pixels(rows)
    images = images_tensor(pixels, canvas, device)
    gt_boxes = [torch.as_tensor(r.gt_boxes, device=device).reshape(-1, 4) for r in rows]
    gt_labels = [torch.as_tensor(r.gt_labels, device=device).long() for r in rows]
    labels = sparse_to_labels([r.pos_anchor for r in rows], [r.pos_gt for r in rows],
                              [r.ignore_anchor for r in rows], gt_labels, num_anchors, num_classes,
                              device) if hard else None
    soft_targets = (decode_soft(rows, spec.anchors(canvas, device), spec.level_sizes(canvas), num_classes,
                                device) if soft else None)
    image_bytes = int(table.column("image").nbytes) + int(table.column("image_file").nbytes)
    return StreamBatch(epoch=epochs.pop(), batch_index=batches.pop(), image_ids=[int(r.image_id) for r in rows],
                       images=images, gt_boxes=gt_boxes, gt_labels=gt_labels, labels=labels, soft=soft_targets,
                       teacher_version=max(int(r.teacher_version) for r in rows),
                       assign_ms=max(float(r.assign_ms) for r in rows),
                       teacher_images=sum(1 for r in rows if r.assign_ms > 0), image_bytes=image_bytes,
                       payload_bytes=int(table.nbytes) - image_bytes)


@dataclass
class NullBatch:
    """A one-image blank batch with no objects: what an idle worker steps on (its gradients are discarded by
    `ActiveMean`), so that every DDP worker runs the same number of steps."""
    images: Tensor
    gt_boxes: list[Tensor]
    gt_labels: list[Tensor]
    labels: Optional[BatchLabels]
    soft: Optional[SoftTargets]


def null_batch(canvas: Sequence[int], num_anchors: int, num_classes: int, device: torch.device, *, hard: bool,
               soft: bool) -> NullBatch:
    images = torch.zeros((1, 3, canvas[0], canvas[1]), dtype=torch.uint8, device=device)
    boxes = [torch.zeros((0, 4), dtype=torch.float32, device=device)]
    empty = torch.zeros(0, dtype=torch.long, device=device)
    none = np.zeros(0, np.int32)  # an image without positives or ignores
    labels = sparse_to_labels([none], [none], [none], [empty], num_anchors, num_classes, device) if hard else None
    targets = SoftTargets(torch.zeros((1, num_anchors, num_classes), device=device), empty, empty,
                          torch.zeros((0, 4), device=device), torch.zeros(0, device=device),
                          torch.zeros(0, device=device)) if soft else None
    return NullBatch(images, boxes, [empty], labels, targets)


class ActiveMean:
    """State of `active_mean_hook`: whether this worker had a batch this step, and how many workers had one."""

    def __init__(self):
        self.active = True
        self.num_active = 1

    def set(self, active: bool, num_active: int) -> None:
        self.active = bool(active)
        self.num_active = max(1, int(num_active))

    def register(self, ddp_module) -> None:
        ddp_module.register_comm_hook(self, active_mean_hook)


def active_mean_hook(state: ActiveMean, bucket):
    """DDP communication hook: the mean gradient over the workers that had a batch this step.

    DDP's default hook divides the sum by the world size, so a worker without data would pull the step
    towards zero. Here an idle worker contributes zeros and the sum is divided by the number of active
    workers, so a step with k of N workers active is exactly the mean over those k batches.
    """
    import torch.distributed as dist

    buf = bucket.buffer()
    if not state.active:
        buf.zero_()
    num_active = state.num_active
    return dist.all_reduce(buf, async_op=True).get_future().then(lambda f: f.value()[0].div_(num_active))

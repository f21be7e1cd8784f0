"""The teacher's side of LAD, shared by the in-process step and the assigner service (pure torch, no Ray, no I/O).

`Engine.step` (in-process) and `pipeline.assigner.TeacherAssigner` (a Ray actor) both call `assign_hard` and
`assign_soft` on the teacher's outputs of the same images, so the streamed assignment equals the in-process one
by construction, not by a second implementation kept in step. The rest of this module converts an assignment
to the sparse per-image form of the stream (`schemas.assignment`) and back, without Python loops over anchors.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from schemas.config import RunConfig
from trainer.anchors import make_anchors
from trainer.labeler import candidates, scored_candidates, select
from trainer.losses import BatchLabels, SoftTargets, soft_targets
from trainer.model import HeadOutputs

HARD_MODES = ("lad", "solad")   # modes whose student trains on the teacher's PAA assignment
SOFT_MODES = ("kd", "solad")    # modes whose student learns the teacher's soft labels
TEACHER_MODES = ("lad", "kd", "solad")


def assign_hard(cfg: RunConfig, scorer: HeadOutputs, anchors: Tensor, num_anchors_per_level: list[int],
                gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> BatchLabels:
    """PAA assignment of a batch scored by `scorer` (the teacher in LAD, the student itself in PAA)."""
    cand = candidates(anchors, gt_boxes, cfg.assign.iou_thr)
    losses = scored_candidates(anchors, scorer, gt_boxes, gt_labels, cand)
    a = cfg.assign
    return select(losses, cand, num_anchors_per_level, gt_labels, cfg.model.num_classes, a.topk, a.gmm)


def assign_soft(cfg: RunConfig, teacher_out: HeadOutputs, anchors: Tensor, gt_boxes: list[Tensor]) -> SoftTargets:
    """The teacher's soft targets for KD / SoLAD (dense class probabilities, boxes where it overlaps a GT)."""
    return soft_targets(teacher_out.cls_logits, teacher_out.box_deltas, teacher_out.iou_logits, anchors, gt_boxes,
                        cfg.distill.min_iou)


class AnchorCache:
    """Anchors per pyramid shape, made once (what `Engine.anchors` does, for processes without an Engine)."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu"):
        self.strides = cfg.model.strides
        self.octave_base_scale = cfg.model.octave_base_scale
        self.device = torch.device(device)
        self._cache: dict[tuple, tuple[Tensor, list[int]]] = {}

    def __call__(self, level_sizes: list[tuple[int, int]]) -> tuple[Tensor, list[int]]:
        key = tuple(tuple(s) for s in level_sizes)
        if key not in self._cache:
            self._cache[key] = make_anchors(list(key), self.strides, self.octave_base_scale, device=self.device)
        return self._cache[key]


@dataclass
class TeacherResult:
    labels: Optional[BatchLabels]   # lad / solad
    soft: Optional[SoftTargets]     # kd / solad
    num_anchors: int
    teacher_ms: float
    assign_ms: float


def teacher_assign(cfg: RunConfig, teacher: torch.nn.Module, images: Tensor, gt_boxes: list[Tensor],
                   gt_labels: list[Tensor], anchors_fn: Callable, *, sync: bool = False) -> TeacherResult:
    """Teacher forward on the batch, then what the mode needs from it: exactly Engine.step's teacher branch."""
    if cfg.mode not in TEACHER_MODES:
        raise ValueError(f"mode {cfg.mode!r} has no teacher; the assigner serves {', '.join(TEACHER_MODES)}")
    cuda_sync = sync and images.device.type == "cuda"
    t0 = time.perf_counter()
    with torch.no_grad():
        tout = teacher(images)
    anchors, nl = anchors_fn(tout.level_sizes)
    if cuda_sync:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    soft = assign_soft(cfg, tout, anchors, gt_boxes) if cfg.mode in SOFT_MODES else None
    labels = assign_hard(cfg, tout, anchors, nl, gt_boxes, gt_labels) if cfg.mode in HARD_MODES else None
    if cuda_sync:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    return TeacherResult(labels, soft, int(anchors.shape[0]), (t1 - t0) * 1e3, (t2 - t1) * 1e3)


# ------------------------------------------------------------------------------------------- sparse <-> dense

def labels_to_sparse(labels: BatchLabels) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per image (pos_anchor int32, pos_gt int32, ignore_anchor int32): the stream's form of `BatchLabels`."""
    pos = labels.gt_index >= 0
    out = []
    for i in range(pos.shape[0]):
        anchor = pos[i].nonzero().flatten()
        gt = labels.gt_index[i, anchor]
        ignore = labels.ignore[i].nonzero().flatten()
        out.append((anchor.to(torch.int32).cpu().numpy(), gt.to(torch.int32).cpu().numpy(),
                    ignore.to(torch.int32).cpu().numpy()))
    return out


def sparse_to_labels(pos_anchor: list, pos_gt: list, ignore_anchor: list, gt_labels: list[Tensor],
                     num_anchors: int, num_classes: int, device: torch.device | str = "cpu") -> BatchLabels:
    """Inverse of `labels_to_sparse`: the same `BatchLabels` `trainer.labeler.select` builds (labels = class of
    the positive's GT, `num_classes` elsewhere; gt_index = the GT, -1 elsewhere; ignore as sent)."""
    b = len(pos_anchor)
    labels = torch.full((b, num_anchors), num_classes, dtype=torch.long, device=device)
    gt_index = torch.full((b, num_anchors), -1, dtype=torch.long, device=device)
    ignore = torch.zeros((b, num_anchors), dtype=torch.bool, device=device)
    for i in range(b):
        anchor = _long(pos_anchor[i], device)
        if anchor.numel():
            gt = _long(pos_gt[i], device)
            gt_index[i, anchor] = gt
            labels[i, anchor] = gt_labels[i].to(device=device, dtype=torch.long)[gt]
        ign = _long(ignore_anchor[i], device)
        if ign.numel():
            ignore[i, ign] = True
    return BatchLabels(labels, gt_index, ignore)


def soft_fill(cls_prob: Tensor, floor: float) -> Tensor:
    """[B, C] float16: per image and class, the mean of the probabilities below `floor` (those not sent).

    The student is told this value wherever nothing was sent, instead of 0. A floor drops the many small
    background probabilities; sending 0 for them changes the KD loss a lot when they are close to the floor
    (an untrained teacher's 0.01 prior: x200 on kd_cls at floor 0.01), their mean costs C x 2 bytes per image
    and leaves only their spread around it (measured in docs/decisions.md, "Pipeline")."""
    below = cls_prob < floor
    count = below.sum(dim=1).clamp(min=1)
    return (torch.where(below, cls_prob, 0.0).sum(dim=1) / count).to(torch.float16)


def soft_to_sparse(soft: SoftTargets, floor: float) -> list[dict[str, np.ndarray]]:
    """Per image, the soft columns of the stream: class probabilities >= floor as (anchor, class, fp16 prob),
    and the KD box entries (anchor, teacher box, IoU-branch probability, overlap weight) exactly."""
    from schemas.assignment import sparsify_soft

    probs = soft.cls_prob.detach().float().cpu().numpy()
    b_idx = soft.batch_idx.cpu().numpy()
    a_idx = soft.anchor_idx.cpu().numpy()
    box = soft.box.detach().float().cpu().numpy()
    iou = soft.iou_prob.detach().float().cpu().numpy()
    weight = soft.weight.detach().float().cpu().numpy()
    bounds = np.searchsorted(b_idx, np.arange(probs.shape[0] + 1))  # batch_idx is sorted (nonzero of [B, A])
    out = []
    for i in range(probs.shape[0]):
        s, e = bounds[i], bounds[i + 1]
        anchor, cls, prob = sparsify_soft(probs[i], floor)
        out.append(dict(soft_anchor=anchor, soft_class=cls, soft_prob=prob, kd_anchor=a_idx[s:e].astype(np.int32),
                        kd_box=box[s:e], kd_iou_prob=iou[s:e], kd_weight=weight[s:e]))
    return out


def sparse_to_soft(rows: list, num_anchors: int, num_classes: int, device: torch.device | str = "cpu",
                   fill: Optional[np.ndarray] = None) -> SoftTargets:
    """Decoded stream rows (with soft columns) -> `SoftTargets`, densified on the device with `index_put_`.
    Entries not sent are `fill[i, c]` (`soft_fill`) when given, else 0 (the schema's default meaning)."""
    b = len(rows)
    if fill is not None:
        cls_prob = _tensor(fill, device).float().reshape(b, 1, num_classes).repeat(1, num_anchors, 1)
    else:
        cls_prob = torch.zeros((b, num_anchors, num_classes), dtype=torch.float32, device=device)
    batch_idx, anchor_idx, box, iou, weight = [], [], [], [], []
    for i, r in enumerate(rows):
        if r.soft_anchor.size:
            a = _long(r.soft_anchor, device)
            c = _long(r.soft_class, device)
            cls_prob[i].index_put_((a, c), _tensor(r.soft_prob, device).float())
        k = r.kd_anchor.size
        batch_idx.append(torch.full((k,), i, dtype=torch.long, device=device))
        anchor_idx.append(_long(r.kd_anchor, device))
        box.append(_tensor(r.kd_box, device).reshape(-1, 4))
        iou.append(_tensor(r.kd_iou_prob, device))
        weight.append(_tensor(r.kd_weight, device))
    return SoftTargets(cls_prob, torch.cat(batch_idx), torch.cat(anchor_idx), torch.cat(box), torch.cat(iou),
                       torch.cat(weight))


# Stream arrays are read-only views of Arrow buffers; the trainer never writes into them (schemas.assignment).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _tensor(array: np.ndarray, device) -> Tensor:
    """A tensor over a (possibly read-only) numpy view: no copy on the CPU, one copy to another device."""
    return torch.from_numpy(np.asarray(array)).to(device)


def _long(array: np.ndarray, device) -> Tensor:
    return _tensor(array, device).long()

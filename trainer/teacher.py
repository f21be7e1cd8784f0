"""The frozen teacher's side of LAD, KD and SoLAD (pure torch, no Ray, no I/O).

`Engine.step` (in-process) and `pipeline.assigner.TeacherAssigner` (the assigner service, a Ray actor) both load
the teacher with `load_teacher` and derive the labels with `assign_hard` / `assign_soft` from its outputs on the
same images, so the streamed assignment equals the in-process one by construction, not by a second
implementation kept in step. `assign_hard` is also how a PAA student assigns itself (it is the scoring network).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from schemas.config import RunConfig
from schemas.modes import mode_spec, modes_where
from schemas.rundir import RunDir
from trainer.assign import paa_assign_batch
from trainer.checkpoint import load_network
from trainer.losses import BatchLabels, SoftTargets, soft_targets
from trainer.model import HeadOutputs, PAADetector
from trainer.network import Precision, memory_format


def load_teacher(cfg: RunConfig, device: torch.device | str = "cpu") -> tuple[PAADetector, int]:
    """The run's frozen teacher (`teacher.checkpoint`, network A) in eval mode without gradients, and its step
    (the `teacher_version` stamped on what it assigns); its classes matched to the run's categories by name."""
    categories = RunDir(cfg.run_dir).categories()  # written by the driver before any worker starts
    teacher, _, version = load_network(cfg.teacher.checkpoint, cfg, "a", device, categories, warn=False)
    teacher.eval().requires_grad_(False).to(memory_format=memory_format(cfg))
    return teacher, version


def assign_hard(cfg: RunConfig, scorer: HeadOutputs, anchors: Tensor, num_anchors_per_level: list[int],
                gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> BatchLabels:
    """PAA assignment of a batch scored by `scorer` (the teacher in LAD / SoLAD, the student itself in PAA), under
    the run's `assign` settings: `trainer.assign.paa_assign_batch`."""
    a = cfg.assign
    return paa_assign_batch(anchors, num_anchors_per_level, scorer.cls_logits, scorer.box_deltas, gt_boxes,
                            gt_labels, topk=a.topk, iou_thr=a.iou_thr, gmm=a.gmm,
                            keep_single=a.single_candidate == "keep").labels


def assign_soft(cfg: RunConfig, teacher_out: HeadOutputs, anchors: Tensor, gt_boxes: list[Tensor]) -> SoftTargets:
    """The teacher's soft targets for KD / SoLAD (dense class probabilities, boxes where it overlaps a GT)."""
    return soft_targets(teacher_out.cls_logits, teacher_out.box_deltas, teacher_out.iou_logits, anchors, gt_boxes,
                        cfg.distill.min_iou)


@dataclass
class TeacherResult:
    labels: Optional[BatchLabels]   # modes with teacher_hard (lad, solad)
    soft: Optional[SoftTargets]     # modes with soft (kd, solad)


def teacher_assign(cfg: RunConfig, teacher: torch.nn.Module, images: Tensor, gt_boxes: list[Tensor],
                   gt_labels: list[Tensor], anchors_fn: Callable) -> TeacherResult:
    """Teacher forward on the batch, then what the mode needs from it: exactly Engine.step's teacher branch."""
    spec = mode_spec(cfg.mode)
    if not spec.needs_teacher:
        raise ValueError(f"mode {cfg.mode!r} has no teacher; the assigner serves "
                         f"{', '.join(modes_where('needs_teacher'))}")
    with torch.no_grad():
        tout = Precision(cfg, images.device).forward(teacher, images)
    anchors, nl = anchors_fn(tout.level_sizes)
    soft = assign_soft(cfg, tout, anchors, gt_boxes) if spec.soft else None
    labels = assign_hard(cfg, tout, anchors, nl, gt_boxes, gt_labels) if spec.teacher_hard else None
    return TeacherResult(labels, soft)

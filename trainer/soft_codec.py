"""How the teacher's soft labels cross the stream in a few percent of an image's bytes (KD, SoLAD).

A teacher gives A x C class probabilities per image: 1.8 million at COCO size (80 classes, ~22k anchors), 7 MB as
fp32. Most of them are background, and in logit space background is nearly additive: a level-and-class term
(how likely the class is anywhere on that level) plus an anchor term (how object-like that place looks). So each
image sends

    soft_base    [L, C] fp16   per level and class, the mean logit over the level's anchors
    soft_offset  [A] int8      per anchor, the mean over classes of what is left, in steps of 1/16 logit
    soft_index   [S] int32     every entry whose probability this model misses by more than `tolerance` ...
    soft_prob    [S] uint8     ... sent in steps of 1/255

and the student rebuilds sigmoid(base[level(a), c] + offset[a]) with those entries overwritten. Every probability
the student sees is therefore within `tolerance` of the teacher's (the 8-bit step's 1/510 is inside any tolerance
of at least 1/255; below that, the sent entries go as fp16): the same kind of guarantee as a floor, at one byte
per anchor instead of eight per kept entry. `tolerance=0` sends every entry as fp16.
Measured against the dense loss in docs/results.md ("Soft labels"); why this form in docs/decisions.md.

The KD box terms need the teacher's box only where it overlaps a GT (`SoftTargets`): those travel as anchor
index, fp16 deltas (decoded on the anchors in the loss) and IoU-branch probability (8-bit, or fp16 below a
tolerance of 1/255). The overlap that weighs each entry is not sent: the student decodes the teacher's box from
those deltas and measures it against its own GT boxes, as the teacher did.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from schemas.assignment import PROB_STEP, SOFT_OFFSET_STEP, AssignmentRow
from trainer.box_coder import decode
from trainer.losses import SoftTargets, largest_gt_iou

_LOGIT_EPS = 1e-6   # probabilities are clamped to [eps, 1 - eps] before the logit: +-13.8


def _per_anchor(base: Tensor, level_counts: Sequence[int]) -> Tensor:
    """[..., L, C] -> [..., A, C]: each level's row repeated over its anchors."""
    counts = torch.as_tensor(list(level_counts), device=base.device)
    return base.repeat_interleave(counts, dim=-2, output_size=int(sum(level_counts)))


def model_probs(base: Tensor, offset: Tensor, level_counts: Sequence[int]) -> Tensor:
    """The model's probabilities [..., A, C] from fp16 `base` [..., L, C] and int8 `offset` [..., A]."""
    logits = _per_anchor(base.float(), level_counts) + offset.float().unsqueeze(-1) * SOFT_OFFSET_STEP
    return torch.sigmoid(logits)


def fit_model(cls_prob: Tensor, level_counts: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Least squares of the additive logit model on every entry (closed form for a complete two-way table):
    base = each level's mean logit per class, offset = each anchor's mean residual, quantised. Returns (base
    [B, L, C] fp16, offset [B, A] int8)."""
    logits = torch.logit(cls_prob.float(), eps=_LOGIT_EPS)
    base = torch.stack([part.mean(dim=1) for part in logits.split(list(level_counts), dim=1)], dim=1).half()
    residual = (logits - _per_anchor(base.float(), level_counts)).mean(dim=2)
    offset = torch.round(residual / SOFT_OFFSET_STEP).clamp(-128, 127).to(torch.int8)
    return base, offset


def encode_soft(soft: SoftTargets, level_counts: Sequence[int], tolerance: float) -> list[dict[str, np.ndarray]]:
    """`SoftTargets` of a batch -> per image, the stream's soft columns (`schemas.assignment.AssignmentRow`)."""
    probs = soft.cls_prob.detach().float()
    base, offset = fit_model(probs, level_counts)
    if tolerance > 0:
        send = (probs - model_probs(base, offset, level_counts)).abs() > tolerance
    else:
        send = torch.ones_like(probs, dtype=torch.bool)
    flat_send, flat_probs = send.flatten(1), probs.flatten(1)
    b_idx = soft.batch_idx.cpu().numpy()
    bounds = np.searchsorted(b_idx, np.arange(probs.shape[0] + 1))  # batch_idx is sorted (nonzero of [B, A])
    a_idx = soft.anchor_idx.cpu().numpy().astype(np.int32)
    deltas = soft.deltas.detach().half().cpu().numpy()
    as_sent = quantise_prob if tolerance >= PROB_STEP else (lambda p: p.half())
    iou = as_sent(soft.iou_prob.detach()).cpu().numpy()
    base_np, offset_np = base.cpu().numpy(), offset.cpu().numpy()
    out = []
    for i in range(probs.shape[0]):
        index = flat_send[i].nonzero().squeeze(1)
        s, e = bounds[i], bounds[i + 1]
        out.append(dict(soft_base=base_np[i].reshape(-1), soft_offset=offset_np[i],
                        soft_index=index.cpu().numpy().astype(np.int32),
                        soft_prob=as_sent(flat_probs[i, index]).cpu().numpy(),
                        kd_anchor=a_idx[s:e], kd_delta=deltas[s:e], kd_iou_prob=iou[s:e]))
    return out


def quantise_prob(p: Tensor) -> Tensor:
    """Probabilities -> uint8 in steps of PROB_STEP (the nearest step)."""
    return torch.round(p.float().clamp(0, 1) / PROB_STEP).to(torch.uint8)


def _prob(q: np.ndarray, device) -> Tensor:
    """Sent probabilities -> float32: uint8 in PROB_STEP, or float16 as they are."""
    p = _tensor(q, device).float()
    return p * PROB_STEP if q.dtype == np.uint8 else p


def _tensor(a: np.ndarray, device) -> Tensor:
    return torch.from_numpy(np.asarray(a)).to(device)


def decode_soft(rows: list[AssignmentRow], anchors: Tensor, level_counts: Sequence[int], num_classes: int,
                device: torch.device | str = "cpu") -> SoftTargets:
    """Decoded stream rows -> `SoftTargets` on the device: the model's probabilities with the sent entries
    written over them, and each box entry weighed by its teacher box's IoU with the row's GT boxes (`anchors`:
    the batch's [A, 4] on `device`)."""
    num_anchors, num_levels = int(sum(level_counts)), len(level_counts)
    probs = []
    for r in rows:
        if r.soft_base.size != num_levels * num_classes:
            raise ValueError(f"image {r.image_id}: soft_base has {r.soft_base.size} values for {num_levels} levels "
                             f"x {num_classes} classes")
        base = _tensor(r.soft_base, device).reshape(num_levels, num_classes)
        p = model_probs(base, _tensor(r.soft_offset, device), level_counts)
        if r.soft_index.size:
            p.view(-1)[_tensor(r.soft_index, device).long()] = _prob(r.soft_prob, device)
        probs.append(p)
    cls_prob = torch.stack(probs) if probs else torch.zeros((0, num_anchors, num_classes), device=device)
    k = [int(r.kd_anchor.size) for r in rows]
    batch_idx = torch.repeat_interleave(torch.arange(len(rows), device=device), torch.tensor(k, device=device))

    def cat(name: str, width: Optional[int] = None) -> Tensor:
        parts = [_tensor(getattr(r, name), device) for r in rows]
        out = torch.cat(parts) if parts else torch.zeros(0, device=device)
        return out.reshape(-1, width) if width else out

    anchor_idx, deltas = cat("kd_anchor").long(), cat("kd_delta", 4).float()
    iou_prob = torch.cat([_prob(r.kd_iou_prob, device) for r in rows]) if rows else torch.zeros(0, device=device)
    return SoftTargets(cls_prob, batch_idx, anchor_idx, deltas, iou_prob,
                       _overlaps(rows, decode(anchors[anchor_idx], deltas), k, device))


def _overlaps(rows: list[AssignmentRow], teacher_boxes: Tensor, counts: list[int], device) -> Tensor:
    """Each box entry's largest IoU with a GT of its image (what `losses.teacher_box_iou` gave the teacher)."""
    out = [largest_gt_iou(boxes, _tensor(r.gt_boxes, device).reshape(-1, 4).float())
           for r, boxes in zip(rows, teacher_boxes.split(counts))]
    return torch.cat(out) if out else teacher_boxes.new_zeros(0)

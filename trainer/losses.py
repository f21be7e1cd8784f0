"""Training losses: PAA's detection loss on an assignment, and the soft-label KD loss of LAD's official code.

The detection loss is PAA's: focal classification over every non-ignored anchor and class, IoU-prediction BCE and
IoU-weighted GIoU on the positives. `soft_label_kd` is the paper's soft-label baseline (and half of SoLAD).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from trainer.box_coder import decode


@dataclass
class BatchLabels:
    """The assignment of a whole batch, flattened over images: what a student trains on.

    `labels` [B,A] holds the class of each positive and `num_classes` elsewhere; `gt_index` [B,A] indexes the
    image's GT boxes for positives (-1 elsewhere); `ignore` [B,A] anchors get no classification loss.
    """
    labels: Tensor
    gt_index: Tensor
    ignore: Tensor

    @property
    def pos(self) -> Tensor:
        return self.gt_index >= 0


def giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """torchvision's `generalized_box_iou_loss(reduction="none")`, value for value, with the intersection masked by
    `torch.where` where torchvision indexes by a mask (which makes the host wait for a GPU, four times a call)."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    intsctk = torch.where((ykis2 > ykis1) & (xkis2 > xkis1), (xkis2 - xkis1) * (ykis2 - ykis1), 0.0)
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    iouk = intsctk / (unionk + eps)
    area_c = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iouk - ((area_c - unionk) / (area_c + eps)))


def on_device(values: list, device) -> Tensor:
    """A small host list as a tensor on `device`, copied without making the host wait for a GPU."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


def aligned_iou(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of a[i] with b[i] (torchvision's box_iou is all-pairs)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=eps)


def focal_loss_sum(cls_logits: Tensor, labels: Tensor, ignore: Tensor, alpha: float = 0.25,
                   gamma: float = 2.0) -> Tensor:
    """torchvision's `sigmoid_focal_loss` summed over [B, A, C] logits whose targets are one class per anchor
    (`labels` [B, A], C for background), with `ignore`d anchors left out, without a target tensor.

    With target 0 an entry's loss is (1 - alpha) * p^gamma * softplus(x); with target 1 it is alpha * (1 - p)^gamma
    * softplus(-x). So every entry pays the first, and each positive anchor swaps it for the second at its class
    (a gather, no host sync). The same values as the dense form to float rounding, in about 0.6x its time
    (bench/focal_loss.py), and no [B, A, C] target to hold."""
    num_classes = cls_logits.shape[-1]
    as_negative = (1 - alpha) * torch.sigmoid(cls_logits).pow(gamma) * F.softplus(cls_logits)
    total = torch.where(ignore[..., None], 0.0, as_negative).sum()
    x = cls_logits.gather(-1, labels.clamp(max=num_classes - 1).long()[..., None]).squeeze(-1)
    p = torch.sigmoid(x)
    swap = alpha * (1 - p).pow(gamma) * F.softplus(-x) - (1 - alpha) * p.pow(gamma) * F.softplus(x)
    return total + torch.where((labels < num_classes) & ~ignore, swap, 0.0).sum()


def detection_loss(cls_logits: Tensor, box_deltas: Tensor, iou_logits: Tensor, anchors: Tensor, labels: BatchLabels,
                   gt_boxes: list[Tensor], *, cls_weight: float = 1.0, box_weight: float = 1.3,
                   iou_weight: float = 0.5, box_iou_weighted: bool = True) -> dict[str, Tensor]:
    """PAA's loss, normalised by this batch's positives."""
    pos = labels.pos
    num_pos = pos.sum().clamp(min=1).to(cls_logits.dtype)
    loss_cls = focal_loss_sum(cls_logits, labels.labels, labels.ignore) / num_pos

    b_idx, a_idx = pos.nonzero(as_tuple=True)
    if b_idx.numel() == 0:
        zero = box_deltas.sum() * 0 + iou_logits.sum() * 0
        return {"loss_cls": cls_weight * loss_cls, "loss_box": zero, "loss_iou": zero}
    # the positives' decoded boxes and their GT boxes, batch-flattened
    first_gt = on_device([0] + [len(g) for g in gt_boxes], anchors.device).cumsum(0)[:-1]
    target = torch.cat(gt_boxes)[first_gt[b_idx] + labels.gt_index[b_idx, a_idx]]
    pred = decode(anchors[a_idx], box_deltas[b_idx, a_idx])
    iou_target = aligned_iou(pred.detach(), target)
    loss_iou = F.binary_cross_entropy_with_logits(iou_logits[b_idx, a_idx], iou_target, reduction="sum") / num_pos
    giou = giou_loss(pred, target)
    if box_iou_weighted:
        w = iou_target.clamp(min=1e-6)
        loss_box = (giou * w).sum() / w.sum()
    else:
        loss_box = giou.sum() / num_pos
    return {"loss_cls": cls_weight * loss_cls, "loss_box": box_weight * loss_box, "loss_iou": iou_weight * loss_iou}


def bernoulli_kd(student_logits: Tensor, teacher_prob: Tensor, gamma: float = 0.5, smoothing: float = 0.0) -> Tensor:
    """Elementwise KL(t || p) between Bernoulli(t) and Bernoulli(sigmoid(student)), times a focal factor:
    |t - p|^gamma, or with `smoothing` e > 0 the official FocalKLLoss's ((t - p)^2 + e)^(gamma / 2).

    Takes the teacher as a probability (t = sigmoid(teacher logit) in-process, or the streamed fp16 soft label);
    the student side uses log-sigmoid so saturated logits stay finite. Unsmoothed, the factor is clamped away from
    0 so that equal inputs give zero loss and a zero (not NaN) gradient.
    """
    t = teacher_prob
    p = torch.sigmoid(student_logits)
    kl = torch.xlogy(t, t) - t * F.logsigmoid(student_logits) + \
        torch.xlogy(1 - t, 1 - t) - (1 - t) * F.logsigmoid(-student_logits)
    if smoothing > 0:
        focal = ((t - p).square() + smoothing).pow(gamma / 2)
    else:
        focal = (t - p).abs().clamp(min=1e-12).pow(gamma)
    return kl * focal


def largest_gt_iou(boxes: Tensor, gt: Tensor) -> Tensor:
    """[N]: each box's largest IoU with the GT boxes `gt` of its image (0 where the image has none)."""
    return box_iou(boxes, gt).amax(1) if len(gt) and len(boxes) else boxes.new_zeros(len(boxes))


@dataclass
class SoftTargets:
    """What the student learns from the teacher in KD/SoLAD: class probabilities on every anchor [B,A,C], and on
    the anchors (batch index, anchor index) whose teacher box overlaps a GT by more than min_iou: the teacher's
    box deltas there (boxes are decoded on the anchors in the loss), its IoU-branch probability and that overlap
    (the weight). Built in-process or decoded from the stream."""
    cls_prob: Tensor
    batch_idx: Tensor
    anchor_idx: Tensor
    deltas: Tensor
    iou_prob: Tensor
    weight: Tensor


def soft_targets(teacher_cls: Tensor, teacher_deltas: Tensor, teacher_iou: Tensor, anchors: Tensor,
                 gt_boxes: list[Tensor], min_iou: float) -> SoftTargets:
    teacher_boxes = decode(anchors.expand_as(teacher_deltas), teacher_deltas)
    overlap = teacher_boxes.new_zeros(teacher_boxes.shape[:2])  # [B, A]: 0 in images without GT
    for i, gt in enumerate(gt_boxes):
        overlap[i] = largest_gt_iou(teacher_boxes[i], gt)
    b_idx, a_idx = (overlap > min_iou).nonzero(as_tuple=True)
    return SoftTargets(torch.sigmoid(teacher_cls), b_idx, a_idx, teacher_deltas[b_idx, a_idx],
                       torch.sigmoid(teacher_iou[b_idx, a_idx]), overlap[b_idx, a_idx])


def soft_label_kd(student_cls: Tensor, student_deltas: Tensor, student_iou: Tensor, targets: SoftTargets,
                  anchors: Tensor, *, cls_weight: float, iou_weight: float, box_weight: float,
                  gamma: float = 0.5, focal_smoothing: float = 0.0) -> dict[str, Tensor]:
    """The official soft-label KD: KL on all anchors and classes; IoU-branch KL and GIoU to the teacher's box on the
    selected anchors (box term weighted by the overlap); every term averaged by the sum of those overlaps."""
    w = targets.weight
    norm = w.sum().clamp(min=1.0)
    loss_cls = bernoulli_kd(student_cls, targets.cls_prob, gamma, focal_smoothing).sum() / norm
    if w.numel() == 0:
        zero = student_deltas.sum() * 0 + student_iou.sum() * 0
        return {"kd_cls": cls_weight * loss_cls, "kd_iou": zero, "kd_box": zero}
    b, a = targets.batch_idx, targets.anchor_idx
    loss_iou = bernoulli_kd(student_iou[b, a], targets.iou_prob, gamma, focal_smoothing).sum() / norm
    student_boxes = decode(anchors[a], student_deltas[b, a])
    teacher_boxes = decode(anchors[a], targets.deltas)
    loss_box = (giou_loss(student_boxes, teacher_boxes) * w).sum() / norm
    return {"kd_cls": cls_weight * loss_cls, "kd_iou": iou_weight * loss_iou, "kd_box": box_weight * loss_box}

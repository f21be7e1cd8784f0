"""Label assignment for a whole batch: whichever network scores the candidates, the same PAA selection decides.

This is the one place where modes differ in *who* assigns: PAA scores candidates with the student itself, LAD with
a frozen teacher, CoLAD with whichever of two networks the role policy picks per (image, GT, level).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from trainer.assign import candidate_losses, colad_merge_with_pairs, paa_select_batch, preassign
from trainer.losses import BatchLabels
from trainer.model import HeadOutputs


def candidates(anchors: Tensor, gt_boxes: list[Tensor], iou_thr: float) -> list[Tensor]:
    """IoU pre-assignment per image: it depends on anchors and GT only, so teacher and student share it."""
    return [preassign(anchors, g, iou_thr) for g in gt_boxes]


def scored_candidates(anchors: Tensor, outputs: HeadOutputs, gt_boxes: list[Tensor], gt_labels: list[Tensor],
                      cand_gt: list[Tensor]) -> list[Tensor]:
    """Per image, the PAA candidate loss of the network that produced `outputs` (no gradient)."""
    with torch.no_grad():
        return [candidate_losses(anchors, outputs.cls_logits[i], outputs.box_deltas[i], gt_boxes[i], gt_labels[i],
                                 cand_gt[i]) for i in range(len(gt_boxes))]


def select(pos_losses: list[Tensor], cand_gt: list[Tensor], num_anchors_per_level: list[int],
           gt_labels: list[Tensor], num_classes: int, topk: int, gmm: str) -> BatchLabels:
    """Run PAA's GMM selection over the batch in one call and stack the result into `BatchLabels`."""
    masks = paa_select_batch(pos_losses, cand_gt, num_anchors_per_level, topk=topk, gmm=gmm)
    labels, gt_index, ignore = [], [], []
    for (pos, ign), cand, lab in zip(masks, cand_gt, gt_labels):
        idx = torch.where(pos, cand, torch.full_like(cand, -1))
        cls = torch.full_like(cand, num_classes)
        if pos.any():
            cls[pos] = lab[cand[pos]].to(cls.dtype)
        labels.append(cls)
        gt_index.append(idx)
        ignore.append(ign)
    return BatchLabels(torch.stack(labels), torch.stack(gt_index), torch.stack(ignore))


POLICIES = ("auto", "pin-a", "pin-b")


@dataclass(frozen=True)
class RolePolicy:
    """Who teaches in CoLAD: `auto` (the paper's std/mean criterion), `pin-a`, `pin-b`, or `alternate:N`
    (A teaches for steps [0, N), B for [N, 2N), and so on)."""
    name: str

    def __post_init__(self):
        if self.name not in POLICIES and not re.fullmatch(r"alternate:[1-9][0-9]*", self.name):
            raise ValueError(f"unknown role policy {self.name!r}: use auto, pin-a, pin-b or alternate:N")

    def pinned(self, step: int) -> str | None:
        """'a' or 'b' when one network teaches everything at this step; None for the per-object criterion."""
        if self.name == "pin-a":
            return "a"
        if self.name == "pin-b":
            return "b"
        if self.name.startswith("alternate:"):
            n = int(self.name.split(":")[1])
            return "b" if (step // n) % 2 else "a"
        return None


@dataclass
class ColadChoice:
    merged: list[Tensor]          # per image [A] candidate losses after the merge
    b_was_teacher: list[Tensor]   # per image [G, L] bool
    defined: list[Tensor]         # per image [G, L] bool: (GT, level) pairs that had candidates

    def teacher_ratio(self) -> float:
        """Share of defined (GT, level) pairs where B taught (NaN if the batch had no GT)."""
        taught = sum(int((b & d).sum()) for b, d in zip(self.b_was_teacher, self.defined))
        total = sum(int(d.sum()) for d in self.defined)
        return taught / total if total else float("nan")

    def teacher_ratio_by_level(self) -> list[float]:
        if not self.defined:
            return []
        levels = self.defined[0].shape[1]
        out = []
        for lv in range(levels):
            taught = sum(int((b[:, lv] & d[:, lv]).sum()) for b, d in zip(self.b_was_teacher, self.defined))
            total = sum(int(d[:, lv].sum()) for d in self.defined)
            out.append(taught / total if total else float("nan"))
        return out

    def role_counts(self, gt_boxes: list[Tensor]) -> dict[str, list[int]]:
        """(GT, level) pairs where B taught / that were defined, per FPN level and per object size (COCO's
        small < 32^2 <= medium < 96^2 <= large, by GT box area in network-input pixels). Plain ints, so counts
        of several images, workers or steps add up before the ratios are taken."""
        levels = self.defined[0].shape[1] if self.defined else 0
        out = {"taught_level": [0] * levels, "defined_level": [0] * levels,
               "taught_size": [0, 0, 0], "defined_size": [0, 0, 0]}
        for b, d, g in zip(self.b_was_teacher, self.defined, gt_boxes):
            taught = b & d
            out["taught_level"] = [x + int(y) for x, y in zip(out["taught_level"], taught.sum(0).tolist())]
            out["defined_level"] = [x + int(y) for x, y in zip(out["defined_level"], d.sum(0).tolist())]
            g = g[: d.shape[0]].float()
            area = (g[:, 2] - g[:, 0]).clamp_min(0) * (g[:, 3] - g[:, 1]).clamp_min(0)
            size = torch.bucketize(area, SIZE_BOUNDS.to(area.device), right=True)
            for s in range(3):
                mask = size == s
                out["taught_size"][s] += int(taught[mask].sum())
                out["defined_size"][s] += int(d[mask].sum())
        return out

    def teacher_ratio_by_size(self, gt_boxes: list[Tensor]) -> dict[str, float]:
        return ratios_by_size(self.role_counts(gt_boxes))


SIZES = ("small", "medium", "large")
SIZE_BOUNDS = torch.tensor([32.0 ** 2, 96.0 ** 2])


def _ratio(taught: int, total: int) -> float:
    return taught / total if total else float("nan")


def ratios_by_size(counts: dict[str, list[int]]) -> dict[str, float]:
    return {name: _ratio(t, d) for name, t, d in zip(SIZES, counts["taught_size"], counts["defined_size"])}


def ratios_by_level(counts: dict[str, list[int]]) -> list[float]:
    return [_ratio(t, d) for t, d in zip(counts["taught_level"], counts["defined_level"])]


def ratio_total(counts: dict[str, list[int]]) -> float:
    return _ratio(sum(counts["taught_level"]), sum(counts["defined_level"]))


def colad_choose(losses_a: list[Tensor], losses_b: list[Tensor], cand_gt: list[Tensor],
                 num_anchors_per_level: list[int], policy: RolePolicy, step: int) -> ColadChoice:
    """Merge the two networks' candidate losses per image under the role policy."""
    merged, b_teacher, defined = [], [], []
    pin = policy.pinned(step)
    for la, lb, cand in zip(losses_a, losses_b, cand_gt):
        m, b, d = colad_merge_with_pairs(la, lb, cand, num_anchors_per_level)
        if pin is not None:
            m = la if pin == "a" else lb
            b = torch.full_like(b, pin == "b")
        merged.append(m)
        b_teacher.append(b)
        defined.append(d)
    return ColadChoice(merged, b_teacher, defined)

"""Split co-learning, the torch half (no Ray, no I/O): one network of a CoLAD pair on its own, and the merge that
a coordinator runs on the two networks' sparse candidate losses.

`Engine._colad_step` does, in one process:  forward A and B -> candidate losses of each -> `colad_choose`
(policy) -> `select` (PAA GMM) -> both train on the common labels, one backward, one clip over both networks.
Split co-learning cuts that step in two halves that meet twice:

    side A: SideEngine.score  ──sparse losses──>  merge_sparse (coordinator)  <──sparse losses──  side B
    side A: train on labels   <──common labels──                            ──common labels──>  side B
    side A: backward, norms   ──per-parameter gradient norms──> (both) <──            side B: backward, norms
    side A: clip by the joint norm, SGD step                              side B: the same

Everything here is written so that the two halves together are bit-for-bit `Engine._colad_step`: the same
initialisation (A from `model_seed`, B from `colearn.seed_b`), the same candidate losses, `colad_choose` and
`select` on the same tensors, the same loss, the clip coefficient from the norm over A's then B's gradients
(`clip_grad_norm_` over both networks, as the one optimizer in `Engine` does), per-parameter SGD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from schemas.config import RunConfig
from trainer.anchors import make_anchors
from trainer.assigner_core import labels_to_sparse
from trainer.checkpoint import load_colearn_side
from trainer.engine import lr_factor
from trainer.labeler import (RolePolicy, candidates, colad_choose, ratio_total, ratios_by_level, ratios_by_size,
                             scored_candidates, select)
from trainer.losses import BatchLabels, detection_loss
from trainer.model import HeadOutputs, build_model

SIDES = ("a", "b")


def seed_of(cfg: RunConfig, side: str) -> int:
    seed_a = cfg.seed if cfg.model_seed is None else cfg.model_seed
    if side == "a":
        return seed_a
    return seed_a + 1 if cfg.colearn.seed_b is None else cfg.colearn.seed_b


def build_side(cfg: RunConfig, side: str):
    """Network `side` exactly as `Engine` builds it for mode colad (seeded the same way, or from its checkpoint)."""
    torch.manual_seed(seed_of(cfg, side))
    path = cfg.colearn.checkpoint_a if side == "a" else cfg.colearn.checkpoint_b
    if path:
        return load_colearn_side(path, cfg, side)
    return build_model(cfg.model if side == "a" else cfg.model_b)


@dataclass
class Scored:
    """One side's forward and candidate losses on a batch (what it keeps while the coordinator merges)."""
    out: HeadOutputs
    anchors: Tensor
    num_anchors_per_level: list[int]
    cand: list[Tensor]
    losses: list[Tensor]


class SideEngine:
    """One network of a CoLAD pair with its own optimizer: the half of `Engine` a split worker holds."""

    def __init__(self, cfg: RunConfig, side: str, device: torch.device | str = "cpu", total_steps: int = 1):
        if side not in SIDES:
            raise ValueError(f"side must be 'a' or 'b', got {side!r}")
        self.cfg, self.side = cfg, side
        self.device = torch.device(device)
        self.total_steps = max(1, total_steps)
        self.model = build_side(cfg, side).to(self.device)
        self.forward = self.model  # DDP wrapper goes here (`wrap`)
        t = cfg.train
        self.optimizer = torch.optim.SGD(list(self.model.parameters()), lr=t.lr, momentum=t.momentum,
                                         weight_decay=t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg, self.total_steps))
        self.step_count = 0
        self._anchors: dict[tuple, tuple[Tensor, list[int]]] = {}

    def wrap(self, wrapper) -> None:
        self.forward = wrapper(self.model)

    def anchors(self, level_sizes) -> tuple[Tensor, list[int]]:
        key = tuple(level_sizes)
        if key not in self._anchors:  # network A's anchor settings, as Engine uses for both (the config
                                                          # refuses a pair whose anchors differ)
            self._anchors[key] = make_anchors(list(level_sizes), self.cfg.model.strides,
                                              self.cfg.model.octave_base_scale, device=self.device)
        return self._anchors[key]

    # -- the two halves of the step ------------------------------------------------------------------------------
    def score(self, images: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> Scored:
        self.model.train()
        out = self.forward(images)
        anchors, nl = self.anchors(out.level_sizes)
        cand = candidates(anchors, gt_boxes, self.cfg.assign.iou_thr)
        losses = scored_candidates(anchors, out.detach(), gt_boxes, gt_labels, cand)
        return Scored(out, anchors, nl, cand, losses)

    def loss(self, scored: Scored, labels: BatchLabels, gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        lc = self.cfg.loss
        o = scored.out
        return detection_loss(o.cls_logits, o.box_deltas, o.iou_logits, scored.anchors, labels, gt_boxes,
                              cls_weight=lc.cls_weight, box_weight=lc.box_weight, iou_weight=lc.iou_weight,
                              box_iou_weighted=lc.box_iou_weighted)

    def backward(self, total: Tensor) -> Optional[Tensor]:
        """Gradients of this side; returns its per-parameter gradient norms when clipping is on (to exchange)."""
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if not self.cfg.train.grad_clip:
            return None
        return grad_norms(self._params_with_grad())

    def apply(self, norms_a: Optional[Tensor], norms_b: Optional[Tensor]) -> None:
        """Clip by the norm over both networks' gradients (A's then B's, as `clip_grad_norm_` over the one
        optimizer of `Engine`), step the optimizer and the LR schedule."""
        if self.cfg.train.grad_clip:
            norms = [n for n in (norms_a, norms_b) if n is not None and n.numel()]
            total = torch.linalg.vector_norm(torch.cat(norms).to(self.device), 2.0) if norms else \
                torch.tensor(0.0, device=self.device)
            torch.nn.utils.clip_grads_with_norm_(self._params_with_grad(), self.cfg.train.grad_clip, total)
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1

    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    # -- state ---------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"models": {self.side: self.model.state_dict()}, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "step": self.step_count}

    def load_state(self, state: dict) -> None:
        """`state`: a side state (`state()`, or `side_state` of a full checkpoint)."""
        self.model.load_state_dict(state["models"][self.side])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])


def grad_norms(params: list[Tensor]) -> Tensor:
    """Per-parameter 2-norms of the gradients, computed as `torch.nn.utils.clip_grad_norm_` computes them."""
    grads = [p.grad for p in params]
    if not grads:
        return torch.zeros(0)
    try:
        norms = torch._foreach_norm(grads, 2.0)
    except (RuntimeError, AttributeError):  # a device without foreach kernels: the same per-tensor norm
        norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    return torch.stack([n.detach() for n in norms])


def side_metrics(side: str, losses: dict[str, Tensor], scored: Scored) -> dict:
    """The per-network entries of `Engine._colad_step`'s metrics, for one side."""
    m = {f"{k}_{side}": float(v.detach()) for k, v in losses.items()}
    m[f"loss_{side}"] = float(sum(losses.values()).detach())
    vals = torch.cat([l[c >= 0] for l, c in zip(scored.losses, scored.cand)])
    m[f"cand_loss_mean_{side}"] = float(vals.mean()) if vals.numel() else float("nan")
    m[f"cand_loss_std_{side}"] = float(vals.std()) if vals.numel() > 1 else float("nan")
    return m


# ---------------------------------------------------------------------------------------------- sparse exchange

def to_sparse(scored: Scored, image_ids: list[int], gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> dict:
    """What a side sends the coordinator: per image only its candidate anchors (index, GT, loss), keyed by image
    id, plus the GT (labels for the selection, boxes for the per-size statistics). numpy, so Ray ships it flat."""
    images = []
    for i, (cand, losses) in enumerate(zip(scored.cand, scored.losses)):
        idx = torch.nonzero(cand >= 0).squeeze(1)
        images.append({"image_id": int(image_ids[i]),
                       "anchor": idx.to(torch.int32).cpu().numpy(),
                       "gt": cand[idx].to(torch.int32).cpu().numpy(),
                       "loss": losses[idx].float().cpu().numpy(),
                       "gt_labels": gt_labels[i].to(torch.int64).cpu().numpy(),
                       "gt_boxes": gt_boxes[i].float().cpu().numpy()})
    return {"num_anchors": int(scored.anchors.shape[0]), "num_anchors_per_level": list(scored.num_anchors_per_level),
            "images": images}


def _dense(image: dict, num_anchors: int) -> tuple[Tensor, Tensor]:
    cand = torch.full((num_anchors,), -1, dtype=torch.long)
    losses = torch.zeros(num_anchors, dtype=torch.float32)
    anchor = torch.from_numpy(np.asarray(image["anchor"], np.int64))
    cand[anchor] = torch.from_numpy(np.asarray(image["gt"], np.int64))
    losses[anchor] = torch.from_numpy(np.asarray(image["loss"], np.float32))
    return cand, losses


class ExchangeMismatch(RuntimeError):
    """The two sides sent different batches for one step: their data orders diverged."""


def merge_sparse(cfg: RunConfig, payload_a: dict, payload_b: dict, policy: RolePolicy, step_index: int) -> dict:
    """The coordinator's work for one (step, batch): `colad_choose` under the policy, then PAA's selection on the
    merged losses, exactly as `Engine._colad_step`; returns the common assignment (sparse, per image) and the
    role statistics of the batch. `step_index` is the number of steps done before this one (Engine.step_count)."""
    ids_a = [im["image_id"] for im in payload_a["images"]]
    ids_b = [im["image_id"] for im in payload_b["images"]]
    if ids_a != ids_b:
        raise ExchangeMismatch(f"step {step_index + 1}: side A sent images {ids_a}, side B {ids_b}")
    num_anchors, nl = payload_a["num_anchors"], payload_a["num_anchors_per_level"]
    cand, la, lb, labels, boxes = [], [], [], [], []
    for im_a, im_b in zip(payload_a["images"], payload_b["images"]):
        c, a = _dense(im_a, num_anchors)
        c_b, b = _dense(im_b, num_anchors)
        if not torch.equal(c, c_b):
            raise ExchangeMismatch(f"step {step_index + 1}, image {im_a['image_id']}: the sides disagree on the "
                                   "candidate anchors (different GT boxes or anchors)")
        cand.append(c)
        la.append(a)
        lb.append(b)
        labels.append(torch.from_numpy(np.asarray(im_a["gt_labels"], np.int64)))
        boxes.append(torch.from_numpy(np.asarray(im_a["gt_boxes"], np.float32)).reshape(-1, 4))
    choice = colad_choose(la, lb, cand, nl, policy, step_index)
    a = cfg.assign
    batch_labels = select(choice.merged, cand, nl, labels, cfg.model.num_classes, a.topk, a.gmm)
    counts = choice.role_counts(boxes)
    return {"assignment": labels_to_sparse(batch_labels), "counts": counts, "policy": policy.name,
            "num_pos": int(batch_labels.pos.sum()), "teacher_ratio": choice.teacher_ratio()}


def add_counts(total: Optional[dict], counts: dict) -> dict:
    if total is None:
        return {k: list(v) for k, v in counts.items()}
    return {k: [x + y for x, y in zip(total[k], counts[k])] for k in total}


def count_metrics(counts: Optional[dict]) -> dict:
    """teacher_ratio, by level and by size of summed role counts (the metrics.jsonl fields)."""
    if not counts:
        return {}
    return {"teacher_ratio": ratio_total(counts), "teacher_ratio_by_level": ratios_by_level(counts),
            "teacher_ratio_by_size": ratios_by_size(counts)}


# ------------------------------------------------------------------------------------------------ checkpoints

def merge_states(state_a: dict, state_b: dict) -> dict:
    """Two side states -> the state `Engine.state()` writes for mode colad (one SGD over A's then B's
    parameters), so a split run's checkpoint resumes in-process or inline and evaluates with `lad eval`."""
    oa, ob = state_a["optimizer"], state_b["optimizer"]
    na = len(oa["param_groups"][0]["params"])
    group = {**oa["param_groups"][0], "params": list(range(na + len(ob["param_groups"][0]["params"])))}
    state = dict(oa["state"])
    state.update({na + int(k): v for k, v in ob["state"].items()})
    return {"models": {"a": state_a["models"]["a"], "b": state_b["models"]["b"]},
            "optimizer": {"state": state, "param_groups": [group]}, "scheduler": state_a["scheduler"],
            "step": int(state_a["step"])}


def side_state(ckpt: dict, side: str, num_params: int) -> dict:
    """The inverse of `merge_states`: one side's part of a colad checkpoint. `num_params` is the number of
    parameters of that side's network (A's come first in the one optimizer, B's last)."""
    opt = ckpt["optimizer"]
    group = opt["param_groups"][0]
    params = list(group["params"])
    mine = params[:num_params] if side == "a" else params[len(params) - num_params:]
    offset = mine[0] if mine else 0
    keep = set(mine)
    state = {int(k) - offset: v for k, v in opt["state"].items() if int(k) in keep}
    return {"models": {side: ckpt["models"][side]},
            "optimizer": {"state": state, "param_groups": [{**group, "params": list(range(len(mine)))}]},
            "scheduler": ckpt["scheduler"], "step": int(ckpt["step"])}

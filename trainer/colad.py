"""CoLAD, co-learning label assignment distillation: networks A and B train together on one common assignment.

Per step both networks score the candidates of the batch (`trainer.assign`, steps 1-2); per (image, GT, level)
the role policy decides whose candidate losses feed PAA's selection (`colad_choose`: the paper's std/mean
criterion `trainer.assign.colad_merge` under `auto`, one network under `pin-a`/`pin-b`/`alternate:N`); both
networks then train on the labels of that selection (`colad_assign`). The policy type is
`schemas.policy.RolePolicy` (re-exported here). Who taught is counted per (GT, level) pair, by FPN level and by
object size, as plain ints that add up over images, workers and steps (`ColadChoice.role_counts`, `add_counts`)
before ratios are taken (`count_metrics`: NaN for 0/0).

`Engine._colad_step` (trainer/engine.py) does a step in one process: forward A and B -> candidate losses of each
-> `colad_assign` -> both train on the common labels, one backward, one clip over both networks. Split
co-learning cuts that step in two halves that meet twice:

    side A: SideEngine.score  ──sparse losses──>  merge_sparse (coordinator)  <──sparse losses──  side B
    side A: train on labels   <──common labels──                            ──common labels──>  side B
    side A: backward, norms   ──per-parameter gradient norms──> (both) <──            side B: backward, norms
    side A: clip by the joint norm, SGD step                              side B: the same

The two halves together are bit-for-bit `Engine._colad_step`: the same networks, optimizer and schedule
(`trainer.network`), the same candidate losses, `colad_assign` on the same tensors, the same loss, the clip
coefficient from the norm over A's then B's gradients (`clip_grad_norm_` over both networks, as the one optimizer
in `Engine` does), per-parameter SGD.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from schemas.config import RunConfig
from schemas.policy import RolePolicy
from trainer.assign import candidate_losses_batch, colad_merge_with_pairs, preassign_batch, select_labels
from trainer.losses import BatchLabels
from trainer.model import HeadOutputs
from trainer.network import Optimised, build_network, detection_loss_for, params_with_grad
from trainer.worker import labels_to_sparse


# ------------------------------------------------------------------------------------------ who teaches

SIZES = ("small", "medium", "large")
SIZE_BOUNDS = torch.tensor([32.0 ** 2, 96.0 ** 2])  # COCO's: small < 32^2 <= medium < 96^2 <= large


def ratio(taught: int, total: int) -> float:
    """taught / total, NaN when total is 0 (metrics writers turn NaN into JSON null)."""
    return taught / total if total else float("nan")


@dataclass
class ColadChoice:
    merged: list[Tensor]          # per image [A] candidate losses after the merge
    b_was_teacher: list[Tensor]   # per image [G, L] bool
    defined: list[Tensor]         # per image [G, L] bool: (GT, level) pairs that had candidates

    def role_counts(self, gt_boxes: list[Tensor]) -> dict[str, list[int]]:
        """(GT, level) pairs where B taught / that were defined, per FPN level and per object size (COCO's
        small < 32^2 <= medium < 96^2 <= large, by GT box area in network-input pixels). Plain ints, so counts
        of several images, workers or steps add up before the ratios are taken."""
        out = zero_counts(self.defined[0].shape[1] if self.defined else 0)
        for b, d, g in zip(self.b_was_teacher, self.defined, gt_boxes):
            g = g[: d.shape[0]].float()
            area = (g[:, 2] - g[:, 0]).clamp_min(0) * (g[:, 3] - g[:, 1]).clamp_min(0)
            size = torch.bucketize(area, SIZE_BOUNDS.to(area.device), right=True)
            for name, m in (("taught", b & d), ("defined", d)):
                by_size = [int(m[size == s].sum()) for s in range(len(SIZES))]
                out[f"{name}_level"] = [x + y for x, y in zip(out[f"{name}_level"], m.sum(0).tolist())]
                out[f"{name}_size"] = [x + y for x, y in zip(out[f"{name}_size"], by_size)]
        return out


def zero_counts(levels: int) -> dict[str, list[int]]:
    """The role counts of a batch with no object (`ColadChoice.role_counts`'s layout): what an idle rank adds."""
    return {"taught_level": [0] * levels, "defined_level": [0] * levels, "taught_size": [0] * len(SIZES),
            "defined_size": [0] * len(SIZES)}


def colad_choose(losses_a: list[Tensor], losses_b: list[Tensor], cand_gt: list[Tensor],
                 num_anchors_per_level: list[int], policy: RolePolicy, step: int) -> ColadChoice:
    """Merge the two networks' candidate losses per image under the role policy (`step`: steps done before)."""
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


def colad_assign(cfg: RunConfig, losses_a: list[Tensor], losses_b: list[Tensor], cand_gt: list[Tensor],
                 num_anchors_per_level: list[int], gt_labels: list[Tensor], policy: RolePolicy,
                 step: int) -> tuple[BatchLabels, ColadChoice]:
    """The common assignment of a batch: `colad_choose` under the policy, then PAA's selection on the merged
    losses. In-process (`Engine._colad_step`) and at the split coordinator (`merge_sparse`) alike."""
    choice = colad_choose(losses_a, losses_b, cand_gt, num_anchors_per_level, policy, step)
    a = cfg.assign
    labels = select_labels(choice.merged, cand_gt, num_anchors_per_level, gt_labels, cfg.model.num_classes, a.topk,
                           a.gmm, a.single_candidate == "keep")
    return labels, choice


def candidate_stats(side: str, losses: list[Tensor], cand_gt: list[Tensor]) -> dict[str, float]:
    """Mean and std of one network's candidate losses over the batch (`cand_loss_mean_<side>`, `..._std_<side>`)."""
    vals = torch.cat([l[c >= 0] for l, c in zip(losses, cand_gt)])
    return {f"cand_loss_mean_{side}": float(vals.mean()) if vals.numel() else float("nan"),
            f"cand_loss_std_{side}": float(vals.std()) if vals.numel() > 1 else float("nan")}


# ------------------------------------------------------------------------------------------ split: one side

@dataclass
class Scored:
    """One side's forward and candidate losses on a batch (what it keeps while the coordinator merges)."""
    out: HeadOutputs
    anchors: Tensor
    num_anchors_per_level: list[int]
    cand: list[Tensor]
    losses: list[Tensor]


class SideEngine(Optimised):
    """One network of a CoLAD pair with its own optimizer: the half of `Engine` a split worker holds. Its state is
    a side state (`state()`, or `side_state` of a full checkpoint), with this side's own fp16 loss scale."""

    def __init__(self, cfg: RunConfig, side: str, device: torch.device | str = "cpu", total_steps: int = 1):
        self.cfg, self.side = cfg, side
        self.model = build_network(cfg, side).to(device)  # refuses a side other than 'a' or 'b'
        self.forward = self.model  # DDP wrapper goes here (`wrap`)
        self._optimise(self.model.parameters(), device, total_steps)

    def networks(self) -> dict:
        return {self.side: self.model}

    def wrap(self, wrapper) -> None:
        self.forward = wrapper(self.model)

    # -- the two halves of the step ------------------------------------------------------------------------------
    def score(self, images: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> Scored:
        self.model.train()
        out = self.precision.forward(self.forward, images)
        anchors, nl = self.anchors(out.level_sizes)
        cand = preassign_batch(anchors, gt_boxes, self.cfg.assign.iou_thr)
        losses = candidate_losses_batch(anchors, out.cls_logits, out.box_deltas, gt_boxes, gt_labels, cand)
        return Scored(out, anchors, nl, cand, losses)

    def loss(self, scored: Scored, labels: BatchLabels, gt_boxes: list[Tensor]) -> dict[str, Tensor]:
        return detection_loss_for(self.cfg, scored.out, scored.anchors, labels, gt_boxes)

    def backward(self, total: Tensor) -> Optional[Tensor]:
        """Gradients of this side; returns its per-parameter gradient norms when clipping is on (to exchange)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.scaler.scale(total).backward()
        self._finite &= torch.isfinite(total.detach())
        if not self.cfg.train.grad_clip:
            return None
        self.precision.scaler.unscale_(self.optimizer)  # fp16: the norms of the true gradients are exchanged
        return grad_norms(params_with_grad(self.optimizer))

    def apply(self, norms_a: Optional[Tensor], norms_b: Optional[Tensor]) -> None:
        """Clip by the norm over both networks' gradients (A's then B's, as `clip_grad_norm_` over the one
        optimizer of `Engine`), step the optimizer and the LR schedule. In fp16 a side skips its step on its own
        overflow; with clipping, on either side's (a joint norm that is not finite), as `Engine`'s one scaler
        skips both networks' step, so one side's overflow never reaches the other's weights."""
        scaler = self.precision.scaler
        if self.cfg.train.grad_clip:
            norms = [n for n in (norms_a, norms_b) if n is not None and n.numel()]
            total = torch.linalg.vector_norm(torch.cat(norms).to(self.device), 2.0) if norms else \
                torch.tensor(0.0, device=self.device)
            if scaler.is_enabled() and not torch.isfinite(total):
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
                return self._scheduled()
            torch.nn.utils.clip_grads_with_norm_(params_with_grad(self.optimizer), self.cfg.train.grad_clip, total)
        scaler.step(self.optimizer)
        scaler.update()
        self._scheduled()


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
    m.update(candidate_stats(side, scored.losses, scored.cand))
    return m


# ------------------------------------------------------------------------------------------ split: the exchange

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
    """The coordinator's work for one (step, batch): `colad_assign` on the two sides' losses, exactly as
    `Engine._colad_step`; returns the common assignment (sparse, per image) and the role statistics of the batch.
    `step_index` is the number of steps done before this one (Engine.step_count)."""
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
    batch_labels, choice = colad_assign(cfg, la, lb, cand, nl, labels, policy, step_index)
    counts = choice.role_counts(boxes)
    return {"assignment": labels_to_sparse(batch_labels), "counts": counts, "policy": policy.name,
            "num_pos": int(batch_labels.pos.sum()), "teacher_ratio": count_metrics(counts)["teacher_ratio"]}


def add_counts(total: Optional[dict], counts: dict) -> dict:
    if total is None:
        return {k: list(v) for k, v in counts.items()}
    return {k: [x + y for x, y in zip(total[k], counts[k])] for k in total}


def count_metrics(counts: Optional[dict]) -> dict:
    """teacher_ratio, by level and by size of summed role counts (the metrics.jsonl fields)."""
    if not counts:
        return {}
    taught, defined = counts["taught_level"], counts["defined_level"]
    return {"teacher_ratio": ratio(sum(taught), sum(defined)),
            "teacher_ratio_by_level": [ratio(t, d) for t, d in zip(taught, defined)],
            "teacher_ratio_by_size": {s: ratio(t, d) for s, t, d in zip(SIZES, counts["taught_size"],
                                                                        counts["defined_size"])}}


# ------------------------------------------------------------------------------------------ split: checkpoints

def merge_states(state_a: dict, state_b: dict) -> dict:
    """Two side states -> the state `Engine.state()` writes for mode colad (one SGD over A's then B's
    parameters), so a split run's checkpoint resumes in-process or inline and evaluates with `lad eval`."""
    oa, ob = state_a["optimizer"], state_b["optimizer"]
    na = len(oa["param_groups"][0]["params"])
    group = {**oa["param_groups"][0], "params": list(range(na + len(ob["param_groups"][0]["params"])))}
    state = dict(oa["state"])
    state.update({na + int(k): v for k, v in ob["state"].items()})
    scalers = {k: s["scaler"] for k, s in (("scaler", state_a), ("scaler_b", state_b)) if "scaler" in s}
    return {"models": {"a": state_a["models"]["a"], "b": state_b["models"]["b"]},
            "optimizer": {"state": state, "param_groups": [group]}, "scheduler": state_a["scheduler"],
            "step": int(state_a["step"]), **scalers}  # `scaler` is A's, the one an in-process resume takes


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
    scaler = ckpt.get("scaler_b") if side == "b" and "scaler_b" in ckpt else ckpt.get("scaler")  # in-process: one
    return {"models": {side: ckpt["models"][side]},
            "optimizer": {"state": state, "param_groups": [{**group, "params": list(range(len(mine)))}]},
            "scheduler": ckpt["scheduler"], "step": int(ckpt["step"]), **({"scaler": scaler} if scaler else {})}

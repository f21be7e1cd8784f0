"""The training step of every mode, and the state one training process holds (networks, teacher, optimizer).

What a mode trains on is read from its row of `schemas.modes`: hard labels assigned by the student itself (paa),
by the frozen teacher (lad, solad; `trainer.teacher`) or by the pair under the role policy (colad;
`trainer.colad`), and the teacher's soft labels (kd, solad). Networks, optimizer, anchors and the detection loss
are built as every engine builds them (`trainer.network`).

The step takes a batch already on the device: uint8 images [B,3,S,S] and per-image GT boxes/labels. Where the
labels come from is the only thing the distributed pipeline changes (`step_on_labels`), so both paths share it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from schemas.config import RunConfig
from schemas.modes import mode_spec
from trainer.assign import candidate_losses_batch, preassign_batch
from trainer.colad import RolePolicy, candidate_stats, colad_assign, count_metrics
from trainer.losses import BatchLabels, SoftTargets, soft_label_kd
from trainer.model import HeadOutputs, PAADetector
from trainer.network import Optimised, build_network, detection_loss_for
from trainer.teacher import assign_hard, assign_soft
from trainer.teacher import load_teacher as _load_teacher  # `load_teacher` is also an argument of Engine


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA device is available; use cpu or auto")
    return dev


class Timer:
    """Wall-clock sections of a step. With `sync`, CUDA work is waited for so the split is honest on a GPU."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.ms: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.ms[name] = self.ms.get(name, 0.0) + (now - self._t) * 1000
        self._t = now


def on_host(metrics: dict, step: int, check: bool = True) -> dict:
    """A step's metrics as Python numbers, the device's values fetched in one transfer. A step leaves its losses on
    the device (a float() per metric would make every step wait for it); the loop calls this only on the steps it
    logs. A non-finite loss raises (the loop also checks every rank's `Engine.losses_finite` before each log and
    checkpoint)."""
    tensors = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    out = dict(metrics)
    if tensors:
        values = torch.stack([metrics[k].detach().reshape(()).double() for k in tensors]).tolist()
        for k, v in zip(tensors, values):
            out[k] = int(v) if not metrics[k].is_floating_point() else v
    for k, v in out.items():
        if check and k.startswith("loss") and isinstance(v, float) and not math.isfinite(v):
            raise FloatingPointError(f"step {step}: {k} is {v}; lower train.lr or check the data")
    return out


@dataclass
class StepResult:
    metrics: dict  # losses as 0-d tensors on the device, timings and lr as floats (`on_host` converts)
    labels: BatchLabels | None = None
    extra: dict = field(default_factory=dict)


class Engine(Optimised):
    """Everything one training process holds. `step()` runs one optimisation step of the configured mode."""

    def __init__(self, cfg: RunConfig, device: torch.device | str = "cpu", total_steps: int = 1,
                 sync_timing: bool = False, load_teacher: bool = True):
        """`load_teacher=False`: a student that only runs `step_on_labels` (the assigner service holds the
        teacher), so the teacher's weights never take the student's memory."""
        self.cfg = cfg
        self.spec = mode_spec(cfg.mode)
        self.sync_timing = sync_timing
        self.model = build_network(cfg, "a").to(device)
        self.model_b: PAADetector | None = build_network(cfg, "b").to(device) if self.spec.co_learning else None
        self.forward_a, self.forward_b = self.model, self.model_b  # DDP wrappers go here (see `wrap`)
        load = self.spec.needs_teacher and load_teacher
        self.teacher: PAADetector | None = _load_teacher(cfg, torch.device(device))[0] if load else None
        self._optimise([p for m in self.networks().values() for p in m.parameters()], device, total_steps)
        self.policy = RolePolicy.parse(cfg.colearn.policy)

    # -- helpers -------------------------------------------------------------------------------------------------
    def wrap(self, wrapper) -> None:
        """Forward through `wrapper(network)` (e.g. DistributedDataParallel); weights stay in `model`/`model_b`."""
        self.forward_a = wrapper(self.model)
        if self.model_b is not None:
            self.forward_b = wrapper(self.model_b)

    def set_policy(self, policy: str | RolePolicy) -> None:
        self.policy = RolePolicy.parse(policy)

    def soft_targets(self, tout: HeadOutputs, anchors: Tensor, gt_boxes) -> SoftTargets:
        return assign_soft(self.cfg, tout, anchors, gt_boxes)

    # -- the step ------------------------------------------------------------------------------------------------
    def step(self, images: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> StepResult:
        """One optimisation step of the configured mode, labels assigned in-process."""
        timer = Timer(self.device, self.sync_timing)
        self.model.train()
        if self.spec.co_learning:
            return self._colad_step(images, gt_boxes, gt_labels, timer)
        tout = None
        if self.teacher is not None:  # first: after the student's forward, whose graph is then held, the same
            with torch.no_grad():     # forward took 1.3x as long (docs/decisions.md, "The teacher goes first")
                tout = self.precision.forward(self.teacher, images)
            timer.lap("teacher_ms")
        out = self.precision.forward(self.forward_a, images)
        timer.lap("forward_ms")
        anchors, nl = self.anchors(out.level_sizes)
        labels, soft = None, None
        if self.spec.soft:
            soft = self.soft_targets(tout, anchors, gt_boxes)
            timer.lap("soft_ms")
        if self.spec.hard:  # the assigner service's call (trainer/teacher.py), on the student itself in paa
            scorer = tout if self.spec.teacher_hard else out.detach()
            labels = assign_hard(self.cfg, scorer, anchors, nl, gt_boxes, gt_labels)
            timer.lap("assign_ms")
        return self._finish(out, anchors, labels, gt_boxes, soft, timer)

    def step_on_labels(self, images: Tensor, gt_boxes: list[Tensor], labels: BatchLabels | None,
                       soft: SoftTargets | None = None) -> StepResult:
        """One step on labels assigned elsewhere (the assigner service): the student's work alone."""
        timer = Timer(self.device, self.sync_timing)
        self.model.train()
        out = self.precision.forward(self.forward_a, images)
        timer.lap("forward_ms")
        anchors, _ = self.anchors(out.level_sizes)
        return self._finish(out, anchors, labels, gt_boxes, soft, timer)

    def _finish(self, out, anchors, labels, gt_boxes, soft, timer) -> StepResult:
        losses: dict[str, Tensor] = {}
        if labels is not None:
            losses.update(detection_loss_for(self.cfg, out, anchors, labels, gt_boxes))
        if self.spec.soft:
            d = self.cfg.distill
            losses.update(soft_label_kd(out.cls_logits, out.box_deltas, out.iou_logits, soft, anchors,
                                        cls_weight=d.cls_weight, iou_weight=d.iou_weight, box_weight=d.box_weight,
                                        gamma=d.gamma, focal_smoothing=d.focal_smoothing))
        total = sum(losses.values())
        self._backward(total)
        timer.lap("backward_ms")
        metrics = {k: v.detach() for k, v in losses.items()}
        metrics["loss"] = total.detach()
        if labels is not None:
            metrics["num_pos"] = labels.pos.sum()
        return StepResult(self._stamp(metrics, timer), labels=labels)

    def _colad_step(self, images, gt_boxes, gt_labels, timer) -> StepResult:
        self.model_b.train()
        out_a = self.precision.forward(self.forward_a, images)
        out_b = self.precision.forward(self.forward_b, images)
        timer.lap("forward_ms")
        anchors, nl = self.anchors(out_a.level_sizes)
        cand = preassign_batch(anchors, gt_boxes, self.cfg.assign.iou_thr)
        losses_a = candidate_losses_batch(anchors, out_a.cls_logits, out_a.box_deltas, gt_boxes, gt_labels, cand)
        losses_b = candidate_losses_batch(anchors, out_b.cls_logits, out_b.box_deltas, gt_boxes, gt_labels, cand)
        labels, choice = colad_assign(self.cfg, losses_a, losses_b, cand, nl, gt_labels, self.policy, self.step_count)
        timer.lap("assign_ms")
        la = detection_loss_for(self.cfg, out_a, anchors, labels, gt_boxes)
        lb = detection_loss_for(self.cfg, out_b, anchors, labels, gt_boxes)
        total_a, total_b = sum(la.values()), sum(lb.values())
        total = total_a + total_b
        self._backward(total)
        timer.lap("backward_ms")
        metrics = {f"{k}_{side}": float(v.detach()) for side, ls in (("a", la), ("b", lb)) for k, v in ls.items()}
        counts = choice.role_counts(gt_boxes)
        metrics.update(loss=float(total.detach()), loss_a=float(total_a.detach()), loss_b=float(total_b.detach()),
                       num_pos=int(labels.pos.sum()), policy=self.policy.name, **count_metrics(counts))
        metrics.update(**candidate_stats("a", losses_a, cand), **candidate_stats("b", losses_b, cand))
        return StepResult(self._stamp(metrics, timer), labels=labels, extra={"counts": counts})

    def _backward(self, total: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.step(self.optimizer, total, self.cfg.train.grad_clip)
        self._scheduled()
        self._finite &= torch.isfinite(total.detach())

    def _stamp(self, metrics: dict, timer: Timer) -> dict:
        metrics.update({k: round(v, 3) for k, v in timer.ms.items()})
        metrics["lr"] = self.lr
        # CoLAD's role statistics are read every step anyway; the finite check stays the loop's, on every rank
        return on_host(metrics, self.step_count, check=False) if self.spec.co_learning else metrics

    # -- state ---------------------------------------------------------------------------------------------------
    def networks(self) -> dict[str, PAADetector]:
        return {k: m for k, m in (("a", self.model), ("b", self.model_b)) if m is not None}

    def state(self) -> dict:
        return super().state(policy=self.policy.name)

    def load_state(self, ckpt: dict) -> None:
        super().load_state(ckpt)
        if ckpt.get("policy"):
            self.set_policy(ckpt["policy"])

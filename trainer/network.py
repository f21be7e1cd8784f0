"""What every training process builds the same way, whichever engine holds it (`trainer.engine.Engine`: one
process, one or two networks; `trainer.colad.SideEngine`: one network of a split co-learning pair):

    seed_of / build_network    network A or B, seeded (A: model_seed or seed; B: colearn.seed_b or A's + 1),
                               in colad from colearn.checkpoint_a/b when set
    check_start                every file the networks start from, read and checked before any worker starts
    make_optimizer / lr_factor SGD and its schedule (linear warm-up, step decay at milestone fractions)
    AnchorCache                anchors per pyramid shape, made once
    detection_loss_for         PAA's detection loss under the run's `loss` weights
    Precision                  mixed precision (`train.amp`): autocast forwards, the fp16 loss scaler
    Optimised                  what an engine keeps beside its networks, and its checkpoint state

Built the same way everywhere, so an in-process colad run and the two halves of a split one start from the same
weights and take the same steps, bit for bit.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor

from schemas.config import ConfigError, RunConfig
from schemas.modes import mode_spec
from schemas.rundir import RunDir
from trainer.anchors import make_anchors
from trainer.checkpoint import load_colearn_side, load_network
from trainer.losses import BatchLabels, detection_loss
from trainer.model import HeadOutputs, PAADetector, build_model

NETWORKS = ("a", "b")


def seed_of(cfg: RunConfig, which: str) -> int:
    """Initialisation seed of network `which`: A from `model_seed` (default `seed`), B from `colearn.seed_b`
    (default A's + 1)."""
    seed_a = cfg.seed if cfg.model_seed is None else cfg.model_seed
    if which == "a":
        return seed_a
    return seed_a + 1 if cfg.colearn.seed_b is None else cfg.colearn.seed_b


def build_network(cfg: RunConfig, which: str = "a") -> PAADetector:
    """Network `which` ("a" or "b") of a run, on the CPU: the torch RNG seeded with `seed_of`, then built from its
    model config (`model`, `colearn.model_b`), or in colad loaded from `colearn.checkpoint_a/b` when set."""
    if which not in NETWORKS:
        raise ValueError(f"network must be 'a' or 'b', got {which!r}")
    torch.manual_seed(seed_of(cfg, which))
    path = cfg.colearn.checkpoint_a if which == "a" else cfg.colearn.checkpoint_b
    if mode_spec(cfg.mode).co_learning and path:
        network = load_colearn_side(path, cfg, which, RunDir(cfg.run_dir).categories(), warn=False)
    else:
        network = build_model(cfg.model if which == "a" else cfg.model_b)
    return network.to(memory_format=memory_format(cfg))


def memory_format(cfg: RunConfig) -> torch.memory_format:
    """NHWC (`train.channels_last`, the default: oneDNN's faster convolutions on a CPU) or PyTorch's NCHW."""
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def check_start(cfg: RunConfig, categories: Optional[list] = None) -> None:
    """Read and check, here and now, every file a run's networks start from: the teacher checkpoint (readable,
    the same anchors, input size and classes, weights that fit, `categories` by name), co-learning's
    `checkpoint_a/b` and a `pretrained` backbone. Drivers call it before any worker or Ray process starts, so a
    truncated or foreign file is one `CheckpointError` naming it, not tracebacks from every worker later."""
    spec = mode_spec(cfg.mode)
    if spec.needs_teacher:
        load_network(cfg.teacher.checkpoint, cfg, "a", "cpu", categories)
    for which in NETWORKS if spec.co_learning else ("a",):
        path = cfg.colearn.checkpoint_a if which == "a" else cfg.colearn.checkpoint_b
        model = cfg.model if which == "a" else cfg.model_b
        if spec.co_learning and path:
            load_colearn_side(path, cfg, which, categories)
        elif model.pretrained:
            build_model(model)


def warmup_steps(cfg: RunConfig, total_steps: int) -> int:
    """`train.warmup_steps`, capped at `warmup_max_fraction` of the run (rounded up) when that is set: the official
    recipe's 500 of 87,960 iterations become 3 of a 450-step run, the same share of its length."""
    t = cfg.train
    if t.warmup_max_fraction is None:
        return t.warmup_steps
    return min(t.warmup_steps, math.ceil(t.warmup_max_fraction * total_steps))


def milestone_steps(cfg: RunConfig, total_steps: int) -> list[int]:
    """The steps at which the LR decays: the first step at or past each milestone fraction of the run. The 1e-9
    keeps 8/12 of a 12-epoch run on epoch 8's first step whatever the float rounding of 8/12."""
    return [math.ceil(m * total_steps - 1e-9) for m in cfg.train.milestones]


def lr_factor(step: int, cfg: RunConfig, total_steps: int) -> float:
    """Linear warm-up from `warmup_ratio` over `warmup_steps`, then step decay by `gamma` at each milestone."""
    t = cfg.train
    warm, steps = 1.0, warmup_steps(cfg, total_steps)
    if step < steps:
        warm = t.warmup_ratio + (1 - t.warmup_ratio) * step / steps
    decays = sum(step >= m for m in milestone_steps(cfg, total_steps))
    return warm * t.gamma ** decays


def trainable(network: torch.nn.Module) -> list[Tensor]:
    """The parameters a network trains: all but the frozen stages' (`model.frozen_stages`)."""
    return [p for p in network.parameters() if p.requires_grad]


def make_optimizer(params: Iterable[Tensor], cfg: RunConfig, total_steps: int):
    """(SGD over `params`, its LambdaLR schedule `lr_factor`) for a run of `total_steps` steps (at least 1).
    Frozen parameters (requires_grad False) are left out: no gradient, no momentum buffer."""
    t = cfg.train
    total_steps = max(1, total_steps)
    optimizer = torch.optim.SGD([p for p in params if p.requires_grad], lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    return optimizer, scheduler


class AnchorCache:
    """Anchors per pyramid shape (`level_sizes` -> (anchors [A, 4], anchors per level)), made once, on `device`.
    Network A's anchor settings serve both networks of a pair (the config refuses a pair whose anchors differ)."""

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


def detection_loss_for(cfg: RunConfig, out: HeadOutputs, anchors: Tensor, labels: BatchLabels,
                       gt_boxes: list[Tensor]) -> dict[str, Tensor]:
    """PAA's detection loss of a network's outputs on hard labels, weighted as the run's `loss` section says."""
    lc = cfg.loss
    return detection_loss(out.cls_logits, out.box_deltas, out.iou_logits, anchors, labels, gt_boxes,
                          cls_weight=lc.cls_weight, box_weight=lc.box_weight, iou_weight=lc.iou_weight,
                          box_iou_weighted=lc.box_iou_weighted)


class Precision:
    """Mixed precision of one process (`train.amp`, `train.amp_dtype`): forwards run under autocast and return
    float32 outputs (`forward`), so candidate losses, the GMM and the loss reductions stay float32; in fp16 the
    loss is scaled and the optimizer step skipped on overflow (`GradScaler`). Off, every call is the plain float32
    one, bit for bit. With `train.channels_last` the images enter the networks in NHWC (`memory_format`)."""

    def __init__(self, cfg: RunConfig, device: torch.device | str):
        device = torch.device(device)
        self.memory_format = memory_format(cfg)
        self.dtype: Optional[torch.dtype] = None
        if cfg.train.amp:
            name = cfg.train.amp_dtype
            if name == "auto":
                name = "fp16" if device.type == "cuda" else "bf16"
            if name == "fp16" and device.type != "cuda":
                raise ConfigError(f"train.amp_dtype is fp16 but this process trains on {device.type}: fp16 needs a "
                                  "CUDA device; use train.amp_dtype=bf16 (or auto)")
            self.dtype = torch.float16 if name == "fp16" else torch.bfloat16
        self.device_type = device.type
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)

    def forward(self, network, images: Tensor) -> HeadOutputs:
        images = images.contiguous(memory_format=self.memory_format)
        if self.dtype is None:
            return network(images)
        with torch.autocast(self.device_type, dtype=self.dtype):
            out = network(images)
        return out.float()

    def step(self, optimizer, total: Tensor, clip: float) -> None:
        """Backward (scaled in fp16), clip the unscaled gradients (`clip` > 0), optimizer step."""
        self.scaler.scale(total).backward()
        if clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params_with_grad(optimizer), clip)
        self.scaler.step(optimizer)
        self.scaler.update()

    def state(self) -> dict:
        """What a checkpoint keeps of it: the fp16 loss scale, so a resumed run skips no step the uninterrupted
        one took ({} without a scaler)."""
        return {"scaler": self.scaler.state_dict()} if self.scaler.is_enabled() else {}

    def load_state(self, state: dict) -> None:
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])


def params_with_grad(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The optimizer's parameters that have a gradient this step (those a clip and a norm count)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


class Optimised:
    """What an engine keeps beside its networks (`networks()`): the optimizer and its schedule, mixed precision, the
    step count, the anchors, and whether every loss so far was finite (a flag kept on the device, so a step never
    waits for it). Both engines save and resume through `state`/`load_state`."""

    cfg: RunConfig

    def networks(self) -> dict[str, PAADetector]:
        raise NotImplementedError

    def _optimise(self, params: Iterable[Tensor], device: torch.device | str, total_steps: int) -> None:
        self.device = torch.device(device)
        self.optimizer, self.scheduler = make_optimizer(params, self.cfg, total_steps)
        self.precision = Precision(self.cfg, self.device)
        self.step_count = 0
        self.lr = self.optimizer.param_groups[0]["lr"]  # the learning rate of the step taken last (its metrics')
        self.anchors = AnchorCache(self.cfg, self.device)  # level sizes -> (anchors, anchors per level)
        self._finite = torch.ones((), dtype=torch.bool, device=self.device)

    def _scheduled(self) -> None:
        """After the optimizer step: keep its learning rate, advance the schedule to the next step's."""
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.step_count += 1

    def losses_finite(self) -> bool:
        """Whether every step's loss so far was finite (one read of the flag the steps keep on the device)."""
        return bool(self._finite)

    def state(self, **extra) -> dict:
        return {"models": {k: m.state_dict() for k, m in self.networks().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "step": self.step_count, **extra, **self.precision.state()}

    def load_state(self, state: dict) -> None:
        for k, m in self.networks().items():
            m.load_state_dict(state["models"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step_count = int(state["step"])
        self.precision.load_state(state)

"""The PAA detector: torchvision ResNet + FPN, and a head with classification, box and IoU branches.

Anchors are one per location (octave base scale 8); outputs are flattened level after level, finest stride first,
row-major within a level, which is the anchor order of `trainer.anchors.make_anchors` and the assignment contract.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from schemas.config import ModelConfig
from schemas.storage import Location

RESNETS = {18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50, 101: resnet.resnet101}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelNormalise(nn.Module):
    """uint8 (or float 0-255) pixels to ImageNet-normalised floats: the one definition a backbone's weights are
    made with (`lad pretrain`) and used with (the detector)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean) / self.std


@dataclass
class HeadOutputs:
    """Raw network outputs for a batch: cls logits [B,A,C], box deltas [B,A,4], IoU logits [B,A]."""
    cls_logits: Tensor
    box_deltas: Tensor
    iou_logits: Tensor
    level_sizes: list[tuple[int, int]]

    def detach(self) -> "HeadOutputs":
        return HeadOutputs(self.cls_logits.detach(), self.box_deltas.detach(), self.iou_logits.detach(),
                           self.level_sizes)

    def float(self) -> "HeadOutputs":
        """float32 outputs (after an autocast forward), so assignment and losses never run in half precision."""
        return HeadOutputs(self.cls_logits.float(), self.box_deltas.float(), self.iou_logits.float(),
                           self.level_sizes)


class Scale(nn.Module):
    """A learnable scalar per level, so one shared box branch can serve every stride."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(in_ch: int, ch: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(in_ch if i == 0 else ch, ch, 3, padding=1), nn.GroupNorm(min(32, ch), ch),
                   nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class PAAHead(nn.Module):
    """Shared over levels: a classification tower, and a regression tower feeding both box and IoU outputs."""

    def __init__(self, in_channels: int, num_classes: int, num_levels: int, convs: int, channels: int,
                 prior_prob: float = 0.01):
        super().__init__()
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, channels, convs)
        self.reg_tower = _tower(in_channels, channels, convs)
        out_ch = channels if convs > 0 else in_channels
        self.cls_logits = nn.Conv2d(out_ch, num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(out_ch, 4, 3, padding=1)
        self.iou_logits = nn.Conv2d(out_ch, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in range(num_levels))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: list[Tensor]) -> HeadOutputs:
        cls_out, box_out, iou_out = [], [], []
        sizes = [tuple(f.shape[-2:]) for f in features]
        for feat, scale in zip(features, self.scales):
            b = feat.shape[0]
            cls_feat, reg_feat = self.cls_tower(feat), self.reg_tower(feat)
            cls_out.append(self.cls_logits(cls_feat).permute(0, 2, 3, 1).reshape(b, -1, self.num_classes))
            box_out.append(scale(self.box_deltas(reg_feat)).permute(0, 2, 3, 1).reshape(b, -1, 4))
            iou_out.append(self.iou_logits(reg_feat).permute(0, 2, 3, 1).reshape(b, -1))
        return HeadOutputs(torch.cat(cls_out, 1), torch.cat(box_out, 1), torch.cat(iou_out, 1), sizes)


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """ResNet (from scratch, or a local torchvision state dict) + torchvision FPN over the configured levels."""
    norm_layer = {"bn": nn.BatchNorm2d, "frozen_bn": FrozenBatchNorm2d,
                  "gn": lambda c: nn.GroupNorm(32, c)}[cfg.norm]
    body = RESNETS[cfg.depth](weights=None, norm_layer=norm_layer)
    if cfg.pretrained:
        from trainer.checkpoint import CheckpointError
        try:
            where = Location(cfg.pretrained)
            source = io.BytesIO(where.read_bytes()) if where.remote else where.local
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:  # missing, truncated or not a torch file: torch raises several types
            raise CheckpointError(f"model.pretrained {cfg.pretrained}: unreadable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else 'no message'})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else None
        if state is None:
            raise CheckpointError(f"model.pretrained {cfg.pretrained}: not a state dict")
        ignored = lambda k: k.startswith("fc.") or k.endswith("num_batches_tracked")  # noqa: E731 (frozen BN has none)
        mine = {k: v.shape for k, v in body.state_dict().items() if not ignored(k)}
        theirs = {k: getattr(v, "shape", None) for k, v in state.items() if not ignored(k)}
        # strict, but for the classifier: another depth's file (R34 keys are a superset of R18's) is refused
        wrong = [f"{k} is {list(theirs[k] or [])}, not {list(mine[k])}" for k in mine
                 if k in theirs and theirs[k] != mine[k]] + \
                [f"missing {k}" for k in mine if k not in theirs] + \
                [f"unexpected {k}" for k in theirs if k not in mine]
        if wrong:
            raise CheckpointError(f"model.pretrained {cfg.pretrained}: not ResNet-{cfg.depth} weights "
                                  f"({len(wrong)} differences, e.g. {'; '.join(wrong[:2])})")
        body.load_state_dict({k: v for k, v in state.items() if not ignored(k)}, strict=False)
    c_levels = [lv for lv in cfg.fpn_levels if lv <= 5]
    channels = [body.inplanes // 8 * 2 ** (lv - 2) for lv in c_levels]  # C2..C5 widths for either block type
    return_layers = {f"layer{lv - 1}": str(i) for i, lv in enumerate(c_levels)}
    extra = LastLevelP6P7(cfg.fpn_channels, cfg.fpn_channels) if cfg.fpn_levels[-1] > 5 else None
    return BackboneWithFPN(body, return_layers, channels, cfg.fpn_channels, extra_blocks=extra)


def frozen_stages(body: nn.Module, stages: int) -> list[nn.Module]:
    """The ResNet parts `model.frozen_stages` freezes, as MMDetection's ResNet: -1 none, 0 the stem (conv1, bn1),
    N the stem and layer1..layerN."""
    return [] if stages < 0 else [body.conv1, body.bn1] + [getattr(body, f"layer{i}") for i in range(1, stages + 1)]


class PAADetector(nn.Module):
    """Takes uint8 (or float 0-255) images [B,3,S,S], normalises them itself, returns `HeadOutputs`.

    With `frozen_stages` the frozen parts take no gradient and stay in eval mode; with `norm_eval` every backbone
    BatchNorm stays in eval mode, so its running statistics are the pretrained ones (affine weights still train
    unless frozen). `train()` keeps both, whoever calls it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self._frozen = frozen_stages(self.backbone.body, cfg.frozen_stages)
        for part in self._frozen:
            part.requires_grad_(False)
        self.head = PAAHead(cfg.fpn_channels, cfg.num_classes, len(cfg.fpn_levels), cfg.head_convs,
                            cfg.head_channels)
        self.normalise = PixelNormalise()

    def train(self, mode: bool = True) -> "PAADetector":
        super().train(mode)
        if mode:
            for part in self._frozen:
                part.eval()
            if self.cfg.norm_eval:
                for m in self.backbone.body.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        feats = self.backbone(self.normalise(images)).values()
        return list(feats)[: len(self.cfg.fpn_levels)]  # P6/P7 come in pairs; drop an unasked P7

    def forward(self, images: Tensor) -> HeadOutputs:
        return self.head(self.features(images))


def build_model(cfg: ModelConfig) -> PAADetector:
    return PAADetector(cfg).train()

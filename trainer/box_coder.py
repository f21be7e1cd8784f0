"""The standard delta box coder (weights 10, 10, 5, 5 = stds 0.1, 0.1, 0.2, 0.2; log(1000/16) clamp).

Thin wrappers over torchvision's `BoxCoder`, so the trainer, the assigner and the losses share one coder.
"""
from __future__ import annotations

import math

from torch import Tensor
from torchvision.models.detection._utils import BoxCoder

BOX_CODER = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000.0 / 16))


def encode(anchors: Tensor, gt: Tensor) -> Tensor:
    """Regression targets `[N, 4]` that move each anchor onto its GT box."""
    return BOX_CODER.encode_single(gt, anchors)


def decode(anchors: Tensor, deltas: Tensor) -> Tensor:
    """Boxes (xyxy) from deltas; any leading shape `[..., 4]`, anchors broadcast to the deltas' shape."""
    shape = deltas.shape
    anchors = anchors.expand(shape).reshape(-1, 4)
    return BOX_CODER.decode_single(deltas.reshape(-1, 4), anchors).reshape(shape)

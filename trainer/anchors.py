"""Anchors in the layout the assignment contract fixes: one square anchor per location, level after level.

Anchor (y, x) of a level with stride s is centred on (x*s, y*s) (no half-pixel offset, as MMDetection's
`AnchorGenerator` with `center_offset=0`) and has side `octave_base_scale * s`. Levels are concatenated finest
stride first, each in row-major order, so an anchor's index is `level_offset + y * W + x`.
"""
from __future__ import annotations

import torch
from torch import Tensor


def feature_sizes_for(input_size: int | tuple[int, int], strides: list[int]) -> list[tuple[int, int]]:
    """The (H, W) of each pyramid level that a ResNet + FPN (+ P6/P7) yields for an input of this size.

    Every stride-2 layer of that network (the 7x7 stem conv, the max-pool, the stride-2 3x3 and 1x1 convs and
    the P6/P7 convs) maps n to floor((n + 1) / 2) = ceil(n / 2); nested ceilings of halves equal ceil(n / s), for
    the powers of two that strides are (`ModelConfig.strides`: 2 ** level).
    """
    height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    return [(-(-height // s), -(-width // s)) for s in strides]


def make_anchors(feature_sizes: list[tuple[int, int]], strides: list[int], octave_base_scale: float = 8.0,
                 device=None, dtype=torch.float32) -> tuple[Tensor, list[int]]:
    """All anchors `[A, 4]` (xyxy pixels) of the pyramid, and how many belong to each level."""
    per_level, counts = [], []
    for (height, width), stride in zip(feature_sizes, strides, strict=True):  # one feature size per stride
        half = octave_base_scale * stride / 2
        ys = torch.arange(height, device=device, dtype=dtype) * stride
        xs = torch.arange(width, device=device, dtype=dtype) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # row-major: index = y * W + x
        cx, cy = cx.reshape(-1), cy.reshape(-1)
        per_level.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1))
        counts.append(height * width)
    return torch.cat(per_level), counts

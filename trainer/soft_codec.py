"""How the teacher's soft labels cross the stream in a few percent of an image's bytes (KD, SoLAD).

A teacher gives A x C class probabilities per image: 1.8 million at COCO size (80 classes, ~22k anchors), 7 MB as
fp32. Seen per class and pyramid level they are pictures: smooth maps (neighbouring anchors' logits correlate at
about 0.9 on P3) with peaks where the objects are. So they travel as one picture per image,

    soft_image   AVIF, 8-bit grey: for each class, every level's [H, W] map of asin(sqrt(p)), tiled into a mosaic

coded by AV1's intra coder (through Pillow) at `pipeline.soft_label_quality`. Two choices make it fit:
- asin(sqrt(p)) is the Bernoulli's variance-stabilising transform: a step in it costs about the same KL divergence
  anywhere in [0, 1], which is what the KD loss measures. Logits spend the 8 bits and the coder's error on the
  background, where the loss hardly feels them; probabilities on the peaks only.
- A lossy image coder places its error where the map is busy and spends almost nothing on flat background, which a
  dense quantiser or a sparse list cannot.
Quality 100 is lossless AV1, which leaves the 8-bit step alone: every probability within `MAX_STEP_ERROR` of the
teacher's. Measured against the dense loss in docs/results.md ("Soft labels as a picture"); why this form, this
transform and these encoder settings in docs/decisions.md (same title).

The KD box terms need the teacher's box only where it overlaps a GT (`SoftTargets`): those travel as anchor
index, fp16 deltas (decoded on the anchors in the loss) and 8-bit IoU-branch probability. The overlap that weighs
each entry is not sent: the student decodes the teacher's box from those deltas and measures it against its own
GT boxes, as the teacher did.
"""
from __future__ import annotations

import io
import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from schemas.assignment import PROB_STEP, AssignmentRow
from trainer.box_coder import decode
from trainer.losses import SoftTargets, largest_gt_iou

LEVEL_STEP = (math.pi / 2) / 255      # one grey level, in asin(sqrt(p)): 8 bits cover [0, pi/2]
MAX_STEP_ERROR = LEVEL_STEP / 2       # |dp / d asin(sqrt(p))| = sin(2 phi) <= 1: at most 0.0031 in probability
# libaom's speed preset: 8 encodes a COCO-sized teacher's picture 3 times faster than the default 6, for 6 % more
# bytes at the same quality (docs/decisions.md, "Soft labels as a picture")
ENCODER_SPEED = 8
# libaom's per-block quantiser adaptation (deltaq) spends bits where eyes look; nobody looks at these pictures.
# Without it the KD loss error is smaller at the same bytes (docs/decisions.md)
AOM_OPTIONS = {"deltaq-mode": "0"}


@lru_cache(maxsize=8)   # a few canvases recur (batches by orientation); 15 MB each at COCO size and 80 classes
def mosaic_layout(level_sizes: tuple[tuple[int, int], ...], num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each (anchor, class) entry sits in the mosaic. A class's block is its finest level's map, with the
    coarser levels side by side beneath it; blocks fill a grid of about square shape, row by row (`_columns`).
    Gaps are filled by repeating the nearest edge, so the coder sees no artificial edges.

    Returns (`source` [H, W]: the flat entry, anchor * C + class, each mosaic pixel shows; `target` [A * C]: the
    flat mosaic pixel each entry is read back from)."""
    starts = np.cumsum([0] + [h * w for h, w in level_sizes])

    def grid(level: int, cls: int) -> np.ndarray:
        h, w = level_sizes[level]
        return (starts[level] + np.arange(h * w)).reshape(h, w) * num_classes + cls

    def pad(a: np.ndarray, height: int, width: int, fill: bool) -> np.ndarray:
        widths = ((0, height - a.shape[0]), (0, width - a.shape[1]))
        return np.pad(a, widths, mode="edge") if fill else np.pad(a, widths, constant_values=-1)

    (h0, w0), rest = level_sizes[0], level_sizes[1:]
    band_h = max((h for h, _ in rest), default=0)
    block_w = max(w0, sum(w for _, w in rest))
    cols = _columns(num_classes, (h0 + band_h) / block_w)

    def block(cls: int, fill: bool) -> np.ndarray:
        top = pad(grid(0, cls), h0, block_w, fill)
        if not rest:
            return top
        band = np.concatenate([pad(grid(lv, cls), band_h, w, fill) for lv, (_, w) in enumerate(rest, 1)], 1)
        return np.concatenate([top, pad(band, band_h, block_w, fill)], 0)

    def mosaic(fill: bool) -> np.ndarray:
        rows = [np.concatenate([block(c, fill) for c in range(r, min(r + cols, num_classes))], 1)
                for r in range(0, num_classes, cols)]
        return np.concatenate([pad(row, row.shape[0], cols * block_w, fill) for row in rows], 0)

    source, placed = mosaic(True).astype(np.int32), mosaic(False).reshape(-1)
    target = np.empty(int(starts[-1]) * num_classes, np.int32)
    target[placed[placed >= 0]] = np.flatnonzero(placed >= 0)
    source.setflags(write=False)   # cached and shared by every caller
    target.setflags(write=False)
    return source, target


def _columns(num_classes: int, block_aspect: float) -> int:
    """Blocks per mosaic row: a divisor of the class count (no empty slots) within 2x of a square mosaic, or
    else the nearest square grid, with its last row's gap filled."""
    square = math.sqrt(num_classes * block_aspect)
    cols = min((d for d in range(1, num_classes + 1) if num_classes % d == 0), key=lambda d: abs(math.log(d / square)))
    return cols if abs(math.log(cols / square)) <= math.log(2) else max(1, min(num_classes, round(square)))


def grey_levels(prob: Tensor) -> Tensor:
    """Probabilities -> uint8 steps of asin(sqrt(p))."""
    return torch.round(torch.asin(prob.float().clamp(0, 1).sqrt()) / LEVEL_STEP).to(torch.uint8)


def from_grey_levels(levels: Tensor) -> Tensor:
    """`grey_levels`' inverse, to float32 probabilities."""
    return torch.sin(levels.float() * LEVEL_STEP).square()


def encode_soft(soft: SoftTargets, level_sizes: Sequence[tuple[int, int]], quality: int) -> list[dict]:
    """`SoftTargets` of a batch -> per image, the stream's soft columns (`schemas.assignment.AssignmentRow`)."""
    levels = tuple((int(h), int(w)) for h, w in level_sizes)
    n, num_anchors, num_classes = soft.cls_prob.shape
    held = sum(h * w for h, w in levels)
    if held != num_anchors:
        raise ValueError(f"soft labels for {num_anchors} anchors, but the levels {list(levels)} hold {held}")
    source, _ = mosaic_layout(levels, num_classes)
    grey = grey_levels(soft.cls_prob.detach()).reshape(n, num_anchors * num_classes).cpu().numpy()
    b_idx = soft.batch_idx.cpu().numpy()
    bounds = np.searchsorted(b_idx, np.arange(n + 1))   # batch_idx is sorted (nonzero of [B, A])
    a_idx = soft.anchor_idx.cpu().numpy().astype(np.int32)
    deltas = soft.deltas.detach().half().cpu().numpy()
    iou = quantise_prob(soft.iou_prob.detach()).cpu().numpy()
    options = dict(quality=int(quality), speed=ENCODER_SPEED, codec="aom", advanced=AOM_OPTIONS,
                   max_threads=torch.get_num_threads())   # the actor's CPU share, not the whole machine
    out = []
    for i in range(n):
        sink = io.BytesIO()
        Image.fromarray(grey[i][source], "L").save(sink, format="AVIF", **options)
        s, e = bounds[i], bounds[i + 1]
        out.append(dict(soft_image=sink.getvalue(), kd_anchor=a_idx[s:e], kd_delta=deltas[s:e], kd_iou_prob=iou[s:e]))
    return out


def quantise_prob(p: Tensor) -> Tensor:
    """Probabilities -> uint8 in steps of PROB_STEP (the nearest step)."""
    return torch.round(p.float().clamp(0, 1) / PROB_STEP).to(torch.uint8)


def _prob(q: np.ndarray, device) -> Tensor:
    """Sent probabilities -> float32: uint8 in PROB_STEP (what `encode_soft` sends), or float16 as they are."""
    p = torch.as_tensor(q, device=device).float()
    return p * PROB_STEP if q.dtype == np.uint8 else p


def _grey_mosaic(row: AssignmentRow, shape: tuple[int, int]) -> np.ndarray:
    """A row's soft_image as uint8 [H, W], or a ValueError naming the image and what is wrong (the size is checked
    from the header, before anything is decoded)."""
    try:
        with Image.open(io.BytesIO(memoryview(row.soft_image)), formats=("AVIF",)) as im:
            if im.mode != "L" or im.size != (shape[1], shape[0]):
                raise ValueError(f"image {row.image_id}: soft_image is a {im.size[0]}x{im.size[1]} {im.mode} image, "
                                 f"expected a {shape[1]}x{shape[0]} grey mosaic for this batch's anchors and classes")
            im.load()
            return np.asarray(im)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {row.image_id}: soft_image is not a readable AVIF picture ({e})") from None


def decode_soft(rows: list[AssignmentRow], anchors: Tensor, level_sizes: Sequence[tuple[int, int]],
                num_classes: int, device: torch.device | str = "cpu") -> SoftTargets:
    """Decoded stream rows -> `SoftTargets` on the device: the teacher's class probabilities as the picture
    gives them back, and each box entry weighed by its teacher box's IoU with the row's GT boxes (`anchors`: the
    batch's [A, 4] on `device`)."""
    levels = tuple((int(h), int(w)) for h, w in level_sizes)
    num_anchors = sum(h * w for h, w in levels)
    source, target = mosaic_layout(levels, num_classes)
    grey = np.stack([_grey_mosaic(r, source.shape).reshape(-1)[target] for r in rows]) if rows else \
        np.zeros((0, num_anchors * num_classes), np.uint8)
    cls_prob = from_grey_levels(torch.as_tensor(grey, device=device)).reshape(len(rows), num_anchors, num_classes)
    k = [int(r.kd_anchor.size) for r in rows]
    batch_idx = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                        torch.tensor(k, dtype=torch.long, device=device))

    def cat(name: str, width: Optional[int] = None) -> Tensor:
        parts = [torch.as_tensor(getattr(r, name), device=device) for r in rows]
        out = torch.cat(parts) if parts else torch.zeros(0, device=device)
        return out.reshape(-1, width) if width else out

    anchor_idx, deltas = cat("kd_anchor").long(), cat("kd_delta", 4).float()
    iou_prob = torch.cat([_prob(r.kd_iou_prob, device) for r in rows]) if rows else torch.zeros(0, device=device)
    return SoftTargets(cls_prob, batch_idx, anchor_idx, deltas, iou_prob,
                       _overlaps(rows, decode(anchors[anchor_idx], deltas), k, device))


def _overlaps(rows: list[AssignmentRow], teacher_boxes: Tensor, counts: list[int], device) -> Tensor:
    """Each box entry's largest IoU with a GT of its image (what `losses.soft_targets` gave the teacher)."""
    out = [largest_gt_iou(boxes, torch.as_tensor(r.gt_boxes, device=device).reshape(-1, 4).float())
           for r, boxes in zip(rows, teacher_boxes.split(counts))]
    return torch.cat(out) if out else teacher_boxes.new_zeros(0)

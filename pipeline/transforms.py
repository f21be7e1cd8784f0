"""Resize (square letterbox or keep-ratio), horizontal flip and batch padding, with the box arithmetic that keeps
boxes on the same pixels.

Why so little augmentation, and why it is all explicit: an assigner (teacher) and a trainer (student) may
process the same image in different processes. If the augmentation is a pure function of
(image id, epoch, seed), either side can re-apply it exactly from those few integers instead of shipping
pixels; `aug_params_for` is that function, and `AugParams` is everything needed to map boxes either way.

Geometry (`data.input_size`):
- a single number S: scale = S / max(h, w), and every batch is padded to the square S x S (the letterbox);
- a pair (long, short), e.g. (1333, 800) as every COCO recipe: scale = min(long / max(h, w), short / min(h, w))
  (MMDetection's `Resize(keep_ratio=True)`), and each batch is padded only to its largest image, rounded up to
  a multiple of `PAD_DIVISOR` (32): about half the pixels of a square canvas for COCO's 4:3 photos.
The image is resized to (round(w*scale), round(h*scale)) with PIL bilinear and flipped if asked (in the resized
frame); padding goes at the bottom/right, which never moves the origin, so boxes need only scale and flip.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from schemas.config import PAD_DIVISOR

InputSize = Union[int, Sequence[int]]


class AugParams(NamedTuple):
    """Everything that defines one image's augmentation, and maps its boxes both ways."""

    scale: float
    flip: bool
    resized_w: int
    resized_h: int


def _long_short(input_size: InputSize) -> tuple[int, int]:
    long, short = (input_size, input_size) if isinstance(input_size, (int, np.integer)) else input_size
    return int(long), int(short)


def aug_params(width: int, height: int, input_size: InputSize, flip: bool) -> AugParams:
    """The resize geometry of a (width x height) image at `input_size` (a square side, or (long, short))."""
    long, short = _long_short(input_size)
    scale = min(long / max(width, height), short / min(width, height))
    resized_w = min(long, max(1, int(width * scale + 0.5)))
    resized_h = min(long, max(1, int(height * scale + 0.5)))
    return AugParams(scale, bool(flip), resized_w, resized_h)


def canvas_shape(sizes: Sequence[tuple[int, int]], input_size: InputSize) -> tuple[int, int]:
    """(H, W) of the padded batch holding images of these resized (h, w): S x S for a square input size, else
    the largest h and w of the batch rounded up to a multiple of PAD_DIVISOR."""
    if isinstance(input_size, (int, np.integer)):
        return int(input_size), int(input_size)
    if not sizes:
        raise ValueError("canvas_shape: a batch needs at least one image")
    height, width = (math.ceil(max(side) / PAD_DIVISOR) * PAD_DIVISOR for side in zip(*sizes))
    return height, width


def idle_canvas(input_size: InputSize) -> tuple[int, int]:
    """The canvas of the blank batch an idle worker steps on (its gradients are discarded; any shape the network
    takes would do, this one is cheap and never degenerate)."""
    long, short = _long_short(input_size)
    side = math.ceil(short / PAD_DIVISOR) * PAD_DIVISOR if long != short else short
    return side, side


def aug_params_for(image_id: int, epoch: int, seed: int, flip_prob: float) -> bool:
    """Whether to flip this image this epoch: a counter-based hash, so any process gets the same answer."""
    if flip_prob <= 0:
        return False
    if flip_prob >= 1:
        return True
    if min(image_id, epoch, seed) < 0:
        raise ValueError(f"image_id, epoch and seed must be >= 0, got {image_id}, {epoch}, {seed}")
    return bool(np.random.default_rng([seed, epoch, image_id]).random() < flip_prob)


def flip_boxes(boxes, width: float):
    """Mirror xyxy boxes in a frame `width` pixels wide: x1' = width - x2, x2' = width - x1."""
    out = boxes.copy() if hasattr(boxes, "copy") else boxes.clone()  # numpy or torch (.clone, not .copy)
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def boxes_to_resized(boxes, params: AugParams):
    """Original-image xyxy boxes -> the letterboxed frame (scaled, clipped to the resized image, flipped)."""
    out = boxes * params.scale
    out[..., 0::2] = out[..., 0::2].clip(0, params.resized_w)
    out[..., 1::2] = out[..., 1::2].clip(0, params.resized_h)
    return flip_boxes(out, params.resized_w) if params.flip else out


def boxes_to_original(boxes, scale: float, flip: bool, resized_w: int):
    """Letterboxed-frame xyxy boxes (e.g. predictions) -> original image pixels: unflip, then unscale."""
    return (flip_boxes(boxes, resized_w) if flip else boxes) / scale


def resize_image(image: np.ndarray, input_size: InputSize, flip: bool) -> tuple[np.ndarray, AugParams]:
    """Resize `image` (uint8 [H, W, 3]) for `input_size` and flip it if asked; no padding (that is per batch).
    Returns (image uint8 [h, w, 3], its geometry)."""
    height, width = image.shape[:2]
    params = aug_params(width, height, input_size, flip)
    resized = image
    if (params.resized_w, params.resized_h) != (width, height):
        resized = np.asarray(Image.fromarray(image).resize((params.resized_w, params.resized_h), Image.BILINEAR))
    if flip:
        resized = resized[:, ::-1]
    return np.ascontiguousarray(resized), params


def resize(image: np.ndarray, boxes: np.ndarray, input_size: InputSize,
           flip: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """`resize_image` and the boxes with it: (image uint8 [h, w, 3], boxes float32 [G, 4] xyxy, scale)."""
    out, params = resize_image(image, input_size, flip)
    out_boxes = boxes_to_resized(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), params)
    return out, out_boxes.astype(np.float32, copy=False), params.scale

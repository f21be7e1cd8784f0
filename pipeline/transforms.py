"""Letterbox resize and horizontal flip, with the box arithmetic that keeps boxes on the same pixels.

Why so little augmentation, and why it is all explicit: an assigner (teacher) and a trainer (student) may
process the same image in different processes. If the augmentation is a pure function of
(image id, epoch, seed), either side can re-apply it exactly from those few integers instead of shipping
pixels; `aug_params_for` is that function, and `AugParams` is everything needed to map boxes either way.

Geometry: scale = input_size / max(h, w); the image is resized to (round(w*scale), round(h*scale)) with
PIL bilinear, flipped if asked (in the resized frame), then padded with zeros at the bottom/right to a
square input_size. Padding at the bottom/right never moves the origin, so boxes need only scale and flip.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image


class AugParams(NamedTuple):
    """Everything that defines one image's augmentation, and maps its boxes both ways."""

    scale: float
    flip: bool
    resized_w: int
    resized_h: int


def aug_params(width: int, height: int, input_size: int, flip: bool) -> AugParams:
    """The letterbox geometry of a (width x height) image at `input_size`."""
    scale = input_size / max(width, height)
    resized_w = min(input_size, max(1, int(width * scale + 0.5)))
    resized_h = min(input_size, max(1, int(height * scale + 0.5)))
    return AugParams(scale, bool(flip), resized_w, resized_h)


def aug_params_for(image_id: int, epoch: int, seed: int, flip_prob: float) -> bool:
    """Whether to flip this image this epoch: a counter-based hash, so any process gets the same answer."""
    if flip_prob <= 0:
        return False
    if flip_prob >= 1:
        return True
    if min(image_id, epoch, seed) < 0:
        raise ValueError(f"image_id, epoch and seed must be >= 0, got {image_id}, {epoch}, {seed}")
    return bool(np.random.default_rng([seed, epoch, image_id]).random() < flip_prob)


def _copy(boxes):
    """A copy of numpy or torch boxes (torch tensors have .clone, not .copy)."""
    return boxes.copy() if hasattr(boxes, "copy") else boxes.clone()


def flip_boxes(boxes, width: float):
    """Mirror xyxy boxes in a frame `width` pixels wide: x1' = width - x2, x2' = width - x1."""
    out = _copy(boxes)
    out[..., 0] = width - boxes[..., 2]
    out[..., 2] = width - boxes[..., 0]
    return out


def boxes_to_resized(boxes, params: AugParams):
    """Original-image xyxy boxes -> the letterboxed frame (scaled, clipped to the resized image, flipped)."""
    out = _copy(boxes) * params.scale
    out[..., 0::2] = out[..., 0::2].clip(0, params.resized_w)
    out[..., 1::2] = out[..., 1::2].clip(0, params.resized_h)
    return flip_boxes(out, params.resized_w) if params.flip else out


def boxes_to_original(boxes, scale: float, flip: bool, resized_w: int):
    """Letterboxed-frame xyxy boxes (e.g. predictions) -> original image pixels: unflip, then unscale."""
    out = flip_boxes(boxes, resized_w) if flip else _copy(boxes)
    return out / scale


def letterbox(
    image: np.ndarray, boxes: np.ndarray, input_size: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, float]:
    """Resize `image` (uint8 [H, W, 3]) into a zero-padded square of side `input_size`, flipping if asked.

    Returns (image uint8 [S, S, 3], boxes float32 [G, 4] xyxy in the output frame, scale).
    """
    height, width = image.shape[:2]
    params = aug_params(width, height, input_size, flip)
    resized = image
    if (params.resized_w, params.resized_h) != (width, height):
        resized = np.asarray(Image.fromarray(image).resize((params.resized_w, params.resized_h), Image.BILINEAR))
    if flip:
        resized = resized[:, ::-1]
    out = np.zeros((input_size, input_size, 3), dtype=np.uint8)
    out[: params.resized_h, : params.resized_w] = resized
    out_boxes = boxes_to_resized(np.asarray(boxes, dtype=np.float32).reshape(-1, 4), params)
    return out, out_boxes.astype(np.float32, copy=False), params.scale

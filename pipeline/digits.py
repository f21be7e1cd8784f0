"""The built-in dataset: handwritten digits pasted onto textured color backgrounds, in COCO format.

Why this dataset: it ships with scikit-learn (no download), it is real handwriting (the 1797 8x8 scans of
`sklearn.datasets.load_digits`, 16 gray levels, 10 classes), and a detector trains on it in minutes, yet it
still has what makes label assignment matter: several objects per image at varied scales and aspect ratios,
some overlap, cluttered backgrounds, and a few images with no object at all.

Layout written under `out_dir`:
    images/train/000001.png ...     images/val/000001.png ...
    train.json, val.json            standard COCO "instances" files; `file_name` is relative to the
                                    JSON's folder (e.g. "images/train/000001.png"), which is the default
                                    `image_root` of `pipeline.coco.load_coco`.

Train and val are pasted from disjoint sets of source scans, so validation measures generalisation to
unseen handwriting. Generation is deterministic: the same arguments give the same bytes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tqdm import tqdm

CATEGORY_NAMES = [str(d) for d in range(10)]
INK_THRESHOLD = 0.1  # an upscaled pixel is "ink" when its intensity (0..1) reaches this
MAX_OVERLAP = 0.2  # intersection / smaller box area allowed between two pasted digits
VAL_SCAN_FRACTION = 0.2  # share of the source scans reserved for val (per class)
PLACEMENT_TRIES = 30
_SPLIT_CODES = {"train": 1, "val": 2}
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


@dataclass(frozen=True)
class PastedDigit:
    """One digit placed in an image: its COCO box [x, y, w, h] (integer pixels) and its ink alpha."""

    label: int
    bbox: tuple[int, int, int, int]
    alpha: np.ndarray  # float32 [h, w], intensity of the ink inside the box


def load_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 scans as float32 [N, 8, 8] in 0..1 (each scan's own maximum = 1) and labels int64 [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scans = digits.images.astype(np.float32)
    scans /= np.maximum(scans.max(axis=(1, 2), keepdims=True), 1e-6)
    return scans, digits.target.astype(np.int64)


def split_scans(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train/val scan indices, stratified per class so every digit occurs in both."""
    rng = np.random.default_rng([seed, 0])
    train, val = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        n_val = max(1, int(round(len(idx) * VAL_SCAN_FRACTION)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _upscale(plane: np.ndarray, width: int, height: int) -> np.ndarray:
    return np.asarray(Image.fromarray(plane).resize((width, height), Image.BILINEAR), dtype=np.float32)


def render_digit(scan: np.ndarray, width: int, height: int) -> np.ndarray:
    """Upscale an 8x8 scan to (height, width) with bilinear interpolation and crop it to its ink.

    The crop is what makes the annotation exact: every pixel at or above INK_THRESHOLD lies inside the
    returned array, and the array's first/last rows and columns each hold at least one such pixel.
    """
    big = _upscale(scan, width, height)
    ink = big >= INK_THRESHOLD
    rows = np.flatnonzero(ink.any(axis=1))
    cols = np.flatnonzero(ink.any(axis=0))
    return np.ascontiguousarray(big[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])


def make_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A textured color background float32 [height, width, 3] in 0..1: smooth noise, a gradient or stripes."""
    kind = rng.integers(3)
    base = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / height, xx / width
    if kind == 0:  # smooth noise: a coarse random grid, upscaled
        cells = int(rng.integers(2, 9))
        coarse = rng.uniform(-0.25, 0.25, size=(cells, cells, 3)).astype(np.float32)
        texture = np.stack([_upscale(coarse[..., c], width, height) for c in range(3)], axis=-1)
    elif kind == 1:  # linear gradient towards a second color
        angle = rng.uniform(0, 2 * np.pi)
        t = np.cos(angle) * xx + np.sin(angle) * yy
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        texture = t[..., None] * rng.uniform(-0.35, 0.35, size=3).astype(np.float32)
    else:  # sinusoidal stripes
        angle = rng.uniform(0, np.pi)
        periods = rng.uniform(2, 10)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * periods * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
        texture = wave[..., None] * rng.uniform(-0.2, 0.2, size=3).astype(np.float32)
    grain = rng.normal(0, rng.uniform(0.01, 0.04), size=(height, width, 3)).astype(np.float32)
    return np.clip(base + texture + grain, 0, 1)


def contrasting_tint(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random color dark on light backgrounds and light on dark ones, so every digit stays visible."""
    luminance = float(region.reshape(-1, 3).mean(axis=0) @ np.array([0.299, 0.587, 0.114]))
    if luminance > 0.5:
        return rng.uniform(0.0, 0.3, size=3).astype(np.float32)
    return rng.uniform(0.7, 1.0, size=3).astype(np.float32)


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area, for COCO [x, y, w, h] boxes."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    return iw * ih / min(a[2] * a[3], b[2] * b[3])


def _digit_shape(rng: np.random.Generator, shape: tuple[int, int], digit_size: tuple[int, int]) -> tuple[int, int]:
    """Width and height of the upscaled scan: a random side, stretched by an aspect jitter of 0.7-1.4."""
    side = rng.uniform(digit_size[0], digit_size[1])
    aspect = np.exp(rng.uniform(np.log(0.7), np.log(1.4)))  # width / height
    width = int(np.clip(round(side * np.sqrt(aspect)), 4, shape[0]))
    height = int(np.clip(round(side / np.sqrt(aspect)), 4, shape[1]))
    return width, height


def _place(rng: np.random.Generator, alpha: np.ndarray, shape: tuple[int, int],
           placed: list[PastedDigit]) -> tuple[int, int] | None:
    """A random top-left corner where the digit fits and overlaps earlier ones by at most MAX_OVERLAP."""
    h, w = alpha.shape
    for _ in range(PLACEMENT_TRIES):
        x = int(rng.integers(0, shape[0] - w + 1))
        y = int(rng.integers(0, shape[1] - h + 1))
        if all(_overlap((x, y, w, h), p.bbox) <= MAX_OVERLAP for p in placed):
            return x, y
    return None


def compose_image(rng: np.random.Generator, scans: np.ndarray, labels: np.ndarray, *, image_size: int | tuple[int, int],
                  num_digits: int, digit_size: tuple[int, int]) -> tuple[np.ndarray, list[PastedDigit]]:
    """One image (uint8 [H, W, 3]; `image_size` is S for a square or (W, H)) with up to `num_digits` digits drawn
    from `scans`, and what was pasted.

    Digits that find no place after PLACEMENT_TRIES are skipped (the first one always fits).
    """
    shape = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    canvas = make_background(rng, *shape)
    placed: list[PastedDigit] = []
    for _ in range(num_digits):
        k = int(rng.integers(len(scans)))
        width, height = _digit_shape(rng, shape, digit_size)
        alpha = render_digit(scans[k], width, height)
        corner = _place(rng, alpha, shape, placed)
        if corner is None:
            continue
        x, y = corner
        h, w = alpha.shape
        region = canvas[y : y + h, x : x + w]
        tint = contrasting_tint(rng, region)
        opacity = rng.uniform(0.85, 1.0)
        a = (alpha * opacity)[..., None]
        canvas[y : y + h, x : x + w] = region * (1 - a) + tint * a
        placed.append(PastedDigit(label=int(labels[k]), bbox=(x, y, w, h), alpha=alpha))
    return np.round(canvas * 255).astype(np.uint8), placed


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of one image: independent of every other image, so any image can be regenerated alone."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


def _negative_indices(seed: int, split: str, num_images: int, negative_fraction: float) -> set[int]:
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 2**32 - 1])
    count = int(round(num_images * negative_fraction))
    return set(rng.choice(num_images, size=count, replace=False).tolist()) if count else set()


def _write_split(out_dir: str, split: str, num_images: int, scans: np.ndarray, labels: np.ndarray, *,
                 shapes: list[tuple[int, int]], digits_per_image: tuple[int, int], digit_size: tuple[int, int],
                 negative_fraction: float, seed: int, bar: tqdm) -> dict:
    """Render and save one split's images; return its COCO dict."""
    image_dir = os.path.join(out_dir, "images", split)
    os.makedirs(image_dir, exist_ok=True)
    negatives = _negative_indices(seed, split, num_images, negative_fraction)
    images, annotations = [], []
    for index in range(num_images):
        rng = image_rng(seed, split, index)
        n = 0 if index in negatives else int(rng.integers(digits_per_image[0], digits_per_image[1] + 1))
        width, height = shapes[index % len(shapes)]
        image, pasted = compose_image(rng, scans, labels, image_size=(width, height), num_digits=n,
                                      digit_size=digit_size)
        image_id = index + 1
        name = f"{image_id:06d}.png"
        Image.fromarray(image).save(os.path.join(image_dir, name), format="PNG")
        images.append({"id": image_id, "file_name": f"images/{split}/{name}", "width": width, "height": height})
        for digit in pasted:
            x, y, w, h = digit.bbox
            annotations.append({"id": len(annotations) + 1,  # ids start at 1: pycocotools treats id 0 as "unmatched"
                                "image_id": image_id, "category_id": digit.label + 1, "bbox": [x, y, w, h],
                                "area": w * h, "iscrowd": 0})
        bar.update(1)
    _remove_stale_images(image_dir, keep={f"{i + 1:06d}.png" for i in range(num_images)})
    return {
        "info": {"description": "LAD digits: sklearn load_digits scans on textured backgrounds", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": d + 1, "name": name, "supercategory": "digit"} for d, name in enumerate(CATEGORY_NAMES)],
    }


def _remove_stale_images(image_dir: str, keep: set[str]) -> None:
    """Drop images a previous, larger generation left behind, so the folder matches the JSON."""
    for name in os.listdir(image_dir):
        if _IMAGE_NAME.match(name) and name not in keep:
            os.remove(os.path.join(image_dir, name))


def _write_json(path: str, data: dict) -> None:
    """Write atomically: a crash never leaves a JSON that points at half-written images."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
    os.replace(tmp, path)


def _check_args(shapes, num_train, num_val, digits_per_image, digit_size, negative_fraction) -> None:
    image_size = min(min(shape) for shape in shapes) if shapes else 0
    if image_size < 16:
        raise ValueError(f"image sides must be >= 16, got {shapes}")
    if num_train < 0 or num_val < 0:
        raise ValueError(f"num_train and num_val must be >= 0, got {num_train}, {num_val}")
    lo, hi = digits_per_image
    if not 1 <= lo <= hi:
        raise ValueError(f"digits_per_image must be (lo, hi) with 1 <= lo <= hi, got {digits_per_image}")
    lo, hi = digit_size
    if not 4 <= lo <= hi <= image_size:
        raise ValueError(f"digit_size must be (lo, hi) with 4 <= lo <= hi <= the shortest image side ({image_size}), "
                         f"got {digit_size}")
    if not 0.0 <= negative_fraction <= 1.0:
        raise ValueError(f"negative_fraction must be in [0, 1], got {negative_fraction}")


def make_digits(out_dir: str, *, image_size: int = 128, shapes: list[tuple[int, int]] | None = None,
                num_train: int = 1200, num_val: int = 200, digits_per_image: tuple[int, int] = (2, 5),
                digit_size: tuple[int, int] = (14, 44), negative_fraction: float = 0.03, seed: int = 0,
                progress: bool = True) -> dict:
    """Write the digits detection dataset under `out_dir`; return {"paths": ..., "counts": ...}.

    Images are `image_size` squares, or, with `shapes` (a list of (width, height)), image i has shape
    `shapes[i % len(shapes)]` (e.g. [(640, 480), (480, 640)] for COCO-like photos). `digit_size` is the range of
    the upscaled 8x8 scan's side in pixels (before the 0.7-1.4 aspect jitter and before cropping to the ink).
    `negative_fraction` of the images (rounded) have no digit. Same arguments, same bytes.
    """
    shapes = [tuple(int(v) for v in shape) for shape in shapes] if shapes else [(image_size, image_size)]
    _check_args(shapes, num_train, num_val, digits_per_image, digit_size, negative_fraction)
    os.makedirs(out_dir, exist_ok=True)
    scans, labels = load_scans()
    train_idx, val_idx = split_scans(labels, seed)
    sources = {"train": (num_train, train_idx), "val": (num_val, val_idx)}
    paths = {"root": out_dir, "images": os.path.join(out_dir, "images")}
    counts = {}
    with tqdm(total=num_train + num_val, desc="digits", unit="img", disable=not progress) as bar:
        for split, (num_images, idx) in sources.items():
            data = _write_split(out_dir, split, num_images, scans[idx], labels[idx], shapes=shapes,
                                digits_per_image=digits_per_image, digit_size=digit_size,
                                negative_fraction=negative_fraction, seed=seed, bar=bar)
            paths[split] = os.path.join(out_dir, f"{split}.json")
            _write_json(paths[split], data)
            counts[split] = {
                "images": len(data["images"]),
                "annotations": len(data["annotations"]),
                "negatives": len(data["images"]) - len({a["image_id"] for a in data["annotations"]}),
                "source_scans": len(idx),
            }
    return {"paths": paths, "counts": counts}

"""`lad predict`: a trained detector on one's own images.

The inputs (files, or folders searched recursively for images) are read once to check them: a file that is not
a readable image gets one line and is skipped. The rest become an image-info COCO file (`images.json`: ids,
paths, sizes, and the checkpoint's categories), which goes through the same batched inference as `lad eval`
(`pipeline.validate.predict`). Written to `--out`:

    images.json       the inputs as a COCO image file (with the categories)
    detections.json   COCO results: image_id, category_id (the checkpoint's ids), category_name, bbox, score
    <name>.jpg        each input with its boxes, labels and scores drawn

so that `COCO("images.json").loadRes("detections.json")` reads them back.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from PIL import Image, ImageDraw, UnidentifiedImageError

from pipeline.coco import load_coco
from pipeline.validate import predict
from schemas.config import RunConfig
from schemas.files import atomic_write_text
from trainer.checkpoint import checkpoint_network, load_checkpoint
from trainer.engine import pick_device
from trainer.network import AnchorCache

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4",
           "#469990"]


def gather_inputs(inputs: list[str]) -> list[Path]:
    """Files as given (any suffix: a non-image is reported, not silently dropped), folders' images recursively."""
    out: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(path)
    return out


def readable_images(paths: list[Path], warn: Callable[[str], None]) -> list[dict]:
    """COCO image entries of the paths PIL can decode; one `warn` line for each other path."""
    images = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.load()
                width, height = im.size
        except FileNotFoundError:
            warn(f"{path}: skipped, no such file")
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            warn(f"{path}: skipped, not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        images.append({"id": len(images) + 1, "file_name": str(path.resolve()), "width": width, "height": height})
    return images


def checkpoint_categories(ckpt: dict, num_classes: int) -> list[dict]:
    """The checkpoint's categories in class order; a checkpoint from before they were recorded gets 1..C."""
    cats = ckpt.get("categories")
    if cats:
        return [{"id": int(c["id"]), "name": str(c["name"])} for c in cats]
    return [{"id": i + 1, "name": f"class_{i + 1}"} for i in range(num_classes)]


def draw(image_path: str, dets: list[dict], names: dict[int, str], target: Path) -> None:
    """The image with each detection's box, name and score drawn, as JPEG."""
    with Image.open(image_path) as im:
        canvas = im.convert("RGB")
    pen = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 300))
    for d in sorted(dets, key=lambda d: d["score"]):
        x, y, w, h = d["bbox"]
        colour = COLOURS[d["category_id"] % len(COLOURS)]
        pen.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        label = f"{names[d['category_id']]} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x, y), label)
        lift = bottom - top + 2
        pen.rectangle([left, top - lift, right + 2, bottom - lift], fill=colour)
        pen.text((x + 1, y - lift), label, fill="white")
    canvas.save(target, quality=90)


def predict_images(checkpoint: str, inputs: list[str], out: str, *, score_thr: Optional[float] = None,
                   network: str = "a", device: str = "auto", batch_size: int = 8, progress: bool = True,
                   warn: Callable[[str], None] = print) -> dict:
    """Detections of `network` of `checkpoint` on the inputs, written to `out` (see the module). Returns a summary:
    {"images", "skipped", "detections", "out"}."""
    ckpt = load_checkpoint(checkpoint)
    cfg = RunConfig.model_validate(ckpt["config"])
    model = checkpoint_network(ckpt, checkpoint, network)
    paths = gather_inputs(inputs)
    images = readable_images(paths, warn)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    categories = checkpoint_categories(ckpt, cfg.model.num_classes)
    images_file = out_dir / "images.json"
    atomic_write_text(images_file, json.dumps({"images": images, "categories": categories}, indent=1))
    dets: list[dict] = []
    if images:
        dataset = load_coco(str(images_file), os.sep, images_only=True)
        dev = pick_device(device)
        inference = cfg.inference.model_copy(update={} if score_thr is None else {"score_thr": score_thr})
        dets = predict(model.to(dev), AnchorCache(cfg, dev), dataset, cfg.data.input_size, inference, dev,
                       batch_size=batch_size, progress=progress)
    names = {c["id"]: c["name"] for c in categories}
    for d in dets:
        d["category_name"] = names[d["category_id"]]
    atomic_write_text(out_dir / "detections.json", json.dumps(dets))
    by_image: dict[int, list[dict]] = {}
    for d in dets:
        by_image.setdefault(d["image_id"], []).append(d)
    used: set[str] = set()
    for im in images:
        stem = name = Path(im["file_name"]).stem
        while name in used:  # the same file name in two folders: a_2, a_3, ...
            name = f"{stem}_{len(used) + 1}" if name == stem else f"{name}_"
        used.add(name)
        draw(im["file_name"], by_image.get(im["id"], []), names, out_dir / f"{name}.jpg")
    return {"images": len(images), "skipped": len(paths) - len(images), "detections": len(dets), "out": str(out_dir)}

"""The stand-in for ImageNet weights: a ResNet classifier trained on object crops of a COCO dataset.

The paper's students and teachers start from ImageNet backbones; none can be downloaded here, and a user with
their own data may want the same regime for a domain ImageNet does not cover. `lad pretrain` cuts, per epoch, one
window around every object (at the image's own scale, so the network sees objects at the size the detector will,
shifted at random inside the window) and windows of background away from every object, and trains
`torchvision.models.resnet{depth}` to tell the categories and background apart. It saves the backbone as a
torchvision state dict without the classifier (`fc`), which `model.pretrained` loads, and FILE.json beside it with
the accuracy and how it was made. Images are normalised as the detector normalises them.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.coco import CocoDataset, ImageRecord, load_coco
from pipeline.dataset import load_image
from pipeline.errors import DatasetError
from schemas.config import ConfigError
from schemas.files import atomic_write, atomic_write_json
from trainer.checkpoint import CheckpointError
from trainer.engine import pick_device
from trainer.model import RESNETS, PixelNormalise

MARGIN = 1.25         # a window is at least this many times the object's longer side (then scaled to `window`)
JITTER = 0.125         # an object's centre is at most this fraction of the window's side off the window's centre
BACKGROUND_TRIES = 20  # random placements tried for a background window before the image gives none
CACHE_BYTES = 1 << 30  # decoded images kept between crops (crops are shuffled, so an image is wanted again soon)


@dataclass
class Crop:
    """A square region of an image (x0, y0, side in pixels) and its class (C means background)."""
    index: int
    x0: float
    y0: float
    side: float
    label: int


def _jittered_start(lo: float, hi: float, side: float, rng: np.random.Generator) -> float:
    """Where a window of `side` starts so that [lo, hi] sits near its centre (shifted by at most JITTER of the side)
    and whole inside it."""
    room = min((side - (hi - lo)) / 2, JITTER * side)
    return (lo + hi - side) / 2 + rng.uniform(-room, room)


def object_crops(record: ImageRecord, index: int, window: int, rng: np.random.Generator) -> list[Crop]:
    """One window per object: `window` pixels at the image's scale (or MARGIN times the object where it is
    larger), the object near its centre, as a classifier's training crops are."""
    crops = []
    for (x1, y1, x2, y2), label in zip(record.boxes.tolist(), record.labels.tolist()):
        side = max(float(window), MARGIN * max(x2 - x1, y2 - y1))
        crops.append(Crop(index, _jittered_start(x1, x2, side, rng), _jittered_start(y1, y2, side, rng), side,
                          int(label)))
    return crops


def background_crops(record: ImageRecord, index: int, sides: np.ndarray, count: int, background: int,
                     rng: np.random.Generator) -> list[Crop]:
    """Up to `count` windows that share at most a quarter of any object, and of themselves, with an object. Their
    sides are drawn from `sides` (the object windows'), and they overhang the image's edge by up to a quarter as
    object windows near an edge do: so that neither a size, a blur nor a black border gives the class away."""
    crops = []
    boxes = record.boxes
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for _ in range(count * BACKGROUND_TRIES):
        if len(crops) == count:
            break
        side = float(rng.choice(sides))
        x0 = rng.uniform(-side / 4, max(record.width - 3 * side / 4, -side / 4))
        y0 = rng.uniform(-side / 4, max(record.height - 3 * side / 4, -side / 4))
        if len(boxes):
            ix = np.clip(np.minimum(boxes[:, 2], x0 + side) - np.maximum(boxes[:, 0], x0), 0, None)
            iy = np.clip(np.minimum(boxes[:, 3], y0 + side) - np.maximum(boxes[:, 1], y0), 0, None)
            if np.any(ix * iy > 0.25 * np.minimum(area, side * side)):
                continue
        crops.append(Crop(index, x0, y0, side, background))
    return crops


def epoch_crops(data: CocoDataset, window: int, background_ratio: float, seed: int) -> list[Crop]:
    """Every object once and background windows in proportion, placed anew for each `seed` (an epoch)."""
    rng = np.random.default_rng(seed)
    objects = [object_crops(record, i, window, rng) for i, record in enumerate(data.records)]
    sides = np.array([c.side for crops in objects for c in crops] or [float(window)])
    per_image = background_ratio * data.report.boxes / max(len(data.records), 1)
    crops: list[Crop] = []
    for i, record in enumerate(data.records):
        count = int(per_image) + (rng.random() < per_image % 1)
        crops += objects[i] + background_crops(record, i, sides, count, data.num_classes, rng)
    return crops


class CropDataset(torch.utils.data.Dataset):
    """Crops as uint8 [3, window, window] (the image's edge padded with zeros) and labels."""

    def __init__(self, data: CocoDataset, crops: list[Crop], window: int):
        self.data, self.crops, self.window = data, crops, window
        self._cache: dict[int, Tensor] = {}
        self._cached_bytes = 0

    def image(self, index: int) -> Tensor:
        if index not in self._cache:
            if self._cached_bytes > CACHE_BYTES:
                self._cache.clear()
                self._cached_bytes = 0
            self._cache[index] = torch.from_numpy(load_image(self.data.records[index]).copy()).permute(2, 0, 1)
            self._cached_bytes += self._cache[index].numel()
        return self._cache[index]

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        c = self.crops[i]
        img = self.image(c.index)
        h, w = img.shape[-2:]
        x0, y0, side = int(round(c.x0)), int(round(c.y0)), int(round(c.side))
        patch = img[:, max(y0, 0):min(y0 + side, h), max(x0, 0):min(x0 + side, w)]
        canvas = torch.zeros((3, side, side), dtype=torch.uint8)
        canvas[:, max(-y0, 0):max(-y0, 0) + patch.shape[1], max(-x0, 0):max(-x0, 0) + patch.shape[2]] = patch
        if side != self.window:
            canvas = F.interpolate(canvas[None].float(), size=(self.window, self.window), mode="bilinear",
                                   align_corners=False, antialias=True)[0].round().clamp(0, 255).byte()
        return canvas, c.label


def accuracy(model: nn.Module, loader, device) -> float:
    model.eval()
    right = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            right += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
            total += len(labels)
    model.train()
    return right / max(total, 1)


def _resume_state(path: str, settings: dict) -> Optional[dict]:
    """What an interrupted pretraining of the same settings left (FILE.resume, written at every epoch's end)."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a torch file
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}); delete it to start the pretraining "
                              "afresh") from None
    if not isinstance(state, dict) or not {"settings", "model", "optimizer", "scheduler", "history"} <= state.keys():
        raise CheckpointError(f"{path}: not a pretraining's resume file; delete it to start the pretraining afresh")
    if state["settings"] != settings:
        changed = sorted(k for k in settings if state["settings"].get(k) != settings[k])
        raise CheckpointError(f"{path}: left by a pretraining with other settings ({', '.join(changed)}); run it "
                              "again with those, or delete the file to start afresh")
    return state


def pretrain(train_file: str, val_file: Optional[str], out: str, *, depth: int = 18, epochs: int = 6,
             batch_size: int = 128, lr: float = 0.1, weight_decay: float = 1e-4, window: int = 48,
             background_ratio: float = 0.5, seed: int = 0, device: str = "auto", threads: Optional[int] = None,
             num_workers: int = 0, progress: bool = True) -> dict:
    """Train and save; returns what FILE.json records. SGD with Nesterov momentum, a linear warm-up over the
    first tenth of the steps and a cosine decay to zero: a short, standard ImageNet-style schedule. Every epoch's
    end is kept in FILE.resume, so an interrupted pretraining goes on from there when run again."""
    for name, value, least in (("epochs", epochs, 1), ("batch_size", batch_size, 1), ("window", window, 16)):
        if value < least:
            raise DatasetError(f"{name} must be at least {least}, got {value}", field=name)
    if not lr > 0:
        raise DatasetError(f"lr must be positive, got {lr}", field="lr")
    for name, value in (("background_ratio", background_ratio), ("weight_decay", weight_decay)):
        if not value >= 0:
            raise DatasetError(f"{name} must be at least 0, got {value}", field=name)
    try:
        device = pick_device(device)
    except (ValueError, RuntimeError):
        raise ConfigError(f"--device {device}: not a device here; use auto, cpu, or cuda[:N] on a machine with "
                          "a GPU") from None
    train_data = load_coco(train_file)
    val_data = load_coco(val_file) if val_file else None
    names = [c["name"] for c in train_data.categories]
    if val_data is not None and [c["name"] for c in val_data.categories] != names:  # labels are indices
        raise DatasetError(f"its category names or their order differ from {train_file}'s ({names})", file=val_file,
                           field="categories", fix="measure accuracy on a split of the same dataset")
    if train_data.report.boxes == 0:
        raise DatasetError("no object boxes to cut crops from", file=train_file, field="annotations")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    num_classes = train_data.num_classes + 1  # + background
    net = RESNETS[depth](weights=None, num_classes=num_classes)
    model = nn.Sequential(PixelNormalise(), net).to(device)  # pixels as the detector's backbone will see them
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    val_loader = None
    if val_data is not None:
        val_set = CropDataset(val_data, epoch_crops(val_data, window, background_ratio, seed=10_000 + seed), window)
        val_loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size)
    plan = lambda epoch: epoch_crops(train_data, window, background_ratio, seed=seed * 1000 + epoch)  # noqa: E731
    # an epoch's crop count varies with its background windows: count every epoch's steps (geometry only, cheap)
    steps = [max(len(plan(epoch)) // batch_size, 1) for epoch in range(epochs)]
    total = sum(steps)
    warmup = max(1, total // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else
        0.5 * (1 + math.cos(math.pi * min(s - warmup, total - warmup) / max(total - warmup, 1))))
    where = lambda f: f if not f or "://" in f else os.path.abspath(f)  # noqa: E731 (one file, however named)
    settings = {"train": where(train_file), "val": where(val_file), "classes": names, "depth": depth, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "window": window,
                "background_ratio": background_ratio, "seed": seed}
    resume_file = f"{out}.resume"
    history, spent, start = [], 0.0, 0
    state = _resume_state(resume_file, settings)
    if state is not None:
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, spent, start = state["history"], state["wall_s"], len(state["history"])
    t0 = time.time() - spent
    bar = tqdm(total=total, initial=sum(steps[:start]), desc=f"pretrain R{depth}", unit="step",
               disable=not progress, dynamic_ncols=True)
    train_set = CropDataset(train_data, [], window)  # one dataset, so that its decoded images outlive an epoch
    for epoch in range(start, epochs):
        crops = train_set.crops = plan(epoch)
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size,
                                             sampler=torch.utils.data.RandomSampler(crops, generator=gen),
                                             drop_last=len(crops) >= batch_size, num_workers=num_workers)
        losses = []
        for images, labels in loader:
            loss = F.cross_entropy(model(images.to(device)), labels.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
            bar.update(1)
        row = {"epoch": epoch + 1, "loss": float(torch.stack(losses).mean()), "crops": len(crops)}
        if val_loader is not None:
            row["val_accuracy"] = accuracy(model, val_loader, device)
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row.get('val_accuracy', float('nan')):.3f}")
        if epoch + 1 < epochs:  # after the last, FILE itself is written; a crash before it repeats that epoch
            snapshot = {"settings": settings, "model": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "history": history, "wall_s": time.time() - t0}
            atomic_write(resume_file, lambda f: torch.save(snapshot, f))
    bar.close()
    backbone = {k: v.cpu() for k, v in net.state_dict().items() if not k.startswith("fc.")}
    atomic_write(out, lambda f: torch.save(backbone, f))
    info = {"weights": str(out), "depth": depth, "classes": names + ["background"],
            "train": str(train_file), "val": str(val_file) if val_file else None, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "window": window,
            "background_ratio": background_ratio, "seed": seed, "resumed_at_epoch": start, "history": history,
            "val_accuracy": history[-1].get("val_accuracy"), "wall_s": round(time.time() - t0, 1)}
    atomic_write_json(f"{out}.json", info)
    if os.path.exists(resume_file):
        os.unlink(resume_file)
    return info

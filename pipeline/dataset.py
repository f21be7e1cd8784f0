"""A torch Dataset over a loaded COCO file: decode, letterbox, flip (train only), as uint8 tensors.

Images stay uint8 until the model's device: 4x less to move through workers, queues and Arrow batches
than float32. The flip is a pure function of (image id, epoch, seed) (see `pipeline.transforms`), so a
sample can be reproduced anywhere from its id; call `set_epoch` before each epoch. With DataLoader workers,
the epoch reaches them when the loader's iterator is created, so call `set_epoch` before iterating
(persistent workers keep the epoch they started with).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.coco import CocoDataset, ImageRecord
from pipeline.errors import DatasetError
from pipeline.transforms import aug_params_for, letterbox


def load_image(record: ImageRecord) -> np.ndarray:
    """Decode a record's image to uint8 RGB [H, W, 3]; a missing, unreadable or wrongly sized file is a DatasetError."""
    try:
        with Image.open(record.path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(
            "image file not found", file=record.path, image_id=record.image_id, fix="restore the file or fix image_root"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"cannot decode the image ({type(e).__name__}: {e})",
            file=record.path,
            image_id=record.image_id,
            fix="re-export the image as PNG or JPEG, or remove it from the annotation file",
        ) from None
    height, width = rgb.shape[:2]
    if (width, height) != (record.width, record.height):
        raise DatasetError(
            f"image is {width}x{height} but the annotation file says {record.width}x{record.height}",
            file=record.path,
            image_id=record.image_id,
            field="width/height",
            fix="fix the image entry's width/height (an EXIF-rotated photo is a common cause)",
        )
    return rgb


class DetectionDataset(torch.utils.data.Dataset):
    """Samples of a CocoDataset as dicts: image uint8 [3, S, S], boxes float32 [G, 4] xyxy, labels int64 [G],
    image_id, scale, flip. `train=True` flips with probability `flip_prob`, decided by (image id, epoch, seed)."""

    def __init__(
        self, data: CocoDataset, input_size: int, *, train: bool, flip_prob: float = 0.5, seed: int = 0
    ) -> None:
        self.records = data.records
        self.input_size = int(input_size)
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def flip_of(self, index: int) -> bool:
        """Whether sample `index` is flipped this epoch (the same answer __getitem__ uses)."""
        if not self.train:
            return False
        return aug_params_for(self.records[index].image_id, self.epoch, self.seed, self.flip_prob)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        flip = self.flip_of(index)
        image, boxes, scale = letterbox(load_image(record), record.boxes, self.input_size, flip)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(record.labels.copy()),
            "image_id": int(record.image_id),
            "scale": float(scale),
            "flip": flip,
        }


def collate(samples: list[dict]) -> dict:
    """Stack images; keep per-image boxes/labels as lists (their lengths differ)."""
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": [s["boxes"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float64),
        "flips": torch.tensor([s["flip"] for s in samples], dtype=torch.bool),
    }

"""A torch Dataset over a loaded COCO file: decode, resize, flip (train only), as uint8 tensors; `collate` pads a
batch to its canvas (`pipeline.transforms.canvas_shape`).

Images stay uint8 until the model's device: 4x less to move through workers, queues and Arrow batches
than float32. The flip is a pure function of (image id, epoch, seed) (see `pipeline.transforms`), so a
sample can be reproduced anywhere from its id; call `set_epoch` before each epoch. With DataLoader workers,
the epoch reaches them when the loader's iterator is created, so call `set_epoch` before iterating
(persistent workers keep the epoch they started with).
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import torch
from PIL import Image

from pipeline.coco import CocoDataset, ImageRecord
from pipeline.errors import DatasetError
from pipeline.transforms import InputSize, aug_params_for, canvas_shape, resize
from schemas.storage import Location


def read_image_file(record: ImageRecord) -> bytes:
    """The record's encoded file, as stored: what the stream carries instead of pixels."""
    try:
        return Location(record.path).read_bytes()  # a local file, or an object fetched by this read task
    except FileNotFoundError:
        raise DatasetError("image file not found", file=record.path, image_id=record.image_id,
                           fix="restore the file or fix image_root") from None
    except OSError as e:
        raise DatasetError(f"cannot read the image ({e.strerror or e})", file=record.path, image_id=record.image_id,
                           fix="check the file's permissions and the storage it is on") from None


def _undecodable(e: Exception, image_id: int, path: Optional[str]) -> DatasetError:
    return DatasetError(f"cannot decode the image ({type(e).__name__}: {e})", file=path, image_id=image_id,
                        fix="re-export the image as PNG or JPEG, or remove it from the annotation file")


def _check_size(record: ImageRecord, width: int, height: int) -> None:
    if (width, height) != (record.width, record.height):
        raise DatasetError(f"image is {width}x{height} but the annotation file says {record.width}x{record.height}",
                           file=record.path, image_id=record.image_id, field="width/height",
                           fix="fix the image entry's width/height (an EXIF-rotated photo is a common cause)")


def check_image_header(record: ImageRecord, data: bytes) -> None:
    """Check the file's header (format and size) without decoding its pixels."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size = im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _undecodable(e, record.image_id, record.path) from None
    _check_size(record, *size)


def decode_bytes(data, image_id: int, path: Optional[str] = None) -> np.ndarray:
    """An encoded image file (bytes or any buffer) -> uint8 RGB [H, W, 3]."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _undecodable(e, image_id, path) from None


def load_image(record: ImageRecord) -> np.ndarray:
    """Decode a record's image to uint8 RGB [H, W, 3]; a missing, unreadable or wrongly sized file is a DatasetError."""
    rgb = decode_bytes(read_image_file(record), record.image_id, record.path)
    _check_size(record, rgb.shape[1], rgb.shape[0])
    return rgb


class DetectionDataset(torch.utils.data.Dataset):
    """Samples of a CocoDataset as dicts: image uint8 [3, h, w] (resized, not padded), boxes float32 [G, 4] xyxy,
    labels int64 [G], image_id, scale, flip. `train=True` flips with probability `flip_prob`, decided by (image id,
    epoch, seed). Batch them with `self.collate`, which pads to the batch's canvas."""

    def __init__(self, data: CocoDataset, input_size: InputSize, *, train: bool, flip_prob: float = 0.5,
                 seed: int = 0) -> None:
        self.records = data.records
        self.input_size = input_size
        self.train = bool(train)
        self.flip_prob = float(flip_prob)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        flip = self.train and aug_params_for(record.image_id, self.epoch, self.seed, self.flip_prob)
        image, boxes, scale = resize(load_image(record), record.boxes, self.input_size, flip)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(record.labels.copy()),
                "image_id": int(record.image_id), "scale": float(scale), "flip": flip}

    def collate(self, samples: list[dict]) -> dict:
        """Pad images to the batch's canvas; keep per-image boxes/labels as lists (their lengths differ)."""
        return {"images": pad_images([s["image"] for s in samples], self.input_size),
                "boxes": [s["boxes"] for s in samples], "labels": [s["labels"] for s in samples],
                "image_ids": torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
                "scales": torch.tensor([s["scale"] for s in samples], dtype=torch.float64),
                "flips": torch.tensor([s["flip"] for s in samples], dtype=torch.bool)}


def pad_images(images: list[torch.Tensor], input_size: InputSize) -> torch.Tensor:
    """uint8 [3, h, w] images -> one zero-padded uint8 [B, 3, H, W] batch on the batch's canvas."""
    height, width = canvas_shape([tuple(im.shape[1:]) for im in images], input_size)
    out = torch.zeros((len(images), images[0].shape[0], height, width), dtype=torch.uint8, device=images[0].device)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
    return out

"""Letterbox + flip keep boxes on the same pixels, the inverse maps back, and the Dataset applies them
per (image id, epoch, seed)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.coco import load_coco
from pipeline.dataset import DetectionDataset, collate
from pipeline.errors import DatasetError
from pipeline.transforms import aug_params, aug_params_for, boxes_to_original, letterbox


def _painted(height, width, box):
    image = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = 255
    return image


def _painted_box(image):
    """xyxy extent (pixel edges) of the pixels that are mostly paint."""
    mask = image[..., 0] > 127
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(
    "shape, box", [((50, 80), (10, 5, 30, 25)), ((90, 40), (3, 60, 37, 88)), ((64, 64), (0, 0, 9, 64))]
)
def test_boxes_stay_on_the_painted_pixels(shape, box, flip):
    image = _painted(*shape, box)
    out, boxes, scale = letterbox(image, np.array([box], dtype=np.float32), 64, flip)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and boxes.dtype == np.float32
    assert scale == 64 / max(shape)
    np.testing.assert_allclose(boxes[0], _painted_box(out), atol=1.0)
    params = aug_params(shape[1], shape[0], 64, flip)
    back = boxes_to_original(boxes, scale, flip, params.resized_w)
    np.testing.assert_allclose(back[0], box, atol=1e-4)


def test_padding_is_zero_at_bottom_right():
    image = np.full((30, 60, 3), 200, dtype=np.uint8)
    for flip in (False, True):
        out, _, scale = letterbox(image, np.zeros((0, 4), np.float32), 120, flip)
        assert scale == 2.0
        assert (out[:60] == 200).all() and (out[60:] == 0).all()


def test_inverse_works_on_torch_tensors():
    boxes = torch.tensor([[1.0, 2.0, 11.0, 12.0]])
    back = boxes_to_original(boxes, 0.5, True, 40)
    assert torch.allclose(back, torch.tensor([[58.0, 4.0, 78.0, 24.0]]))
    assert torch.equal(boxes, torch.tensor([[1.0, 2.0, 11.0, 12.0]]))  # input untouched


def test_flip_decision_is_a_pure_function_of_id_epoch_seed():
    flips = [aug_params_for(i, 0, 0, 0.5) for i in range(2000)]
    assert flips == [aug_params_for(i, 0, 0, 0.5) for i in range(2000)]
    assert 0.45 < np.mean(flips) < 0.55
    assert flips != [aug_params_for(i, 1, 0, 0.5) for i in range(2000)]
    assert flips != [aug_params_for(i, 0, 1, 0.5) for i in range(2000)]
    assert not any(aug_params_for(i, 0, 0, 0.0) for i in range(50))
    assert all(aug_params_for(i, 0, 0, 1.0) for i in range(50))


def _tiny_coco(tmp_path, sizes=((48, 32), (20, 60))):
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes, start=1):
        Image.fromarray(_painted(h, w, (2, 3, 12, 15))).save(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": [2, 3, 10, 12]})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}))
    return path


def test_dataset_samples_and_collate(tmp_path):
    data = load_coco(str(_tiny_coco(tmp_path)))
    train = DetectionDataset(data, 64, train=True, flip_prob=0.5, seed=3)
    for epoch in range(3):
        train.set_epoch(epoch)
        for i in range(len(train)):
            sample = train[i]
            assert sample["flip"] == aug_params_for(data.records[i].image_id, epoch, 3, 0.5)
            image = sample["image"]
            assert image.dtype == torch.uint8 and image.shape == (3, 64, 64)
            assert sample["boxes"].dtype == torch.float32 and sample["labels"].dtype == torch.int64
            painted = _painted_box(image.permute(1, 2, 0).numpy())
            np.testing.assert_allclose(sample["boxes"][0].numpy(), painted, atol=1.0)
    evaluation = DetectionDataset(data, 64, train=False, flip_prob=1.0)
    assert not any(evaluation[i]["flip"] for i in range(len(evaluation)))
    batch = collate([evaluation[0], evaluation[1]])
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert batch["image_ids"].tolist() == [1, 2] and batch["image_ids"].dtype == torch.int64
    assert batch["scales"].tolist() == [64 / 48, 64 / 60] and batch["flips"].tolist() == [False, False]
    assert len(batch["boxes"]) == len(batch["labels"]) == 2


def test_missing_or_broken_image_at_load_time(tmp_path):
    data = load_coco(str(_tiny_coco(tmp_path)))
    dataset = DetectionDataset(data, 64, train=False)
    (tmp_path / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"1\.png.*image id 1.*not found"):
        dataset[0]
    (tmp_path / "2.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"2\.png.*image id 2.*cannot decode"):
        dataset[1]


def test_wrong_size_in_json_is_reported(tmp_path):
    path = _tiny_coco(tmp_path)
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 47
    path.write_text(json.dumps(data))
    dataset = DetectionDataset(load_coco(str(path)), 64, train=False)
    with pytest.raises(DatasetError, match=r"1\.png.*48x32.*47x32"):
        dataset[0]

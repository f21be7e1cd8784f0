"""Letterbox or keep-ratio resize + flip keep boxes on the same pixels, the inverse maps back, batches pad to
their canvas, and the Dataset applies them per (image id, epoch, seed)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.coco import load_coco
from pipeline.dataset import DetectionDataset, pad_images
from pipeline.errors import DatasetError
from pipeline.transforms import aug_params, aug_params_for, boxes_to_original, canvas_shape, resize


def letterbox(image, boxes, input_size, flip):
    """`resize`, padded by the pipeline's own `pad_images` as a batch of one is (uint8 [H, W, 3] back)."""
    out, boxes, scale = resize(image, boxes, input_size, flip)
    padded = pad_images([torch.from_numpy(out).permute(2, 0, 1)], input_size)[0]
    return padded.permute(1, 2, 0).numpy(), boxes, scale


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


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shape, box", [((32, 48), (10, 5, 30, 25)), ((48, 32), (3, 20, 27, 44)),
                                        ((70, 50), (0, 0, 9, 70))])
def test_keep_ratio_boxes_stay_on_the_painted_pixels_and_map_back(shape, box, flip):
    """(long, short) = (96, 64): a landscape 48x32 fills 96x64, a portrait 32x48 fills 64x96 (no square)."""
    image = _painted(*shape, box)
    out, boxes, scale = resize(image, np.array([box], dtype=np.float32), (96, 64), flip)
    h, w = shape
    assert scale == min(96 / max(h, w), 64 / min(h, w))
    assert out.shape == (int(h * scale + 0.5), int(w * scale + 0.5), 3) and max(out.shape[:2]) <= 96
    np.testing.assert_allclose(boxes[0], _painted_box(out), atol=1.0)
    params = aug_params(w, h, (96, 64), flip)
    assert (params.resized_h, params.resized_w) == out.shape[:2]
    back = boxes_to_original(boxes, scale, flip, params.resized_w)
    np.testing.assert_allclose(back[0], box, atol=1e-4)


def test_coco_sizes_keep_ratio_and_canvas():
    """The COCO recipe's (1333, 800): 640x480 -> 1067x800, 480x640 -> 800x1067; a batch of both pads to 1088x1088
    (multiples of 32), one of landscapes only to 800x1088 (the square letterbox would be 1333x1333)."""
    land, port = aug_params(640, 480, (1333, 800), False), aug_params(480, 640, (1333, 800), False)
    assert (land.resized_w, land.resized_h) == (1067, 800) and (port.resized_w, port.resized_h) == (800, 1067)
    assert canvas_shape([(800, 1067), (1067, 800)], (1333, 800)) == (1088, 1088)
    assert canvas_shape([(800, 1067), (800, 1067)], (1333, 800)) == (800, 1088)
    assert canvas_shape([(800, 1067)], 1333) == (1333, 1333)
    big = aug_params(3000, 1000, (1333, 800), False)   # the long side binds
    assert (big.resized_w, big.resized_h) == (1333, 444)


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
            params = aug_params(data.records[i].width, data.records[i].height, 64, False)
            assert image.dtype == torch.uint8 and image.shape == (3, params.resized_h, params.resized_w)
            assert sample["boxes"].dtype == torch.float32 and sample["labels"].dtype == torch.int64
            painted = _painted_box(image.permute(1, 2, 0).numpy())
            np.testing.assert_allclose(sample["boxes"][0].numpy(), painted, atol=1.0)
    evaluation = DetectionDataset(data, 64, train=False, flip_prob=1.0)
    assert not any(evaluation[i]["flip"] for i in range(len(evaluation)))
    batch = evaluation.collate([evaluation[0], evaluation[1]])
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.uint8
    assert (batch["images"][0, :, 43:] == 0).all() and (batch["images"][1, :, :, 22:] == 0).all()  # padding
    keep = DetectionDataset(data, (64, 40), train=False)    # 48x32 -> 60x40, 20x60 -> 21x64
    samples = [keep[0], keep[1]]
    assert [tuple(s["image"].shape[1:]) for s in samples] == [(40, 60), (64, 21)]
    rect = keep.collate(samples)
    assert rect["images"].shape == (2, 3, 64, 64)          # max 64 x max 60, rounded up to 32s
    assert torch.equal(rect["images"][0, :, :40, :60], samples[0]["image"]) and (rect["images"][0, :, 40:] == 0).all()
    assert torch.equal(rect["images"][1, :, :, :21], samples[1]["image"]) and (rect["images"][1, :, :, 21:] == 0).all()
    assert batch["image_ids"].tolist() == [1, 2] and batch["image_ids"].dtype == torch.int64
    assert batch["scales"].tolist() == [64 / 48, 64 / 60] and batch["flips"].tolist() == [False, False]
    assert len(batch["boxes"]) == len(batch["labels"]) == 2


def test_missing_or_broken_image_at_load_time(tmp_path):
    data = load_coco(str(_tiny_coco(tmp_path)))
    dataset = DetectionDataset(data, 64, train=False)
    (tmp_path / "1.png").unlink()
    with pytest.raises(DatasetError, match=r"1\.png.*image id 1.*not found"):
        dataset[0]
    png = (tmp_path / "2.png").read_bytes()
    (tmp_path / "2.png").write_bytes(png[: len(png) // 2])   # a PNG cut in half (an interrupted copy)
    with pytest.raises(DatasetError, match=r"2\.png.*image id 2.*cannot decode"):
        dataset[1]
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

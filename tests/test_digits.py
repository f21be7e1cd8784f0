"""The built-in digits dataset: deterministic, valid COCO, exact ink boxes, negatives, disjoint sources."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from pipeline.digits import (
    INK_THRESHOLD,
    compose_image,
    image_rng,
    load_scans,
    make_digits,
    render_digit,
    split_scans,
)

TINY = dict(image_size=64, num_train=10, num_val=5, digits_per_image=(1, 4), digit_size=(10, 28), progress=False)


def _all_files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("digits"))
    result = make_digits(out, seed=0, negative_fraction=0.2, **TINY)
    return out, result


def test_same_seed_same_bytes_different_seed_differs(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    other = tmp_path / "other"
    make_digits(str(again), seed=0, negative_fraction=0.2, **TINY)
    make_digits(str(other), seed=1, negative_fraction=0.2, **TINY)
    first, second, third = _all_files(out), _all_files(again), _all_files(other)
    assert first == second
    assert first.keys() == third.keys()
    assert first["train.json"] != third["train.json"]
    assert sum(first[k] != third[k] for k in first if k.endswith(".png")) == len(first) - 2


def test_pycocotools_loads_both_splits(tiny):
    out, result = tiny
    for split, n in (("train", 10), ("val", 5)):
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(result["paths"][split])
        assert len(coco.getImgIds()) == n == result["counts"][split]["images"]
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c["name"] for c in coco.loadCats(list(range(1, 11)))] == [str(d) for d in range(10)]
        for image in coco.dataset["images"]:
            assert image["file_name"] == f"images/{split}/{image['id']:06d}.png"
            with Image.open(os.path.join(out, image["file_name"])) as im:
                assert im.size == (64, 64) and im.mode == "RGB"


def test_boxes_inside_image_and_well_formed(tiny):
    out, result = tiny
    for split in ("train", "val"):
        data = json.loads(open(result["paths"][split]).read())
        ids = [a["id"] for a in data["annotations"]]
        assert ids == list(range(1, len(ids) + 1))
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 64 and y + h <= 64
            assert ann["area"] == w * h and ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= 10


def test_negatives_present_when_requested(tiny):
    _, result = tiny
    assert result["counts"]["train"]["negatives"] == 2  # round(10 * 0.2)
    assert result["counts"]["val"]["negatives"] == 1


def test_written_boxes_are_the_tight_ink_boxes(tiny):
    """Regenerate each image from its seed and check every annotation is exactly its digit's ink extent."""
    out, result = tiny
    scans, labels = load_scans()
    train_idx, _ = split_scans(labels, 0)
    data = json.loads(open(result["paths"]["train"]).read())
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        if not anns:
            continue
        rng = image_rng(0, "train", image["id"] - 1)
        n = int(rng.integers(1, 5))
        pixels, pasted = compose_image(
            rng, scans[train_idx], labels[train_idx], image_size=64, num_digits=n, digit_size=(10, 28)
        )
        assert [list(p.bbox) for p in pasted] == [a["bbox"] for a in anns]
        assert [p.label + 1 for p in pasted] == [a["category_id"] for a in anns]
        with Image.open(os.path.join(out, image["file_name"])) as im:
            assert np.array_equal(np.asarray(im), pixels)
        for p in pasted:
            ink = p.alpha >= INK_THRESHOLD
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()


def test_render_digit_crop_is_tight():
    scans, _ = load_scans()
    for k in range(20):
        alpha = render_digit(scans[k], 17 + k, 30 - k // 2)
        ink = alpha >= INK_THRESHOLD
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()


def test_train_and_val_scans_are_disjoint():
    _, labels = load_scans()
    train, val = split_scans(labels, 0)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(labels)
    assert set(labels[val]) == set(range(10)) == set(labels[train])


def test_digits_are_visible_against_background(tiny):
    """Contrasting tint: the ink pixels of a digit differ clearly from the box's non-ink pixels."""
    out, result = tiny
    data = json.loads(open(result["paths"]["val"]).read())
    for ann in data["annotations"]:
        image = next(i for i in data["images"] if i["id"] == ann["image_id"])
        with Image.open(os.path.join(out, image["file_name"])) as im:
            pixels = np.asarray(im, dtype=np.float32)
        x, y, w, h = ann["bbox"]
        crop = pixels[y : y + h, x : x + w].reshape(-1, 3)
        luminance = crop @ np.array([0.299, 0.587, 0.114])
        assert np.percentile(luminance, 95) - np.percentile(luminance, 5) > 40


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="digit_size"):
        make_digits(str(tmp_path), image_size=64, digit_size=(10, 100), progress=False)
    with pytest.raises(ValueError, match="digits_per_image"):
        make_digits(str(tmp_path), digits_per_image=(3, 2), progress=False)


def test_coco_like_shapes_from_the_command_line(tmp_path):
    """`lad data digits --shapes 96x64,64x96`: images take the shapes in turn, with their boxes inside them."""
    from services.cli import main

    assert main(["data", "digits", "--out", str(tmp_path), "--shapes", "96x64,64x96", "--num-train", "4",
                 "--num-val", "2", "--digit-size", "8", "30", "--quiet"]) == 0
    coco = json.loads((tmp_path / "train.json").read_text())
    assert [(im["width"], im["height"]) for im in coco["images"]] == [(96, 64), (64, 96)] * 2
    for im in coco["images"]:
        with Image.open(tmp_path / im["file_name"]) as f:
            assert f.size == (im["width"], im["height"])
    sizes = {im["id"]: (im["width"], im["height"]) for im in coco["images"]}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= sizes[a["image_id"]][0] and y + h <= sizes[a["image_id"]][1]
    with pytest.raises(SystemExit) as bad:   # argparse: one line naming the option and the expected form
        main(["data", "digits", "--out", str(tmp_path / "bad"), "--shapes", "96by64"])
    assert bad.value.code == 2

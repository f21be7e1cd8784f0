"""load_coco: every malformed input gives one DatasetError naming the file, entry and field; repairs are counted."""

import json
import math
import pickle

import numpy as np
import pytest
from PIL import Image

from pipeline.coco import load_coco
from pipeline.digits import make_digits
from pipeline.errors import DatasetError
from pipeline.evaluate import coco_evaluate


def _base():
    """Three 40x30 images (id 3 has no annotation) and two categories with non-contiguous ids."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 5, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 0},
        ],
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }


def _write(tmp_path, data, name="ann.json", images=True):
    if images:
        for im in data.get("images", []):
            path = tmp_path / im["file_name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (im["width"], im["height"])).save(path)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def _error(path, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        load_coco(str(path), **kwargs)
    message = str(info.value)
    assert path.name in message
    return message


def test_loads_records_in_contiguous_label_order(tmp_path, capsys):
    data = load_coco(str(_write(tmp_path, _base())))
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert data.cat_ids == [3, 7] and [c["name"] for c in data.categories] == ["three", "seven"]
    first = data.records[0]
    assert first.path == str(tmp_path / "a.png") and (first.width, first.height) == (40, 30)
    assert first.boxes.dtype == np.float32 and first.labels.dtype == np.int64
    np.testing.assert_array_equal(first.boxes, [[2, 3, 12, 11], [20, 5, 25, 10]])
    np.testing.assert_array_equal(first.labels, [1, 0])
    assert data.records[2].boxes.shape == (0, 4)  # negatives are kept
    assert data.report.negatives == 1 and data.report.boxes == 3 and data.report.annotations == 3
    assert len(data.coco.getAnnIds()) == 3


def test_malformed_json_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    message = _error(path)
    assert "line 3" in message and "column" in message


def test_missing_file_and_non_object(tmp_path):
    assert "not found" in _error(tmp_path / "nope.json")
    path = tmp_path / "list.json"
    path.write_text("[]")
    assert "object" in _error(path)


def test_missing_top_level_key(tmp_path):
    data = _base()
    del data["categories"]
    assert "categories" in _error(_write(tmp_path, data))


@pytest.mark.parametrize("key", ["id", "file_name", "width", "height"])
def test_image_missing_field(tmp_path, key):
    data = _base()
    del data["images"][1][key]
    message = _error(_write(tmp_path, data, images=False), check_images=False)
    assert f"'{key}'" in message
    if key != "id":
        assert "image id 2" in message


def test_an_image_id_past_float64s_integers_is_refused(tmp_path):
    """Detections carry image ids as float64 (pycocotools' results arrays): 2**53 + 1 would come back as 2**53, an
    image the file may not have, or another image's detections."""
    data = _base()
    for a in data["annotations"]:
        a["image_id"] = 2 ** 53 + 1 if a["image_id"] == 1 else a["image_id"]
    data["images"][0]["id"] = 2 ** 53 + 1
    message = _error(_write(tmp_path, data))
    assert "images[0]" in message and str(2 ** 53 + 1) in message and "below 2**53" in message


def test_duplicate_ids(tmp_path):
    data = _base()
    data["images"][2]["id"] = 2
    assert "duplicate image id" in _error(_write(tmp_path, data)) and "image id 2" in _error(tmp_path / "ann.json")
    data = _base()
    data["annotations"][2]["id"] = 10
    message = _error(_write(tmp_path, data))
    assert "duplicate annotation id" in message and "annotation id 10" in message


def test_unknown_image_and_category(tmp_path):
    data = _base()
    data["annotations"][1]["image_id"] = 99
    message = _error(_write(tmp_path, data))
    assert "annotation id 11" in message and "99" in message and "image_id" in message
    data = _base()
    data["annotations"][2]["category_id"] = 5
    message = _error(_write(tmp_path, data))
    assert "annotation id 12" in message and "category_id" in message and "5" in message


@pytest.mark.parametrize(
    "bbox, field",
    [
        ([1, 2, 3], "'bbox'"),
        ("1,2,3,4", "'bbox'"),
        ([1, 2, "3", 4], "bbox[2]"),
        ([1, math.nan, 3, 4], "bbox[1]"),
        ([1, 2, math.inf, 4], "bbox[2]"),
        ([1, 2, 0, 4], "bbox[2] (width)"),
        ([1, 2, 3, -4], "bbox[3] (height)"),
    ],
)
def test_bad_bbox_names_annotation_and_field(tmp_path, bbox, field):
    data = _base()
    data["annotations"][1]["bbox"] = bbox
    message = _error(_write(tmp_path, data))
    assert "annotation id 11" in message and field in message


def test_further_problems_are_counted(tmp_path):
    data = _base()
    for ann in data["annotations"]:
        ann["bbox"] = [0, 0, -1, 1]
    message = _error(_write(tmp_path, data))
    assert "annotation id 10" in message and "2 more" in message


def test_missing_image_files_are_listed_and_counted(tmp_path):
    data = _base()
    data["images"] += [{"id": i, "file_name": f"gone{i}.png", "width": 8, "height": 8} for i in range(4, 12)]
    path = _write(tmp_path, data, images=False)
    message = _error(path)
    assert "11 of 11" in message and "a.png" in message and "and 6 more" in message and "image_root" in message
    load_coco(str(path), check_images=False)  # the check can be skipped


def test_image_root_defaults_to_json_folder_and_can_be_overridden(tmp_path):
    images = tmp_path / "pics"
    images.mkdir()
    _write(images, _base(), name="unused.json")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(_base()))
    _error(path)  # images are not next to the JSON
    data = load_coco(str(path), image_root=str(images))
    assert data.records[1].path == str(images / "sub" / "b.png")


def test_clipping_dropping_and_crowd_are_counted(tmp_path):
    data = _base()
    data["annotations"] += [
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [30, 20, 20, 20], "iscrowd": 0},  # clipped
        {"id": 14, "image_id": 2, "category_id": 3, "bbox": [-5, -5, 10, 10], "iscrowd": 0},  # clipped
        {"id": 15, "image_id": 2, "category_id": 3, "bbox": [50, 5, 5, 5], "iscrowd": 0},  # outside
        {"id": 16, "image_id": 2, "category_id": 3, "bbox": [39.5, 5, 5, 5], "iscrowd": 0},  # 0.5 px left
        {"id": 17, "image_id": 3, "category_id": 7, "bbox": [1, 1, 5, 5], "iscrowd": 1},  # crowd
    ]
    loaded = load_coco(str(_write(tmp_path, data)))
    report = loaded.report
    assert (report.clipped, report.dropped_outside, report.dropped_degenerate, report.crowd) == (2, 1, 1, 1)
    assert report.annotations == 8 and report.boxes == 5 and report.negatives == 1  # image 3: crowd only
    for record in loaded.records:
        b = record.boxes
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= record.width).all() and (b[:, 3] <= record.height).all()
    np.testing.assert_array_equal(loaded.records[1].boxes[1:], [[30, 20, 40, 30], [0, 0, 5, 5]])
    # evaluation sees the same cleaned boxes, and the crowd region as an ignore region
    kept = {a["id"]: a for a in loaded.coco.dataset["annotations"]}
    assert set(kept) == {10, 11, 12, 13, 14, 17}
    assert kept[13]["bbox"] == [30, 20, 10, 10] and kept[17]["iscrowd"] == 1
    summary = report.summary()
    assert "2 clipped" in summary and "crowd" in summary and "ann.json" in summary


def test_a_run_says_what_loading_repaired_and_nothing_when_nothing_was(tmp_path, capsys):
    from pipeline.local import prepare_run
    from schemas.config import ConfigError
    from tests.tiny import tiny_config

    data = _base()
    _write(tmp_path, data, "val.json")
    data["annotations"].append({"id": 13, "image_id": 2, "category_id": 3, "bbox": [30, 20, 20, 20], "iscrowd": 0})
    _write(tmp_path, data, "train.json")
    with pytest.raises(ConfigError, match="num_classes"):  # an error is still its one line, with no note before it
        with prepare_run(tiny_config(tmp_path, tmp_path / "runs", mode="paa", model={"num_classes": 3})):
            pass
    assert capsys.readouterr().err == ""
    with prepare_run(tiny_config(tmp_path, tmp_path / "runs", mode="paa", model={"num_classes": 2})):
        pass
    err = capsys.readouterr().err
    assert err.startswith("note: ") and "train.json" in err and "1 clipped to the image" in err, err
    assert "val.json" not in err  # nothing was repaired there


def test_annotation_id_zero_is_renumbered_so_evaluation_still_matches(tmp_path):
    data = _base()
    for i, ann in enumerate(data["annotations"]):
        ann["id"] = i
    loaded = load_coco(str(_write(tmp_path, data)))
    assert loaded.report.renumbered_annotation_ids
    dets = [dict(a, score=1.0) for a in loaded.coco.dataset["annotations"]]
    stats, _ = coco_evaluate(loaded.coco, dets)
    assert stats["AP"] == pytest.approx(1.0, abs=1e-12)


def test_error_survives_pickling():
    error = DatasetError("bad", file="x.json", annotation_id=4, field="bbox", fix="fix it")
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and again.annotation_id == 4 and again.field == "bbox"
    assert str(DatasetError(str(error))) == str(error)  # DataLoader re-raises with the message only


def test_loads_the_digits_dataset(tmp_path):
    paths = make_digits(str(tmp_path), image_size=64, num_train=6, num_val=3, digit_size=(10, 28), progress=False)
    for split in ("train", "val"):
        data = load_coco(paths["paths"][split])
        assert data.cat_ids == list(range(1, 11)) and [c["name"] for c in data.categories] == list("0123456789")
        assert data.report.clipped == data.report.dropped_outside == data.report.dropped_degenerate == 0
        assert sum(len(r.labels) for r in data.records) == paths["counts"][split]["annotations"]


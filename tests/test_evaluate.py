"""coco_evaluate: perfect detections give AP 1, none give 0, subsets work, the table is always there."""

import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from pipeline.evaluate import STAT_NAMES, coco_evaluate


def _gt():
    """Two 200x200 images with small, medium and large boxes of two categories."""
    images = [{"id": i, "file_name": f"{i}.png", "width": 200, "height": 200} for i in (1, 2)]
    boxes = [
        (1, 1, [10, 10, 20, 20]),  # small (400 px)
        (1, 2, [50, 50, 40, 60]),  # medium
        (2, 1, [0, 0, 150, 120]),  # large
        (2, 2, [160, 150, 30, 30]),  # medium
    ]
    annotations = [
        {"id": k, "image_id": im, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for k, (im, c, b) in enumerate(boxes, start=1)
    ]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perfect(coco):
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in coco.dataset["annotations"]
    ]


def test_perfect_detections_give_ap_one(capsys):
    stats, table = coco_evaluate(_gt(), _perfect(_gt()))
    assert list(stats) == STAT_NAMES
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR10", "AR100"):
        assert stats[name] == pytest.approx(1.0, abs=1e-12), name  # a mean of 1.0s, up to float rounding
    assert len(table.splitlines()) == 12 and "Average Precision" in table
    assert capsys.readouterr().out == ""  # nothing leaks to stdout


def test_empty_detections_give_zeros_and_a_table():
    stats, table = coco_evaluate(_gt(), [])
    assert all(value == 0.0 for value in stats.values())
    lines = table.splitlines()
    assert len(lines) == 12 and all(line.endswith("0.000") for line in lines)


def test_stat_is_minus_one_without_ground_truth_in_range():
    coco = _gt()
    stats, _ = coco_evaluate(coco, [], image_ids=[1])  # image 1 has no large object
    assert stats["APl"] == -1.0 and stats["AP"] == 0.0


def test_restricting_to_image_ids():
    coco = _gt()
    only_first = [d for d in _perfect(coco) if d["image_id"] == 1]
    assert coco_evaluate(coco, only_first, image_ids=[1])[0]["AP"] == pytest.approx(1.0, abs=1e-12)
    assert coco_evaluate(coco, only_first)[0]["AP"] < 0.9
    assert coco_evaluate(coco, _perfect(coco), image_ids=[])[0]["AP"] == -1.0  # nothing to evaluate, no crash


def test_shifted_boxes_lower_strict_ap_but_not_ap50():
    coco = _gt()
    dets = _perfect(coco)
    for d in dets:
        x, y, w, h = d["bbox"]
        d["bbox"] = [x + 0.1 * w, y, w, h]  # IoU ~0.82
    stats, _ = coco_evaluate(coco, dets)
    assert stats["AP50"] == pytest.approx(1.0, abs=1e-12) and stats["AP75"] == pytest.approx(1.0, abs=1e-12)
    assert stats["AP"] < 0.9


def test_numpy_and_torch_scalars_are_accepted():
    coco = _gt()
    dets = [
        {
            "image_id": torch.tensor(d["image_id"]),
            "category_id": np.int64(d["category_id"]),
            "bbox": np.array(d["bbox"], dtype=np.float32),
            "score": torch.tensor(0.9),
        }
        for d in _perfect(coco)
    ]
    assert coco_evaluate(coco, dets)[0]["AP"] == pytest.approx(1.0, abs=1e-12)


def test_detection_on_unknown_image_is_a_clear_error():
    with pytest.raises(ValueError, match="image id 99"):
        coco_evaluate(_gt(), [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1.0}])


def test_sharded_predictions_score_as_one_process(tmp_path):
    """Data-parallel workers each predict every world-th validation image; merged, their detections are the
    ones a single process makes, so rank 0 scores the same stats."""
    from pipeline.coco import load_coco
    from pipeline.validate import predict_array, score
    from tests.tiny import make_data, tiny_config
    from trainer.engine import Engine

    data = make_data(tmp_path / "data", num_val=7)
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", inference={"score_thr": 0.0, "max_det": 20})
    engine = Engine(cfg, "cpu", 1)
    val = load_coco(cfg.data.val)
    args = (engine.model, engine.anchors, val, cfg.data.input_size, cfg.inference, torch.device("cpu"))
    whole = predict_array(*args)
    shards = [predict_array(*args, shard=(rank, 3)) for rank in range(3)]
    assert len(whole) > 7 and all(len(s) for s in shards)
    assert {int(i) for i in shards[1][:, 0]} == {r.image_id for r in val.records[1::3]}
    merged = np.concatenate(shards)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_allclose(order(merged), order(whole), rtol=1e-5, atol=1e-4)
    assert score(val, merged)[0] == pytest.approx(score(val, whole)[0], abs=1e-6)
    assert engine.model.training   # predicting leaves the network's mode as it was


def test_score_voting_keeps_a_box_the_clamp_flattened_finite():
    """A box decoded wholly outside the image is clamped to zero area; its IoU with itself is 0/0 in torchvision.
    Voting must leave it as NMS kept it (finite), and vote the other boxes as before."""
    from trainer.inference import score_voting

    boxes = torch.tensor([[64.0, 10.0, 64.0, 30.0], [0.0, 0.0, 32.0, 32.0], [1.0, 1.0, 33.0, 33.0]])
    scores, labels = torch.tensor([0.95, 0.9, 0.5]), torch.tensor([0, 1, 1])
    voted = score_voting(boxes[:2], labels[:2], boxes, scores, labels)
    assert torch.isfinite(voted).all()
    assert torch.equal(voted[0], boxes[0])
    w = torch.exp(-(1 - torch.tensor([1.0, (31 * 31) / (2 * 32 * 32 - 31 * 31)])) ** 2 / 0.025) * scores[1:]
    assert torch.allclose(voted[1], (w[:, None] * boxes[1:]).sum(0) / w.sum())

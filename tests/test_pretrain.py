"""`lad pretrain`: where the crops fall, and that its weights file is what `model.pretrained` loads."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.coco import ImageRecord, load_coco
from pipeline.pretrain import Crop, CropDataset, background_crops, epoch_crops, object_crops
from schemas.config import ModelConfig
from services.cli import main
from tests.tiny import make_data
from trainer.checkpoint import CheckpointError
from trainer.model import RESNETS, build_model

REPO = Path(__file__).resolve().parents[1]


def _record(boxes) -> ImageRecord:
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return ImageRecord(1, "x.png", 200, 120, boxes, np.arange(len(boxes)))


def test_each_object_window_holds_the_whole_object_at_the_images_scale():
    record = _record([[10, 20, 30, 50], [100, 10, 190, 100], [0, 0, 6, 6]])
    for seed in range(20):
        for crop, (x1, y1, x2, y2) in zip(object_crops(record, 0, 48, np.random.default_rng(seed)),
                                          record.boxes.tolist()):
            assert crop.x0 <= x1 and x2 <= crop.x0 + crop.side and crop.y0 <= y1 and y2 <= crop.y0 + crop.side
            assert crop.side == max(48.0, 1.25 * max(x2 - x1, y2 - y1))  # native scale unless the object is larger
    assert [c.label for c in object_crops(record, 0, 48, np.random.default_rng(0))] == [0, 1, 2]


def test_background_windows_stay_off_the_objects_with_the_object_windows_sizes():
    record = _record([[10, 20, 60, 70], [120, 30, 170, 90]])
    sides = np.array([32.0, 48.0, 60.0])
    crops = background_crops(record, 0, sides, 60, background=10, rng=np.random.default_rng(0))
    assert len(crops) > 10 and all(c.label == 10 for c in crops)
    assert {c.side for c in crops} == {32.0, 48.0, 60.0}
    assert any(c.x0 < 0 or c.y0 < 0 or c.x0 + c.side > 200 or c.y0 + c.side > 120 for c in crops)  # overhang too
    for c in crops:
        assert -c.side / 4 <= c.x0 and -c.side / 4 <= c.y0  # by at most a quarter
        for x1, y1, x2, y2 in record.boxes.tolist():
            ix = max(0.0, min(x2, c.x0 + c.side) - max(x1, c.x0))
            iy = max(0.0, min(y2, c.y0 + c.side) - max(y1, c.y0))
            assert ix * iy <= 0.25 * min((x2 - x1) * (y2 - y1), c.side * c.side)
    crowded = _record([[0, 0, 200, 120]])  # every window lies inside the object
    assert background_crops(crowded, 0, sides, 5, background=10, rng=np.random.default_rng(0)) == []


def _gradient_record(tmp_path) -> ImageRecord:
    """A 100x60 image whose pixel (x, y) is (x, y, 7): every crop's pixels say where they came from."""
    from PIL import Image
    yy, xx = np.mgrid[0:60, 0:100]
    pixels = np.stack([xx, yy, np.full_like(xx, 7)], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    return ImageRecord(1, str(tmp_path / "g.png"), 100, 60, np.zeros((0, 4), np.float32), np.zeros(0, np.int64))


def test_a_crop_is_the_images_pixels_padded_with_zeros_beyond_its_edge(tmp_path):
    from types import SimpleNamespace
    data = SimpleNamespace(records=[_gradient_record(tmp_path)])
    crops = [Crop(0, 10, 5, 32, 3), Crop(0, -6, -4, 32, 1), Crop(0, 80, 40, 32, 2)]
    ds = CropDataset(data, crops, 32)
    inside, label = ds[0]
    assert label == 3 and inside.shape == (3, 32, 32)
    assert inside[0, 0, 0] == 10 and inside[1, 0, 0] == 5 and inside[0, 3, 31] == 41 and inside[1, 31, 0] == 36
    top_left, _ = ds[1]
    assert (top_left[:, :4, :] == 0).all() and (top_left[:, :, :6] == 0).all()  # above and left of the image
    assert top_left[0, 4, 6] == 0 and top_left[1, 4, 6] == 0 and top_left[2, 4, 6] == 7 and top_left[0, 4, 7] == 1
    bottom_right, _ = ds[2]
    assert bottom_right[0, 0, 19] == 99 and (bottom_right[:, :, 20:] == 0).all() and (bottom_right[:, 20:] == 0).all()


def test_a_larger_window_is_scaled_to_the_crop_size(tmp_path):
    from types import SimpleNamespace
    data = SimpleNamespace(records=[_gradient_record(tmp_path)])
    image, _ = CropDataset(data, [Crop(0, 20, 10, 40, 0)], 20)[0]
    assert image.shape == (3, 20, 20)
    assert (image[2] == 7).all()  # a uniform plane stays uniform
    assert image[0, 5, 0] < image[0, 5, 10] < image[0, 5, 19] and 20 <= int(image[0, 5, 0]) <= 22  # x, halved


def test_every_object_once_and_background_in_proportion(tmp_path):
    data = load_coco(str(make_data(tmp_path / "data") / "val.json"))
    crops = epoch_crops(data, 32, background_ratio=0.5, seed=0)
    assert sum(c.label < data.num_classes for c in crops) == data.report.boxes
    background = sum(c.label == data.num_classes for c in crops)
    assert 0 < background <= 0.5 * data.report.boxes + len(data.records)
    assert [c.x0 for c in epoch_crops(data, 32, 0.5, seed=1)] != [c.x0 for c in crops]  # placed anew each epoch


def test_lad_pretrain_writes_weights_that_model_pretrained_loads(tmp_path, capsys):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    out = tmp_path / "weights" / "r18.pth"
    assert main(["pretrain", "--train", str(data / "train.json"), "--val", str(data / "val.json"), "--out", str(out),
                 "--epochs", "4", "--batch-size", "16", "--window", "32", "--lr", "0.01", "--threads", "1",
                 "--device", "cpu", "--quiet"]) == 0
    assert f"model.pretrained={out}" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved and not any(k.startswith("fc.") for k in saved)
    info = json.loads((tmp_path / "weights" / "r18.pth.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3, 4] and 0 <= info["val_accuracy"] <= 1
    assert info["classes"][-1] == "background" and len(info["classes"]) == 11
    assert info["history"][-1]["loss"] < 0.8 * info["history"][0]["loss"]  # it learns
    model = build_model(ModelConfig(depth=18, pretrained=str(out), frozen_stages=1, norm_eval=True))
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, saved["conv1.weight"])
    assert torch.equal(body.layer2[0].bn1.running_var, saved["layer2.0.bn1.running_var"])


def test_a_val_file_of_other_categories_is_one_line_and_writes_nothing(tmp_path, capsys):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    other = json.loads((data / "val.json").read_text())
    other["categories"][0]["name"] = "zero"
    (data / "other.json").write_text(json.dumps(other))
    out = tmp_path / "r18.pth"
    assert main(["pretrain", "--train", str(data / "train.json"), "--val", str(data / "other.json"),
                 "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other.json" in err and "categor" in err
    assert not out.exists() and not list(tmp_path.glob("*.pth*"))


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--window", "8"), ("--batch-size", "0"), ("--lr", "0"),
                                        ("--background-ratio", "-0.5")])
def test_bad_settings_are_one_line(tmp_path, capsys, flag, value):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    assert main(["pretrain", "--train", str(data / "train.json"), "--out", str(tmp_path / "w.pth"), flag, value,
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag.lstrip("-").replace("-", "_") in err


def test_a_killed_pretraining_goes_on_from_its_last_epoch_and_ends_as_if_never_stopped(tmp_path):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    args = ["pretrain", "--train", str(data / "train.json"), "--epochs", "4", "--batch-size", "8", "--window", "32",
            "--threads", "1", "--device", "cpu", "--quiet"]
    whole = tmp_path / "whole.pth"
    assert main(args + ["--out", str(whole)]) == 0
    cut = tmp_path / "cut.pth"
    resume = tmp_path / "cut.pth.resume"
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args, "--out", str(cut)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not resume.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert resume.exists() and not cut.exists()  # an epoch kept, no half-written weights
    assert main(args + ["--out", str(cut)]) == 0
    info = json.loads((tmp_path / "cut.pth.json").read_text())
    assert info["resumed_at_epoch"] >= 1 and [h["epoch"] for h in info["history"]] == [1, 2, 3, 4]
    assert not resume.exists()
    a, b = torch.load(whole, weights_only=True), torch.load(cut, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_file_of_other_settings_is_refused_in_one_line(tmp_path, capsys):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    out = tmp_path / "w.pth"
    torch.save({"settings": {"depth": 34}, "model": {}, "optimizer": {}, "scheduler": {}, "history": []},
               f"{out}.resume")
    assert main(["pretrain", "--train", str(data / "train.json"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "w.pth.resume" in err and "depth" in err and not out.exists()
    (tmp_path / "w.pth.resume").write_bytes(b"PK\x03\x04 cut short")
    assert main(["pretrain", "--train", str(data / "train.json"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "w.pth.resume: unreadable" in err and not out.exists()


@pytest.mark.parametrize("depth", [34, 50])
def test_weights_of_another_depth_are_refused_in_one_line(tmp_path, depth):
    """R34's keys are a superset of R18's with the same shapes, R50's differ in shape: neither may load."""
    weights = tmp_path / f"r{depth}.pth"
    torch.save(RESNETS[depth](weights=None).state_dict(), weights)
    with pytest.raises(CheckpointError) as refused:
        build_model(ModelConfig(depth=18, pretrained=str(weights)))
    message = str(refused.value)
    assert "\n" not in message and f"model.pretrained {weights}: not ResNet-18 weights" in message
    assert ("unexpected layer" if depth == 34 else "is [") in message
    torch.save(RESNETS[18](weights=None, norm_layer=torch.nn.BatchNorm2d).state_dict(), weights)  # with fc.
    assert build_model(ModelConfig(depth=18, norm="frozen_bn", pretrained=str(weights)))  # its BN counters aside

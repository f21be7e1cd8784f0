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
from pipeline.pretrain import CropDataset, background_crops, epoch_crops, object_crops
from schemas.config import ModelConfig
from services.cli import main
from tests.tiny import make_data
from trainer.model import build_model

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


def test_background_windows_stay_off_the_objects():
    record = _record([[10, 20, 60, 70], [120, 30, 170, 90]])
    crops = background_crops(record, 0, 32, 50, background=10, rng=np.random.default_rng(0))
    assert crops and all(c.label == 10 for c in crops)
    for c in crops:
        for x1, y1, x2, y2 in record.boxes.tolist():
            ix = max(0.0, min(x2, c.x0 + 32) - max(x1, c.x0))
            iy = max(0.0, min(y2, c.y0 + 32) - max(y1, c.y0))
            assert ix * iy <= 0.25 * min((x2 - x1) * (y2 - y1), 32 * 32)
    crowded = _record([[0, 0, 200, 120]])  # every window lies inside the object
    assert background_crops(crowded, 0, 32, 5, background=10, rng=np.random.default_rng(0)) == []


def test_crops_are_the_images_pixels(tmp_path):
    data = load_coco(str(make_data(tmp_path / "data") / "val.json"))
    crops = epoch_crops(data, 32, background_ratio=0.5, seed=0)
    assert sum(c.label < data.num_classes for c in crops) == data.report.boxes
    assert any(c.label == data.num_classes for c in crops)
    ds = CropDataset(data, crops, 32)
    image, label = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8 and label == crops[0].label
    c = crops[0]
    if c.side == 32 and c.x0 >= 0 and c.y0 >= 0:  # inside the image at its own scale: the very pixels
        x0, y0 = int(round(c.x0)), int(round(c.y0))
        assert torch.equal(image, ds.image(c.index)[:, y0:y0 + 32, x0:x0 + 32])


def test_lad_pretrain_writes_weights_that_model_pretrained_loads(tmp_path, capsys):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    out = tmp_path / "weights" / "r18.pth"
    assert main(["pretrain", "--train", str(data / "train.json"), "--val", str(data / "val.json"), "--out", str(out),
                 "--epochs", "3", "--batch-size", "16", "--window", "32", "--lr", "0.05", "--threads", "1",
                 "--device", "cpu", "--quiet"]) == 0
    assert f"model.pretrained={out}" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved and not any(k.startswith("fc.") for k in saved)
    info = json.loads((tmp_path / "weights" / "r18.pth.json").read_text())
    assert [h["epoch"] for h in info["history"]] == [1, 2, 3] and 0 <= info["val_accuracy"] <= 1
    assert info["classes"][-1] == "background" and len(info["classes"]) == 11
    assert info["history"][-1]["loss"] < info["history"][0]["loss"]  # it learns
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


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--window", "8"), ("--batch-size", "0")])
def test_bad_settings_are_one_line(tmp_path, capsys, flag, value):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    assert main(["pretrain", "--train", str(data / "train.json"), "--out", str(tmp_path / "w.pth"), flag, value,
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag.lstrip("-").replace("-", "_") in err


def test_a_killed_pretraining_goes_on_from_its_last_epoch_and_ends_as_if_never_stopped(tmp_path):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    args = ["pretrain", "--train", str(data / "train.json"), "--epochs", "6", "--batch-size", "8", "--window", "32",
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
    assert info["resumed_at_epoch"] >= 1 and [h["epoch"] for h in info["history"]] == [1, 2, 3, 4, 5, 6]
    assert not resume.exists()
    a, b = torch.load(whole, weights_only=True), torch.load(cut, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_resume_file_of_other_settings_is_refused_in_one_line(tmp_path, capsys):
    data = make_data(tmp_path / "data", num_train=24, num_val=8)
    out = tmp_path / "w.pth"
    torch.save({"settings": {"depth": 34}}, f"{out}.resume")
    assert main(["pretrain", "--train", str(data / "train.json"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "w.pth.resume" in err and "depth" in err and not out.exists()

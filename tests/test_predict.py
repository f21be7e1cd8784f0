"""`lad predict` through the real CLI: COCO results that pycocotools' loadRes reads, one drawn image per input,
and a bad file reported in one line without stopping the rest."""
import json
import shutil

from PIL import Image
from pycocotools.coco import COCO

from services.cli import main as lad
from tests.tiny import make_data, make_teacher, tiny_config


def test_predict_writes_coco_results_and_drawn_images_and_skips_a_bad_file(tmp_path, capsys):
    data = make_data(tmp_path / "d", num_train=4, num_val=3)
    cfg = tiny_config(data, tmp_path / "runs", mode="paa")
    ckpt = make_teacher(cfg, tmp_path / "model.pt", depth=18)
    inputs = tmp_path / "inputs"
    shutil.copytree(data / "images" / "val", inputs / "nested")
    (inputs / "broken.png").write_bytes(b"not an image at all")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    out = tmp_path / "out"
    code = lad(["predict", "--checkpoint", str(ckpt), str(inputs), str(notes), str(tmp_path / "missing.jpg"),
                "--out", str(out), "--score-thr", "0.0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0
    broken = inputs / "broken.png"
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        f"warning: {broken}: skipped, not a readable image (UnidentifiedImageError: cannot identify image file "
        f"'{broken}')",
        f"warning: {notes}: skipped, not a readable image (UnidentifiedImageError: cannot identify image file "
        f"'{notes}')",
        f"warning: {tmp_path / 'missing.jpg'}: skipped, no such file"]
    gt = COCO(str(out / "images.json"))
    assert len(gt.getImgIds()) == 3  # the three val images; broken.png and notes.txt are not among them
    dets = json.loads((out / "detections.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= set(gt.getCatIds())
    names = {c["id"]: c["name"] for c in gt.loadCats(gt.getCatIds())}
    assert all(d["category_name"] == names[d["category_id"]] for d in dets)
    res = gt.loadRes(str(out / "detections.json"))
    assert len(res.getAnnIds()) == len(dets)
    drawn = sorted(p.name for p in out.glob("*.jpg"))
    assert len(drawn) == 3
    with Image.open(out / drawn[0]) as im, Image.open(inputs / "nested" / drawn[0].replace(".jpg", ".png")) as src:
        assert im.size == src.size and im.convert("RGB").tobytes() != src.convert("RGB").tobytes()  # boxes drawn


def test_predict_with_nothing_readable_says_so(tmp_path, capsys):
    data = make_data(tmp_path / "d", num_train=4, num_val=2)
    ckpt = make_teacher(tiny_config(data, tmp_path / "runs", mode="paa"), tmp_path / "model.pt", depth=18)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff truncated")
    assert lad(["predict", "--checkpoint", str(ckpt), str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert f"warning: {bad}: skipped, not a readable image" in capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "detections.json").read_text()) == []


def test_predict_does_not_need_the_pretrained_backbone_file(tmp_path):
    """A checkpoint trained from `model.pretrained` weights holds all its weights: predicting (and exporting,
    evaluating) on another machine must not read that file."""
    import torch

    data = make_data(tmp_path / "d", num_train=4, num_val=2)
    ckpt_path = make_teacher(tiny_config(data, tmp_path / "runs", mode="paa"), tmp_path / "model.pt", depth=18)
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["config"]["model"]["pretrained"] = str(tmp_path / "gone" / "resnet18.pth")
    torch.save(ckpt, ckpt_path)
    assert lad(["predict", "--checkpoint", str(ckpt_path), str(data / "images" / "val"), "--out",
                str(tmp_path / "o"), "--quiet"]) == 0
    assert len(list((tmp_path / "o").glob("*.jpg"))) == 2

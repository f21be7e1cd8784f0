"""`lad export` through the real CLI: ONNX run by onnxruntime and TorchScript by torch.jit give PyTorch's outputs
within `pipeline.export.TOLERANCE` at another batch and input size than the export's example, and the same
detections after the Python post-processing that docs/export.md shows."""
import json
import math

import numpy as np
import pytest
import torch

from pipeline.export import TOLERANCE
from schemas.config import RunConfig
from services.cli import main as lad
from tests.tiny import make_data, make_teacher, tiny_config
from trainer.anchors import make_anchors
from trainer.checkpoint import load_checkpoint
from trainer.inference import detect, postprocess_image
from trainer.model import build_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config(make_data(root / "d", num_train=4, num_val=2), root / "runs", mode="paa")
    return make_teacher(cfg, root / "model.pt", depth=18)


def _pytorch(checkpoint):
    ckpt = load_checkpoint(checkpoint)
    cfg = RunConfig.model_validate(ckpt["config"])
    model = build_model(cfg.model)
    model.load_state_dict(ckpt["models"]["a"])
    return model.eval(), cfg


@pytest.mark.parametrize("fmt,suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_matches_pytorch_and_gives_the_same_detections(checkpoint, tmp_path, fmt, suffix):
    out = tmp_path / f"model{suffix}"
    assert lad(["export", "--checkpoint", str(checkpoint), "--format", fmt, "--out", str(out)]) == 0
    meta = json.loads((tmp_path / f"model{suffix}.json").read_text())
    assert meta["checked_max_abs_diff"] <= TOLERANCE and meta["outputs"] == ["cls_logits", "box_deltas", "iou_logits"]
    model, cfg = _pytorch(checkpoint)
    images = torch.randint(0, 256, (3, 3, 96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    if fmt == "onnx":
        import onnxruntime as ort
        got = [torch.from_numpy(a) for a in ort.InferenceSession(str(out)).run(None, {"images": images.numpy()})]
    else:
        with torch.no_grad():
            got = list(torch.jit.load(str(out))(images))
    with torch.no_grad():
        ref = model(images)
    for a, b in zip(got, (ref.cls_logits, ref.box_deltas, ref.iou_logits)):
        assert a.shape == b.shape and float((a - b).abs().max()) <= TOLERANCE
    # docs/export.md's post-processing: anchors from the sidecar, then trainer.inference
    h, w = images.shape[-2:]
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in meta["strides"]]
    anchors, per_level = make_anchors(sizes, meta["strides"], meta["octave_base_scale"])
    mine = [postprocess_image(got[0][i], got[1][i], got[2][i], anchors, per_level, cfg.inference, (h, w))
            for i in range(3)]
    theirs = detect(model, images, lambda ls: make_anchors(list(ls), cfg.model.strides, cfg.model.octave_base_scale),
                    cfg.inference)
    for (b1, s1, l1), (b2, s2, l2) in zip(mine, theirs):
        assert torch.equal(l1, l2) and np.allclose(s1, s2, atol=1e-4) and np.allclose(b1, b2, atol=1e-2)
    assert sum(len(s) for _, s, _ in mine) > 0


def test_export_of_a_missing_network_is_one_line(checkpoint, tmp_path, capsys):
    assert lad(["export", "--checkpoint", str(checkpoint), "--network", "b", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "there is no network 'b'" in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_a_square_input_size_off_the_multiples_of_32_exports(tmp_path):
    """The exported network takes sides that are multiples of 32; a run at 100 x 100 (any size from 32 is a valid
    config) exports with its example padded to 128 x 128 instead of failing in torch.export."""
    cfg = tiny_config(make_data(tmp_path / "d", num_train=4, num_val=2), tmp_path / "runs", mode="paa", input_size=100)
    out = tmp_path / "m.onnx"
    assert lad(["export", "--checkpoint", str(make_teacher(cfg, tmp_path / "model.pt")), "--out", str(out)]) == 0
    assert json.loads((tmp_path / "m.onnx.json").read_text())["input_size"] == 100 and out.exists()

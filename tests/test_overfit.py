"""A tiny-overfit run: a handful of images learned to a high AP50 proves that the loss, the assignment, box
decoding, inference and COCO evaluation fit together (a sign error or a shifted anchor would keep AP near 0)."""
import json

import pytest

from pipeline.digits import make_digits
from pipeline.local import train
from schemas.config import config_from_dict
from schemas.rundir import RunDir


@pytest.mark.parametrize("amp", [False, True])
def test_tiny_overfit_reaches_high_ap50(tmp_path, amp):
    """The same AP50 bar in float32 and with mixed precision (bf16 autocast on the CPU)."""
    data = tmp_path / "data"
    make_digits(data, image_size=64, num_train=4, num_val=2, digits_per_image=(1, 2), digit_size=(22, 36),
                negative_fraction=0, progress=False)
    cfg = config_from_dict({
        "name": "overfit", "output_dir": str(tmp_path / "runs"),
        "data": {"train": str(data / "train.json"), "val": str(data / "train.json"), "input_size": 64,
                 "flip_prob": 0},
        "model": {"depth": 18, "norm": "gn", "fpn_levels": [3, 4], "fpn_channels": 32, "head_channels": 32,
                  "head_convs": 1},
        "train": {"epochs": 40, "batch_size": 4, "lr": 0.02, "warmup_steps": 10, "milestones": [0.8],
                  "eval_every": 0, "log_every": 10, "amp": amp}})
    result = train(cfg, progress=False)
    assert result["a"]["AP50"] > 0.8, result["a"]
    run = RunDir(cfg.run_dir)
    assert run.last.exists() and run.best.exists()
    assert json.loads(run.progress_path.read_text())["state"] == "succeeded"
    metrics = list(run.iter_metrics())
    assert metrics[0]["loss"] > metrics[-1]["loss"]
    assert {"step", "epoch", "lr", "step_ms", "data_wait_ms", "assign_ms"} <= set(metrics[-1])

"""A training step waits for the device as few times as it can, and never once per image.

On a GPU every read of a device value by the host (`.item()`, `float(t)`, `if t.any()`, `nonzero`, indexing by a
mask) stalls the stream. The CPU has no stream, so these tests count those calls with a `TorchFunctionMode` and
pin the count: the step's syncs do not grow with the batch, the GMM's are bounded by its checks, and the losses
stay on the device until a logged step (`trainer.engine.on_host`)."""
import collections
import math
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from bench.steps import random_batch
from schemas.config import config_from_dict
from trainer.checkpoint import save_checkpoint
from trainer.engine import Engine, on_host
from trainer.gmm import fit_predict_1d  # noqa: F401  (the EM whose checks are bounded below)
from trainer.model import build_model

ROOT = str(Path(__file__).resolve().parents[1])
READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
         torch.Tensor.__float__, torch.Tensor.__index__, torch.nonzero, torch.Tensor.nonzero, torch.Tensor.cpu,
         torch.Tensor.numpy, torch.masked_select, torch.Tensor.masked_select, torch.unique, torch.Tensor.unique}
MODEL = {"depth": 18, "fpn_levels": [3, 4, 5], "fpn_channels": 32, "head_channels": 32, "head_convs": 1}
# measured per step, outside the EM (finding the candidates, counting them per image, the candidate table, the
# positives); SoLAD's soft targets add the teacher's overlapping anchors
OUTSIDE_GMM = {"paa": 8, "lad": 8, "solad": 9}


class HostReads(TorchFunctionMode):
    """Counts torch calls that make the host wait for a device value, by the project file that made them."""

    def __init__(self):
        super().__init__()
        self.by_file: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or _mask_index(func, args) or _sized_by_data(func, args, kwargs):
            ours = [f for f in traceback.extract_stack() if f.filename.startswith(ROOT) and "/tests/" not in f.filename]
            self.by_file[Path(ours[-1].filename).name if ours else "?"] += 1
        return func(*args, **kwargs)

    def total(self, but: str = "") -> int:
        return sum(n for f, n in self.by_file.items() if f != but)


def _mask_index(func, args) -> bool:
    if func is not torch.Tensor.__getitem__ or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def _sized_by_data(func, args, kwargs) -> bool:
    """repeat_interleave by a tensor of repeats without output_size must read the repeats to size its output."""
    return (func in (torch.repeat_interleave, torch.Tensor.repeat_interleave) and "output_size" not in kwargs
            and len(args) > 1 and isinstance(args[1], torch.Tensor))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    cfg = config_from_dict({"data": {"input_size": 128}, "model": {**MODEL, "depth": 34}})
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, {"config": cfg.to_dict(), "models": {"a": build_model(cfg.model).state_dict()}})
    return str(path)


def reads_of_a_step(mode: str, batch: int, teacher: str) -> HostReads:
    extra = {"teacher": {"checkpoint": teacher}} if mode != "paa" else {}
    engine = Engine(config_from_dict({"mode": mode, "data": {"input_size": 128}, "model": MODEL, **extra}), "cpu", 100)
    images, boxes, labels = random_batch(batch, 128, (3, 8), 0, "cpu")
    engine.step(images, boxes, labels)  # warm: anchors cached
    with HostReads() as reads:
        result = engine.step(images, boxes, labels)
    assert all(isinstance(result.metrics[k], torch.Tensor) for k in ("loss", "loss_cls", "num_pos"))
    return reads


@pytest.mark.parametrize("mode", ["paa", "lad", "solad"])
def test_the_host_waits_for_the_device_a_fixed_number_of_times_per_step_whatever_the_batch(mode, teacher):
    small, large = reads_of_a_step(mode, 2, teacher), reads_of_a_step(mode, 6, teacher)
    assert small.total(but="gmm.py") == large.total(but="gmm.py") <= OUTSIDE_GMM[mode], \
        (small.by_file, large.by_file)
    for reads in (small, large):  # the EM checks its rows every 2 iterations on the CPU: at most 2 reads a check
        assert reads.by_file["gmm.py"] <= 1 + 2 * math.ceil(100 / 2), reads.by_file
    assert "engine.py" not in small.by_file  # no float() of a loss in the step


def test_metrics_reach_the_host_in_one_piece_and_a_non_finite_loss_stops_the_run():
    metrics = {"loss": torch.tensor(1.5), "num_pos": torch.tensor(7), "lr": 0.01, "step_ms": 3.2}
    with HostReads() as reads:
        host = on_host(metrics, 5)
    assert host == {"loss": 1.5, "num_pos": 7, "lr": 0.01, "step_ms": 3.2} and isinstance(host["num_pos"], int)
    assert reads.total() <= 1   # one transfer for every tensor
    with pytest.raises(FloatingPointError, match="step 9: loss_box is nan; lower train.lr"):
        on_host({"loss": torch.tensor(2.0), "loss_box": torch.tensor(float("nan"))}, 9)


def test_the_mask_free_giou_loss_is_torchvisions_value_for_value():
    """`trainer.losses.giou_loss` replaces torchvision's (which indexes by a mask: four reads a call) and must give
    the same bits: overlapping, disjoint, touching, identical and zero-area boxes."""
    from torchvision.ops import generalized_box_iou_loss

    from trainer.losses import giou_loss

    g = torch.Generator().manual_seed(0)
    xy1, xy2 = torch.rand(5000, 2, generator=g) * 100, torch.rand(5000, 2, generator=g) * 100
    wh1, wh2 = torch.rand(5000, 2, generator=g) * 60, torch.rand(5000, 2, generator=g) * 60
    wh1[::7] = 0                                  # zero area
    a, b = torch.cat([xy1, xy1 + wh1], 1), torch.cat([xy2, xy2 + wh2], 1)
    b[::5] = a[::5]                               # identical
    b[1::9] = torch.cat([a[1::9, 2:], a[1::9, 2:] + 5], 1)   # touching at a corner
    with HostReads() as reads:
        ours = giou_loss(a, b)
    assert torch.equal(ours, generalized_box_iou_loss(a, b, reduction="none")) and reads.total() == 0

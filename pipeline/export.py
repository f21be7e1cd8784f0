"""`lad export`: a checkpoint's network as ONNX or TorchScript, for serving without this project's training code.

The exported graph is the network: uint8 (or float 0-255) images [B, 3, H, W] in, normalisation inside, and the
raw head outputs out, flattened level after level as in training:

    cls_logits [B, A, C]    box_deltas [B, A, 4]    iou_logits [B, A]

Batch size and input size are free (H and W multiples of 32). What stays in Python, because it is data-dependent
control flow: the anchors for the input's pyramid shape (`trainer.anchors.make_anchors`), decoding, the score
sqrt(cls x IoU), per-class NMS, PAA's score voting and the top-k (`trainer.inference.postprocess_image`).
docs/export.md shows the few lines that do it.

A `<file>.json` beside the export holds what those lines need: strides, octave base scale, input size, inference
settings and the categories. Every export is checked before it is kept: the exported model's outputs on a random
batch must match PyTorch's within `TOLERANCE`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from schemas.config import RunConfig
from schemas.files import atomic_write_text
from trainer.checkpoint import CheckpointError, checkpoint_network, load_checkpoint
from trainer.model import PAADetector

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # largest absolute difference allowed between exported and PyTorch outputs (seen: ~4e-6)
OUTPUTS = ("cls_logits", "box_deltas", "iou_logits")


class ExportedNetwork(nn.Module):
    """The detector with plain tensor outputs (a dataclass does not cross ONNX or TorchScript)."""

    def __init__(self, model: PAADetector):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images)
        return out.cls_logits, out.box_deltas, out.iou_logits


def example_shape(cfg: RunConfig) -> tuple[int, int]:
    """(H, W) of the example input, padded to a multiple of 32 (the exported network takes such sides): the square
    input size, or a landscape image of a [long, short] pair."""
    size = cfg.data.input_size
    long, short = (size, size) if isinstance(size, int) else size
    return -(-short // 32) * 32, -(-long // 32) * 32


def _export_onnx(net: nn.Module, example: Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError:
        raise CheckpointError("--format onnx needs the onnx packages: pip install 'lad[export]'") from None
    from torch.export import Dim

    dims = {"images": {0: Dim("batch", min=1, max=1024), 2: 32 * Dim("h32", min=1, max=128),
                       3: 32 * Dim("w32", min=1, max=128)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(net, (example,), dynamo=True, input_names=["images"], output_names=list(OUTPUTS),
                                    dynamic_shapes=dims, verbose=False)
    program.save(str(path))


def _run_onnx(path: Path, images: Tensor) -> list[Tensor]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError("checking the ONNX export needs onnxruntime: pip install 'lad[export]'") from None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(a) for a in session.run(None, {"images": images.numpy()})]


def _export_torchscript(net: nn.Module, example: Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; its files still load
        traced = torch.jit.trace(net, example)
    traced.save(str(path))


def export_checkpoint(checkpoint: str, out: str, fmt: str = "onnx", network: str = "a") -> dict:
    """Export `network` of `checkpoint` to `out` in `fmt`, check it against PyTorch, write `out` + `.json`.
    Returns {"path", "sidecar", "max_abs_diff", "shape"}."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    ckpt = load_checkpoint(checkpoint)
    cfg = RunConfig.model_validate(ckpt["config"])
    model_cfg = cfg.model if network == "a" else cfg.model_b
    net = ExportedNetwork(checkpoint_network(ckpt, checkpoint, network)).eval()
    h, w = example_shape(cfg)
    gen = torch.Generator().manual_seed(0)
    example = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=gen)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    check = torch.randint(0, 256, (1, 3, h // 2 // 32 * 32 or 32, w), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        expected = net(check)
        if fmt == "onnx":
            _export_onnx(net, example, tmp)
            got = _run_onnx(tmp, check)
        else:
            _export_torchscript(net, example, tmp)
            got = list(torch.jit.load(str(tmp))(check))
    diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
    if diff > TOLERANCE:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the {fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE:g}); nothing written")
    tmp.replace(path)
    sidecar = path.with_name(path.name + ".json")
    atomic_write_text(sidecar, json.dumps({
        "format": fmt, "checkpoint": str(checkpoint), "network": network, "step": int(ckpt.get("step", 0)),
        "inputs": {"images": "uint8 or float 0-255, [B, 3, H, W], H and W multiples of 32"},
        "outputs": list(OUTPUTS), "input_size": cfg.data.input_size, "strides": model_cfg.strides,
        "octave_base_scale": model_cfg.octave_base_scale, "inference": cfg.inference.model_dump(),
        "categories": ckpt.get("categories"), "checked_max_abs_diff": diff}, indent=1))
    return {"path": str(path), "sidecar": str(sidecar), "max_abs_diff": diff, "shape": [h, w]}

"""`lad eval`: evaluate the network(s) of a checkpoint on a COCO file and write the stats as JSON."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.coco import load_coco
from pipeline.validate import evaluate_network
from schemas.config import RunConfig
from trainer.anchors import make_anchors
from schemas.files import atomic_write_text
from trainer.checkpoint import CheckpointError, load_checkpoint, load_model_weights
from trainer.engine import pick_device
from trainer.model import build_model


def evaluate_checkpoint(checkpoint: str, data: str, *, image_root: str | None = None, networks: str = "both",
                        out: str | None = None, device: str = "auto", progress: bool = True) -> dict[str, dict]:
    """Returns {network: stats}; `networks` is 'a', 'b' or 'both' (every network the checkpoint holds)."""
    ckpt = load_checkpoint(checkpoint)
    cfg = RunConfig.model_validate(ckpt["config"])
    held = sorted(ckpt["models"])
    names = held if networks == "both" else [networks]
    for n in names:
        if n not in held:
            raise CheckpointError(f"{checkpoint}: holds networks {held}; there is no network {n!r}")
    dataset = load_coco(data, image_root)
    if len(dataset.categories) != cfg.model.num_classes:
        raise CheckpointError(f"{checkpoint}: trained for {cfg.model.num_classes} classes but {data} has "
                              f"{len(dataset.categories)} categories")
    dev = pick_device(device)
    cache: dict = {}

    def anchors_fn(level_sizes):
        key = tuple(level_sizes)
        if key not in cache:
            cache[key] = make_anchors(list(level_sizes), cfg.model.strides, cfg.model.octave_base_scale, device=dev)
        return cache[key]

    results = {}
    for n in names:
        model = build_model(cfg.model if n == "a" else cfg.model_b)
        load_model_weights(model, ckpt["models"][n], checkpoint, f"network {n.upper()}")
        stats, _ = evaluate_network(model.to(dev), anchors_fn, dataset, cfg.data.input_size, cfg.inference, dev,
                                    progress)
        results[n] = stats
    out_path = Path(out) if out else Path(checkpoint).with_suffix(".eval.json")
    atomic_write_text(out_path, json.dumps({"checkpoint": str(checkpoint), "data": str(data),
                                            "step": int(ckpt.get("step", 0)), "results": results}, indent=1))
    return results

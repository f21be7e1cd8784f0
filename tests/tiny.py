"""Tiny runs for the tests and bench/pipeline.py (importable as `tests.tiny`; pyproject puts the repo root on
sys.path, and the bench script puts it there itself): a small digits dataset, an (untrained) teacher checkpoint in
the format `lad train` writes, and a config that trains on them in seconds on a CPU."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from schemas.config import RunConfig, config_from_dict


def make_data(root: str | Path, *, image_size: int = 64, num_train: int = 24, num_val: int = 8,
              shapes: Optional[list] = None) -> Path:
    """The built-in digits dataset at a small size (cached: made once per directory)."""
    from pipeline.digits import make_digits

    root = Path(root)
    if not (root / "train.json").exists():
        make_digits(str(root), image_size=image_size, shapes=shapes, num_train=num_train, num_val=num_val,
                    progress=False)
    return root


def tiny_config(data: str | Path, out: str | Path, *, mode: str = "lad", teacher: Optional[str] = None,
                input_size=64, overrides: Optional[list[str]] = None, **sections) -> RunConfig:
    """A run that takes seconds: ResNet-18 with narrow FPN/head, 1 intra-op thread (deterministic across
    processes), logging every step. `sections` update top-level config sections, e.g. train={"max_steps": 4}."""
    data = Path(data)
    raw = {
        "name": f"tiny_{mode}", "mode": mode, "seed": 0, "output_dir": str(out),
        "data": {"train": str(data / "train.json"), "val": str(data / "val.json"), "input_size": input_size},
        "model": {"depth": 18, "fpn_levels": [3, 4], "fpn_channels": 16, "head_convs": 1, "head_channels": 16},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "log_every": 1,
                  "checkpoint_every": 1000, "eval_every": 0, "threads": 1, "device": "cpu"},
        "pipeline": {"cpus_per_worker": 0.5, "cpus_per_assigner": 0.5, "cpus_per_read_task": 0.25},
    }
    if teacher:
        raw["teacher"] = {"checkpoint": str(teacher)}
    for key, value in sections.items():
        raw.setdefault(key, {})
        raw[key].update(value)
    return config_from_dict(raw, "tiny config", overrides)


def make_teacher(cfg: RunConfig, path: str | Path, seed: int = 123, depth: Optional[int] = None) -> Path:
    """An untrained network saved as `lad train` saves a checkpoint (same anchors, input size, classes);
    `depth` makes it a different ResNet than the student's (LAD's teachers are the larger network)."""
    from trainer.checkpoint import save_checkpoint
    from trainer.engine import Engine

    path = Path(path)
    if path.exists():
        return path
    tcfg = cfg.model_copy(deep=True)
    tcfg.mode, tcfg.seed = "paa", seed
    tcfg.teacher.checkpoint = None
    if depth:
        tcfg.model.depth = depth
    engine = Engine(tcfg, "cpu", 1)
    save_checkpoint(path, {"config": tcfg.to_dict(), **engine.state(), "epoch": 0,
                           "progress": {"epoch": 0, "trained_ids": []}, "best": {"AP": 0.0, "step": 0}})
    return path

"""Checkpoints: written whole or not at all (never half a file), read with `weights_only=True`, checked strictly;
locally or on object storage (`schemas.storage`).

A checkpoint is a plain dict: {"format", "version", "config" (the resolved run config), "models" {"a": state dict,
"b": ... for CoLAD}, "optimizer", "scheduler", "step", "epoch", "progress" (ids trained this epoch), "best"}.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

import torch

from schemas.config import ModelConfig, RunConfig
from schemas.files import atomic_write
from schemas.storage import Location

FORMAT = "lad-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the difference."""


def save_checkpoint(path: "str | Path | Location", payload: dict[str, Any]) -> None:
    """Write whole or not at all: on any failure the previous file at `path` is untouched (locally a temporary
    file renamed over it; on object storage one upload of the complete bytes). torch reports a short write (a full
    disk, a file-size limit) as an opaque RuntimeError; it is raised again as an OSError that says so."""
    path = Location(path)

    def failed(reason: str) -> str:
        where = "the store" if path.remote else f"the free space of {path.parent}"
        return f"{path}: writing the checkpoint failed ({reason}); the previous {path.name} is unchanged; check {where}"

    full = {"format": FORMAT, "version": VERSION, **payload}
    try:
        if path.remote:
            buffer = io.BytesIO()
            torch.save(full, buffer)
            path.write_bytes(buffer.getvalue())
        else:
            atomic_write(path.local, lambda f: torch.save(full, f))
    except OSError as e:
        raise OSError(e.errno, failed(e.strerror or str(e))) from e
    except RuntimeError as e:
        if not any(sign in str(e) for sign in ("inline_container", "PytorchStreamWriter", "unexpected pos")):
            raise  # not the write: e.g. something in the payload that cannot be saved
        raise OSError(failed(str(e).splitlines()[0][:160])) from e


def load_checkpoint(path: "str | Path | Location", map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Location(path)
    try:
        source = io.BytesIO(path.read_bytes()) if path.remote else path.local
        if not path.remote and not path.local.is_file():
            raise FileNotFoundError
    except (FileNotFoundError, IsADirectoryError):
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e})") from None
    try:
        ckpt = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint written by `lad train` (no '{FORMAT}' format marker)")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} is not supported (need {VERSION})")
    for key in ("config", "models"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: checkpoint lacks '{key}'")
    return ckpt


def compatibility_problems(teacher: RunConfig, teacher_model: ModelConfig, student: RunConfig) -> list[str]:
    """Differences that would make a teacher's assignment meaningless for this student (anchors, input, classes)."""
    problems = []
    s = student.model
    if teacher_model.num_classes != s.num_classes:
        problems.append(f"num_classes: teacher {teacher_model.num_classes}, student {s.num_classes}")
    if teacher_model.fpn_levels != s.fpn_levels:
        problems.append(f"anchors: teacher FPN levels {teacher_model.fpn_levels}, student {s.fpn_levels}")
    if teacher_model.octave_base_scale != s.octave_base_scale:
        problems.append(f"anchors: teacher octave_base_scale {teacher_model.octave_base_scale}, "
                        f"student {s.octave_base_scale}")
    if teacher.data.input_size != student.data.input_size:
        problems.append(f"input size: teacher {teacher.data.input_size}, student {student.data.input_size}")
    return problems


def _built(model_cfg: ModelConfig, state: dict, path: str | Path, which: str) -> torch.nn.Module:
    """The network `model_cfg` describes, holding `state` (`load_state_dict(strict=True)`, with a message that
    lists the missing and unexpected keys). The weights replace everything: the backbone's `pretrained` file is
    neither needed nor read, so a checkpoint trained from one works on any machine."""
    from trainer.model import build_model

    model = build_model(model_cfg.model_copy(update={"pretrained": None}))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{len(keys)} {kind} (e.g. {keys[:shown]})" for keys, kind, shown in
             ((missing, "missing keys", 3), (unexpected, "unexpected keys", 3), (shape, "shape mismatches", 2)) if keys]
    if parts:
        raise CheckpointError(f"{path}: network {which.upper()} weights do not fit the configured network: "
                              + "; ".join(parts))
    model.load_state_dict(state, strict=True)
    return model


def checkpoint_network(ckpt: dict, path: str | Path, which: str = "a"):
    """Network `which` of a loaded checkpoint, built from its own config and holding its weights (its backbone's
    `pretrained` file is not read). For `lad eval`, `lad predict` and `lad export`."""
    cfg = RunConfig.model_validate(ckpt["config"])
    if which not in ckpt["models"]:
        raise CheckpointError(f"{path}: holds networks {sorted(ckpt['models'])}; there is no network {which!r}")
    return _built(cfg.model if which == "a" else cfg.model_b, ckpt["models"][which], path, which)


def load_network(path: str | Path, student: RunConfig, which: str = "a", device: str | torch.device = "cpu",
                 categories: Optional[list] = None, warn: bool = True):
    """Build the network a checkpoint describes and load it strictly, refusing one whose anchors, input size or
    classes differ from `student`'s. With `categories` (the student's, in class order) its classes are matched to
    them by name: reordered when the names come in another order, refused when they differ
    (`trainer.categories`). Returns (model, its ModelConfig, the checkpoint's step)."""
    return _network_from(load_checkpoint(path), path, student, which, device, categories, warn)


def _network_from(ckpt: dict, path: str | Path, student: RunConfig, which: str, device,
                  categories: Optional[list] = None, warn: bool = True):
    from trainer.categories import CategoryMismatch, permutation, permute_classes

    tcfg = RunConfig.model_validate(ckpt["config"])
    tmodel = tcfg.model_b if which == "b" else tcfg.model
    problems = compatibility_problems(tcfg, tmodel, student)
    if problems:
        raise CheckpointError(f"{path}: network {which.upper()} does not match this run: " + "; ".join(problems))
    if which not in ckpt["models"]:
        raise CheckpointError(f"{path}: checkpoint holds networks {sorted(ckpt['models'])}, not {which!r}")
    state = ckpt["models"][which]
    if categories is not None:
        try:
            state = permute_classes(state, permutation(ckpt.get("categories"), categories,
                                                       f"{path} (network {which.upper()})", warn))
        except CategoryMismatch as e:
            raise CheckpointError(str(e)) from None
    return _built(tmodel, state, path, which).to(device), tmodel, int(ckpt.get("step", 0))


ARCHITECTURE = ("depth", "num_classes", "fpn_levels", "fpn_channels", "head_convs", "head_channels",
                "octave_base_scale")


def load_colearn_side(path: str | Path, cfg: RunConfig, side: str, categories: Optional[list] = None,
                      warn: bool = True):
    """CoLAD network `side` ("a" or "b") initialised from a checkpoint: the network the run's config describes
    (`model` or `colearn.model_b`, which the run's own checkpoints and `lad eval` rebuild), so the checkpoint's
    network must have that architecture. A CoLAD checkpoint gives its network of the same side; any other its A."""
    ckpt = load_checkpoint(path)
    which = side if len(ckpt["models"]) > 1 and side in ckpt["models"] else "a"
    tcfg = RunConfig.model_validate(ckpt["config"])
    held = tcfg.model_b if which == "b" else tcfg.model
    wanted, field = (cfg.model, "model") if side == "a" else (cfg.model_b, "colearn.model_b")
    diff = [f"{field}.{k}: checkpoint {getattr(held, k)}, config {getattr(wanted, k)}"
            for k in ARCHITECTURE if getattr(wanted, k) != getattr(held, k)]
    if diff:
        raise CheckpointError(f"{path}: its network {which.upper()} is not the configured network "
                              f"{side.upper()}: " + "; ".join(diff) + f" (set {field} to match the checkpoint)")
    return _network_from(ckpt, path, cfg, which, "cpu", categories, warn)[0]

"""In-process training: one process reads the data, assigns labels and trains (the reference for every mode).

Resumable: `checkpoints/last.pt` records the step, the epoch and the image ids already trained in that epoch,
so a resumed run trains each remaining image of the epoch exactly once and none twice.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline.coco import CocoDataset, load_coco
from pipeline.dataset import DetectionDataset, collate
from pipeline.rundir import RunDir
from pipeline.validate import evaluate_network
from schemas.config import ConfigError, RunConfig
from trainer.checkpoint import load_checkpoint, save_checkpoint
from trainer.engine import Engine, pick_device


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and leaves with state 'stopped'."""

    def __init__(self):
        self.flag = False

    def install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self._set)
        except ValueError:  # not the main thread (e.g. inside a Ray actor): nothing to install
            pass

    def _set(self, *_):
        self.flag = True


@dataclass
class Datasets:
    train: CocoDataset
    val: CocoDataset | None


def load_datasets(cfg: RunConfig) -> Datasets:
    train = load_coco(cfg.data.train, cfg.data.image_root)
    val = load_coco(cfg.data.val, cfg.data.image_root) if cfg.data.val else None
    n = len(train.categories)
    if n != cfg.model.num_classes:
        raise ConfigError(f"{cfg.data.train}: has {n} categories but model.num_classes is "
                          f"{cfg.model.num_classes}; set --set model.num_classes={n}")
    return Datasets(train, val)


def epoch_order(num_images: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled image order of an epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def total_steps(cfg: RunConfig, num_images: int, workers: int = 1) -> int:
    """Optimizer steps of the run: each step takes one batch of `train.batch_size` per worker."""
    per_epoch = math.ceil(num_images / (cfg.train.batch_size * workers))
    steps = per_epoch * cfg.train.epochs
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy with every path resolved here, on the driver: Ray workers may run in another directory."""
    cfg = cfg.model_copy(deep=True)
    fields = [(cfg.data, "train"), (cfg.data, "val"), (cfg.data, "image_root"), (cfg.teacher, "checkpoint"),
              (cfg.model, "pretrained"), (cfg.colearn, "checkpoint_a"), (cfg.colearn, "checkpoint_b")]
    if cfg.colearn.model_b is not None:
        fields.append((cfg.colearn.model_b, "pretrained"))
    for obj, key in fields:
        value = getattr(obj, key)
        if value:
            setattr(obj, key, str(Path(value).resolve()))
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    return cfg


def prepare_run(cfg: RunConfig, workers: int = 1) -> tuple[RunConfig, Datasets, RunDir, int]:
    """What every Ray training driver does first: absolute paths, validated datasets, the run directory (config
    written), and the run's step count. Returns (cfg with absolute paths, datasets, run dir, total steps)."""
    cfg = absolute_paths(cfg)
    data = load_datasets(cfg)
    run = RunDir(cfg.run_dir)
    run.create(cfg)
    return cfg, data, run, total_steps(cfg, len(data.train.records), workers)


def to_device(batch: dict, device: torch.device):
    images = batch["images"].to(device, non_blocking=True)
    boxes = [b.to(device) for b in batch["boxes"]]
    labels = [lab.to(device) for lab in batch["labels"]]
    return images, boxes, labels


def checkpoint_payload(engine: Engine, cfg: RunConfig, epoch: int, trained: list[int], best: dict) -> dict:
    return {"config": cfg.to_dict(), **engine.state(), "epoch": epoch,
            "progress": {"epoch": epoch, "trained_ids": list(trained)}, "best": best}


def evaluate_all(engine: Engine, cfg: RunConfig, val: CocoDataset, device, progress: bool) -> dict[str, dict]:
    """COCO stats of every network the run trains ('a', and 'b' in CoLAD)."""
    return {name: evaluate_network(net, engine.anchors, val, cfg.data.input_size, cfg.inference, device,
                                   progress)[0]
            for name, net in engine.networks().items()}


def evaluate_and_keep_best(engine: Engine, cfg: RunConfig, val: CocoDataset, device, run: RunDir, epoch: int,
                           best: dict, say=None, progress: bool = False) -> tuple[dict[str, dict], dict]:
    """End-of-epoch evaluation shared by every training loop: COCO stats of each network go to eval.json, `say`
    (if given) prints them, and best.pt is rewritten when network A's AP improved. Returns (stats, best)."""
    last_eval = evaluate_all(engine, cfg, val, device, progress)
    for name, stats in last_eval.items():
        run.add_eval({"epoch": epoch, "step": engine.step_count, "network": name, "stats": stats})
    if say is not None:
        say(f"epoch {epoch} step {engine.step_count}: " + ", ".join(
            f"{n.upper()} AP {s['AP']:.3f} AP50 {s['AP50']:.3f}" for n, s in last_eval.items()))
    if last_eval["a"]["AP"] > best["AP"]:
        best = {"AP": last_eval["a"]["AP"], "step": engine.step_count}
        save_checkpoint(run.best, checkpoint_payload(engine, cfg, epoch + 1, [], best))
    return last_eval, best


def train(cfg: RunConfig, *, progress: bool = True, resume: bool = True) -> dict:
    """Train `cfg` in this process; returns the last evaluation ({network: stats}) or {}."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    data = load_datasets(cfg)
    run = RunDir(cfg.run_dir)
    run.create(cfg)
    n_images = len(data.train.records)
    steps = total_steps(cfg, n_images)
    engine = Engine(cfg, device, steps)
    start_epoch, trained, best = 0, [], {"AP": -1.0, "step": 0}
    if resume and run.last.exists():
        ckpt = load_checkpoint(run.last)
        engine.load_state(ckpt)
        start_epoch, trained, best = ckpt["progress"]["epoch"], list(ckpt["progress"]["trained_ids"]), ckpt["best"]
        run.truncate_metrics(engine.step_count)
    stop = StopRequested()
    stop.install()
    run.set_progress("running", engine.step_count, steps, start_epoch)
    dataset = DetectionDataset(data.train, cfg.data.input_size, train=True, seed=cfg.seed,
                               flip_prob=cfg.data.flip_prob)
    ids = np.array([r.image_id for r in data.train.records])
    bar = tqdm(total=steps, initial=engine.step_count, desc=f"{cfg.mode} {cfg.name}", disable=not progress,
               dynamic_ncols=True)
    last_eval = {e["network"]: e["stats"] for e in run.read_evals()}  # a finished run resumed reports its last
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, cfg.train.epochs):
            if engine.step_count >= steps:
                break
            dataset.set_epoch(epoch)
            done = set(trained)
            order = [int(i) for i in epoch_order(n_images, cfg.seed, epoch) if int(ids[i]) not in done]
            loader = DataLoader(dataset, batch_size=cfg.train.batch_size, sampler=order, collate_fn=collate,
                                num_workers=cfg.data.num_workers, persistent_workers=False)
            t_wait = time.perf_counter()
            for batch in loader:
                data_wait_ms = (time.perf_counter() - t_wait) * 1000
                policy = run.requested_policy()
                if policy and engine.mode == "colad" and policy != engine.policy.name:
                    engine.set_policy(policy)
                    run.log({"step": engine.step_count, "event": "policy", "policy": policy})
                t0 = time.perf_counter()
                result = engine.step(*to_device(batch, device))
                step_ms = (time.perf_counter() - t0) * 1000
                trained.extend(batch["image_ids"].tolist())
                m = result.metrics
                record = {"step": engine.step_count, "epoch": epoch, **m, "step_ms": round(step_ms, 2),
                          "data_wait_ms": round(data_wait_ms, 2),
                          "images_per_s": round(len(batch["image_ids"]) / max(step_ms + data_wait_ms, 1e-6) * 1e3, 2)}
                if engine.step_count % cfg.train.log_every == 0 or engine.step_count == 1:
                    run.log(record)
                    run.set_progress("running", engine.step_count, steps, epoch)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", refresh=False)
                if engine.step_count % cfg.train.checkpoint_every == 0:  # mid-epoch: trained ids make resume exact
                    epoch_full = len(trained) >= n_images
                    save_checkpoint(run.last, checkpoint_payload(engine, cfg, epoch + int(epoch_full),
                                                                 [] if epoch_full else trained, best))
                if stop.flag or engine.step_count >= steps:
                    break
                t_wait = time.perf_counter()
            epoch_done = not stop.flag and len(trained) >= n_images
            if stop.flag:
                save_checkpoint(run.last, checkpoint_payload(engine, cfg, epoch, trained, best))
                run.set_progress("stopped", engine.step_count, steps, epoch)
                return last_eval
            finished = engine.step_count >= steps
            due = cfg.train.eval_every and (epoch + 1) % cfg.train.eval_every == 0
            if data.val is not None and (finished or due):
                last_eval, best = evaluate_and_keep_best(engine, cfg, data.val, device, run, epoch, best,
                                                         say=bar.write, progress=progress)
            if epoch_done:
                trained = []
            if finished:
                save_checkpoint(run.last, checkpoint_payload(engine, cfg, epoch + int(epoch_done), trained, best))
                break
    except BaseException as e:
        run.set_progress("failed", engine.step_count, steps, epoch, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        bar.close()
    if not run.best.exists():
        save_checkpoint(run.best, checkpoint_payload(engine, cfg, epoch + 1, [], best))
    run.set_progress("succeeded", engine.step_count, steps, epoch)
    return last_eval

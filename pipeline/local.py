"""In-process training (`pipeline.engine: local`), and what every engine shares about one process's networks.

The loop is `pipeline.loop.train_loop`; this module gives it batches from a torch DataLoader over the run's plan
and a `NetworkStepper` that runs `trainer.engine.Engine.step` (every mode, labels assigned in-process). The same
stepper, with the co-learning coordinator as its control, is co-learning `inline` on Ray.
"""
from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from pipeline.coco import CocoDataset, load_coco
from pipeline.dataset import DetectionDataset
from pipeline.loop import (Batch, Collective, Start, Stepped, Stepper, plan_run,
                           read_start, total_steps, train_loop, write_commit)
from pipeline.validate import predict_array, score
from schemas.config import ConfigError, RunConfig, recipe_deviations
from schemas.modes import mode_spec
from schemas.policy import RolePolicy
from schemas.rundir import RunDir
from schemas.storage import absolute
from trainer.categories import CategoryMismatch
from trainer.colad import count_metrics, zero_counts
from trainer.engine import Engine, pick_device
from trainer.network import check_start
from pipeline.transforms import idle_canvas
from trainer.worker import ActiveMean, NullBatch, StreamSpec, null_batch


# ------------------------------------------------------------------------------------------------ run set-up

@dataclass
class Datasets:
    train: CocoDataset
    val: CocoDataset | None


def load_datasets(cfg: RunConfig) -> Datasets:
    train = load_coco(cfg.data.train, cfg.data.image_root)
    n = len(train.categories)
    if n != cfg.model.num_classes:
        raise ConfigError(f"{cfg.data.train}: has {n} categories but model.num_classes is "
                          f"{cfg.model.num_classes}; set --set model.num_classes={n}")
    return Datasets(train, load_val(cfg, train.categories))


def load_val(cfg: RunConfig, categories: list[dict]) -> CocoDataset | None:
    """The validation file, scored in the training categories' class order (`categories`), matched by name: a file
    that numbers them otherwise is scored right, one with other categories refused before training starts."""
    if not cfg.data.val:
        return None
    what = f"data.train {cfg.data.train} (validating on data.val {cfg.data.val})"
    try:
        return load_coco(cfg.data.val, cfg.data.val_root).in_class_order(categories, what)
    except CategoryMismatch as e:
        raise ConfigError(str(e)) from None


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """A copy with every path resolved here, on the driver: Ray workers may run in another directory."""
    cfg = cfg.model_copy(deep=True)
    fields = [(cfg.data, "train"), (cfg.data, "val"), (cfg.data, "image_root"),
              (cfg.data, "val_image_root"), (cfg.teacher, "checkpoint"), (cfg.pipeline, "assignment_store"),
              (cfg.model, "pretrained"), (cfg.colearn, "checkpoint_a"), (cfg.colearn, "checkpoint_b")]
    if cfg.colearn.model_b is not None:
        fields.append((cfg.colearn.model_b, "pretrained"))
    for obj, key in fields + [(cfg, "output_dir")]:
        value = getattr(obj, key)
        if value:
            setattr(obj, key, absolute(value))
    return cfg


@contextlib.contextmanager
def prepare_run(cfg: RunConfig, workers: int = 1) -> Iterator[tuple[RunConfig, Datasets, RunDir, int]]:
    """What every driver does first, before any process starts: absolute paths, validated datasets and starting
    checkpoints, the run directory (its lock taken, config and categories written), the run's step count. The
    run directory stays held until the `with` block ends."""
    cfg = absolute_paths(cfg)
    deviations = recipe_deviations(cfg)
    if deviations:
        print(f"warning: train.recipe is official, but these fields are set to other values and keep them: "
              f"{', '.join(deviations)}", file=sys.stderr)
    data = load_datasets(cfg)
    check_start(cfg, data.train.categories)
    run = RunDir(cfg.run_dir)
    run.claim()
    try:
        run.create(cfg)
        run.write_categories(data.train.categories)  # every checkpoint of the run carries them
        for loaded in (data.train, data.val):  # what loading repaired, never silently; after every check, so an
            if loaded is not None and loaded.report.repaired:  # error is still the one line
                print(f"note: {loaded.report.summary()}", file=sys.stderr)
        yield cfg, data, run, total_steps(cfg, len(data.train.records), workers)
    finally:
        run.release()


# ------------------------------------------------------------------------------------------------ batches

def planned_batches(cfg: RunConfig, train: CocoDataset, start: Start, total: int, rank: int = 0,
                    world: int = 1) -> Iterator[Batch]:
    """This rank's batches of the rest of the run (`pipeline.loop.plan_run`), decoded by a DataLoader."""
    dataset = DetectionDataset(train, cfg.data.input_size, train=True, seed=cfg.seed, flip_prob=cfg.data.flip_prob)
    image_ids = [r.image_id for r in train.records]
    wide = [r.width >= r.height for r in train.records]
    for epoch, steps in plan_run(cfg, image_ids, start.epoch, start.trained_ids, total - start.step, world, wide):
        dataset.set_epoch(epoch)
        mine = [step[rank] for step in steps if rank < len(step)]
        for b in DataLoader(dataset, batch_sampler=mine, collate_fn=dataset.collate, num_workers=cfg.data.num_workers):
            yield Batch(epoch, b["image_ids"].tolist(), b)


def to_device(batch, device: torch.device):
    """(images, GT boxes, GT labels) on the device, from a DataLoader batch or a decoded stream batch (there)."""
    if not isinstance(batch, dict):
        return batch.images, batch.gt_boxes, batch.gt_labels
    return (batch["images"].to(device, non_blocking=True), [b.to(device) for b in batch["boxes"]],
            [lab.to(device) for lab in batch["labels"]])


def idle_batch(cfg: RunConfig, device: torch.device, *, hard: bool, soft: bool) -> NullBatch:
    """What a rank without a batch steps on, so every DDP rank takes the same steps (the hook discards its gradient)."""
    spec, canvas = StreamSpec.of(cfg), idle_canvas(cfg.data.input_size)
    return null_batch(canvas, spec.num_anchors(canvas), spec.num_classes, device, hard=hard, soft=soft)


def data_parallel(engine, device: torch.device, world: int, modules=("forward_a", "forward_b")) -> ActiveMean:
    """Wrap the engine's networks in DDP (world > 1) with the gradient mean over the ranks that had a batch."""
    hook = ActiveMean()
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        engine.wrap(lambda m: DDP(m, device_ids=[device.index] if device.type == "cuda" else None))
        for name in modules:
            if getattr(engine, name, None) is not None:
                hook.register(getattr(engine, name))
    return hook


def rank_zero_buffers(net: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), the ones its checkpoint holds. DDP
    broadcasts them at the start of each forward, so after a step each rank still has those its own batch
    moved; a rank predicting its shard of an evaluation must use rank 0's."""
    if world > 1:
        import torch.distributed as dist

        for buffer in net.buffers():
            dist.broadcast(buffer, src=0)


# ------------------------------------------------------------------------------------------------ the stepper

class RunControl:
    """In-process control: SIGTERM (the loop checkpoints before its next step and leaves with state 'stopped'),
    and the role policy the control plane writes to control/roles.json."""

    def __init__(self, run: RunDir, colad: bool):
        self.run, self.colad, self.stopped = run, colad, False
        with contextlib.suppress(ValueError):  # not the main thread: whoever runs us handles signals
            signal.signal(signal.SIGTERM, self._stop)

    def _stop(self, *_) -> None:
        self.stopped = True

    def poll(self) -> tuple[bool, Optional[int]]:
        request = self.run.new_roles_request() if self.colad else None
        try:
            code = RolePolicy.parse(request["policy"]).code if request else None
        except ValueError:  # a hand-written bad file: the control plane validates its own
            code = None
        return self.stopped, code

    def applied(self, step_index: int, name: str) -> None:
        self.run.log({"step": step_index, "event": "policy", "policy": name})

    def record(self, step: int, epoch: int, policy: str, counts: dict) -> None:
        """Role statistics of a step: in-process they are in metrics.jsonl only."""


class Evaluating:
    """Evaluation and rank 0's commit for engines that hold every network in one process: each rank predicts its
    shard of the validation images with every network, rank 0 scores them and records."""

    def predict(self, shard):
        out = {}
        for name, net in self.engine.networks().items():
            rank_zero_buffers(net, shard[1])
            out[name] = predict_array(net, self.engine.anchors, self.val, self.cfg.data.input_size,
                                      self.cfg.inference, self.device, shard=shard)
        return out

    def commit(self, epoch, last, best, *, detections, final):
        evals = {name: score(self.val, dets)[0] for name, dets in detections.items()} if detections else None
        return evals, write_commit(self.run, self.cfg, self.engine.state(), self.engine.step_count, epoch, last,
                                   best, evals, final)


class NetworkStepper(Evaluating, Stepper):
    """`Engine.step` on each batch (labels assigned in-process). In CoLAD the role counts of every rank are summed
    before the teacher ratios are logged, and a policy change applies on every rank from the same step."""

    def __init__(self, cfg: RunConfig, run: RunDir, engine: Engine, device: torch.device, val, control,
                 collective: Collective = Collective()):
        self.cfg, self.run, self.engine, self.device, self.val = cfg, run, engine, device, val
        self.control, self.collective = control, collective
        self.colad = mode_spec(cfg.mode).co_learning
        self.hook = data_parallel(engine, device, collective.world)
        self.idle = idle_batch(cfg, device, hard=False, soft=False)

    def poll(self):
        return self.control.poll()

    def set_policy(self, code: int) -> None:
        name = RolePolicy.from_code(code).name
        if self.colad and name != self.engine.policy.name:
            self.engine.set_policy(name)
            if self.collective.rank == 0:
                self.control.applied(self.engine.step_count, name)

    def step(self, batch: Optional[Batch], num_active: int, epoch: int) -> Stepped:
        self.hook.set(batch is not None, num_active)
        images, boxes, labels = to_device(batch.data if batch is not None else self.idle, self.device)
        result = self.engine.step(images, boxes, labels)
        record = dict(result.metrics)
        if self.colad:  # the role counts of every rank, summed, give the step's teacher ratios
            counts = result.extra["counts"] if batch is not None else zero_counts(len(self.cfg.model.fpn_levels))
            flat = self.collective.reduce([x for v in counts.values() for x in v] + [int(record["num_pos"])], "SUM")
            summed = iter(flat)
            counts = {k: [next(summed) for _ in v] for k, v in counts.items()}
            record.update(count_metrics(counts), num_pos=flat[-1])
            if self.collective.rank == 0:
                self.control.record(self.engine.step_count, epoch, self.engine.policy.name, counts)
        return Stepped(record, result.labels)


# ------------------------------------------------------------------------------------------------ the driver

def train(cfg: RunConfig, *, progress: bool = True, resume: bool = True, observers: tuple = ()) -> dict:
    """Train `cfg` in this process; returns the last evaluation ({network: stats}) or {}."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    with prepare_run(cfg) as (cfg, data, run, steps):
        start = read_start(run, resume)
        engine = Engine(cfg, device, steps)
        if start.resumed:
            engine.load_state(start.checkpoint)
            start.checkpoint = None
        stepper = NetworkStepper(cfg, run, engine, device, data.val, RunControl(run, mode_spec(cfg.mode).co_learning))
        run.set_progress("running", engine.step_count, steps, start.epoch)
        try:
            out = train_loop(cfg, stepper, planned_batches(cfg, data.train, start, steps), start, total=steps,
                             num_images=len(data.train.records), has_val=data.val is not None, progress=progress,
                             bar=True, observers=tuple(observers))
        except BaseException as e:
            run.fail(f"{type(e).__name__}: {e}")
            raise
        run.set_progress(out.state, out.step, steps, out.epoch)
        return out.eval

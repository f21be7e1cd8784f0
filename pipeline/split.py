"""Co-learning on Ray: the two ways its workers are given control and take a step.

inline (`colearn.mode: inline`, the default): one worker group; every worker holds both networks and runs
`Engine.step` (`pipeline.local.NetworkStepper`, as in-process). Rank 0 reads the coordinator's policy and stop
flag each step from a long poll (`CoordinatorControl`), and the loop's one per-step collective gives every rank
the same policy from the same step.

split (`colearn.mode: split`): two worker groups, one per network, each with its own DDP group and resources. Both
plan the same batches (the plan is a pure function of the config), so rank r of A and rank r of B see the same
images in the same order. Per step each side scores its candidates (`SideEngine.score`), sends them sparse to the
coordinator (`exchange`), trains on the common assignment it gets back, and exchanges per-parameter gradient norms
(`finish`: the clip is over both networks, as in-process). The coordinator writes the run directory: metrics lines
from both halves, eval.json, and checkpoints merged to the in-process layout.
"""
from __future__ import annotations

import time
from typing import Optional

import ray
import torch

from pipeline.colearn import PolicyWatch
from pipeline.local import Evaluating, data_parallel, idle_batch, to_device
from pipeline.loop import Batch, Collective, Stepped, Stepper
from pipeline.validate import score
from schemas.config import RunConfig
from schemas.policy import RolePolicy
from schemas.rundir import RunDir
from trainer.colad import SideEngine, side_metrics, to_sparse
from trainer.worker import sparse_to_labels


class CoordinatorControl:
    """Inline co-learning's control: the coordinator's policy and stop flag, and where role statistics go."""

    def __init__(self, coordinator, run: RunDir):
        self.coordinator, self.run = coordinator, run
        self.watch = PolicyWatch(coordinator)

    def poll(self) -> tuple[bool, Optional[int]]:
        state = self.watch.poll()
        return bool(state["stop"]), RolePolicy.parse(state["policy"]).code

    def applied(self, step_index: int, name: str) -> None:
        self.run.log({"step": step_index, "event": "policy", "policy": name})
        self.coordinator.applied.remote(step_index, name)

    def record(self, step: int, epoch: int, policy: str, counts: dict) -> None:
        self.coordinator.record.remote(step, epoch, policy, counts)


class SplitStepper(Evaluating, Stepper):
    """One network of the pair (side 'a' or 'b'); the coordinator merges, freezes the policy and commits. Each side
    predicts its group's shard of the validation images with its own network (`Evaluating.predict`)."""

    def __init__(self, cfg: RunConfig, run: RunDir, side: str, engine: SideEngine, device, val, coordinator,
                 collective: Collective = Collective()):
        from pipeline.assigner import StreamSpec

        self.cfg, self.run, self.side, self.engine, self.device, self.val = cfg, run, side, engine, device, val
        self.coordinator, self.rank = coordinator, collective.rank
        self.hook = data_parallel(engine, device, collective.world, modules=("forward",))
        self.spec = StreamSpec.of(cfg)
        self.idle = idle_batch(cfg, device, hard=True, soft=False)
        self.stop_next = False

    def poll(self):
        """The stop flag the coordinator froze for the previous step (both groups stop after the same step)."""
        return self.stop_next, None

    def step(self, batch: Optional[Batch], num_active: int, epoch: int) -> Stepped:
        self.hook.set(batch is not None, num_active)
        images, boxes, labels = to_device(batch.data if batch is not None else self.idle, self.device)
        step_index = self.engine.step_count
        t0 = time.perf_counter()
        scored = self.engine.score(images, boxes, labels)
        t1 = time.perf_counter()
        if batch is not None:
            res = ray.get(self.coordinator.exchange.remote(step_index, self.rank, self.side,
                                                           to_sparse(scored, batch.image_ids, boxes, labels)))
            pos, gt, ign = zip(*res["assignment"])
            common = sparse_to_labels(list(pos), list(gt), list(ign), labels,
                                      self.spec.num_anchors(images.shape[-2:]), self.spec.num_classes, self.device)
        else:
            common = self.idle.labels
        t2 = time.perf_counter()
        losses = self.engine.loss(scored, common, boxes)
        norms = self.engine.backward(sum(losses.values()))
        t3 = time.perf_counter()
        fin = ray.get(self.coordinator.finish.remote(
            step_index, self.rank, self.side, norms.cpu().numpy() if norms is not None else None,
            {"epoch": epoch}))
        t4 = time.perf_counter()
        as_tensor = (lambda x: torch.from_numpy(x) if x is not None else None)
        self.engine.apply(as_tensor(fin["norms_a"]), as_tensor(fin["norms_b"]))
        self.stop_next = bool(fin["stop"])
        if batch is None:
            return Stepped(None)
        record = side_metrics(self.side, losses, scored)
        record.update(lr=self.engine.lr, forward_ms=round((t1 - t0) * 1e3, 3),
                      exchange_ms=round((t2 - t1) * 1e3, 3), backward_ms=round((t3 - t2) * 1e3, 3),
                      finish_ms=round((t4 - t3) * 1e3, 3))
        return Stepped(record, common)

    def log(self, record: dict, total: int) -> None:
        """The coordinator writes the step's line once both halves are in."""
        self.coordinator.log_side.remote(record["step"] - 1, self.side, {**record, "total_steps": total})

    def commit(self, epoch, last, best, *, detections, final):
        """Both sides' rank 0 meet at the coordinator with their states (and evaluations)."""
        ev = score(self.val, detections[self.side])[0] if detections else None
        part = {"state": self.engine.state(), "epoch": epoch, "eval": ev, "final": final,
                "last": {"epoch": last[0], "trained_ids": list(last[1])}}
        best = ray.get(self.coordinator.sync.remote(self.engine.step_count, self.side, part))["best"]
        return ({self.side: ev} if ev is not None else None), best

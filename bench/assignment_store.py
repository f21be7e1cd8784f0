"""LAD through the assigner pool with and without the assignment store, side by side in one process on one local
Ray (`pipeline.engine: ray`, the same data, networks and seed):

    live       no store: the teacher labels every batch of every epoch
    store      an empty store at the start: the first epoch fills it, later epochs ask only for new views
    prefilled  `lad assign` first (timed apart), then the run asks the teacher nothing

Per run and epoch: teacher actors alive (most, and at the epoch's end: with a store the pool grows while the
teacher is busy and lets idle actors go), images the teacher labelled, the student's step (step_ms: forward, backward, update, on labels
that arrive ready), the time it waited for data, and wall time (their sum over the epoch's steps). Also the store's
bytes per view. Networks are untrained (the cost of labelling does not depend on training). Prints a table and
writes JSON (--out).

    python bench/assignment_store.py                       # digits 128 px, 96 images, batch 8, 4 epochs, R34 -> R18
    python bench/assignment_store.py --images 192 --epochs 6 --assigners 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny import make_data, make_teacher, tiny_config  # noqa: E402

NETWORK = ["model.fpn_levels=[3,4,5]", "model.fpn_channels=64", "model.head_channels=64", "model.head_convs=2"]


def run_config(args, data: Path, out: Path, teacher: Path, name: str, store: Path | None):
    cfg = tiny_config(data, out, mode="lad", teacher=str(teacher), input_size=args.input_size,
                      overrides=NETWORK, train={"epochs": args.epochs, "batch_size": args.batch, "eval_every": 0,
                                                "checkpoint_every": 10_000, "threads": None},
                      pipeline={"engine": "ray", "cpus_per_worker": 1.0, "assigners": args.assigners,
                                "cpus_per_assigner": 0.5 / args.assigners, "cpus_per_read_task": 0.25})
    cfg.name = name
    cfg.pipeline.assignment_store = str(store) if store else None
    return cfg


def stored_views(store: Path) -> int:
    import pyarrow as pa

    total = 0
    for part in (store / "parts").glob("*.arrow") if (store / "parts").exists() else []:
        try:
            total += pa.ipc.open_file(pa.memory_map(str(part))).read_all().num_rows
        except (pa.ArrowInvalid, OSError):  # being written or merged
            pass
    return total


class ActorWatch:
    """Samples, twice a second, the teacher actors alive and the epoch the run's metrics have reached."""

    def __init__(self, cfg):
        self.metrics, self.seen, self.stop = cfg.run_dir / "metrics.jsonl", {}, threading.Event()
        self.store = Path(cfg.pipeline.assignment_store) if cfg.pipeline.assignment_store else None
        self.stored: dict = {}  # epoch -> views in the store when last sampled
        self.thread = threading.Thread(target=self.watch, daemon=True)

    def watch(self):
        from ray.util.state import list_actors

        while not self.stop.wait(0.5):
            try:
                lines = self.metrics.read_text().splitlines() if self.metrics.exists() else []
                epoch = json.loads(lines[-1]).get("epoch", 0) if lines else 0
                alive = sum(1 for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000,
                                                   raise_on_missing_output=False)
                            if "TeacherAssigner" in (a.class_name or ""))
            except (OSError, ValueError):
                continue
            self.seen.setdefault(epoch, []).append(alive)
            if self.store is not None:
                self.stored[epoch] = stored_views(self.store)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def of(self, epoch: int) -> str:
        counts = self.seen.get(epoch, [0])
        return f"{max(counts)}/{counts[-1]}"


def per_epoch(cfg) -> list[dict]:
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    out = []
    for epoch in sorted({r["epoch"] for r in records}):
        rs = [r for r in records if r["epoch"] == epoch]
        out.append({"epoch": epoch, "teacher_images": sum(r["teacher_images"] for r in rs),
                    "images": sum(r["batch_images"] for r in rs),
                    "step_ms": round(statistics.median(r["step_ms"] for r in rs), 1),
                    "data_wait_ms": round(statistics.median(r["data_wait_ms"] for r in rs), 1),
                    "wall_s": round(sum(r["step_ms"] + r["data_wait_ms"] + r.get("control_ms", 0) for r in rs) / 1e3,
                                    2)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--input-size", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--teacher-depth", type=int, default=34)
    p.add_argument("--assigners", type=int, default=2, help="the pool's most actors (0.5 CPU shared among them)")
    p.add_argument("--out", default="bench/results/assignment_store.json")
    args = p.parse_args()

    import ray
    import torch

    from pipeline.prefill import fill_store
    from pipeline.ray_driver import train
    from pipeline.ray_env import init_local

    work = Path(tempfile.mkdtemp(prefix="lad-store-bench-"))
    data = make_data(work / "data", image_size=args.input_size, num_train=args.images, num_val=8)
    base = run_config(args, data, work / "runs", work / "teacher.pt", "base", None)
    teacher = make_teacher(base, work / "teacher.pt", depth=args.teacher_depth)
    init_local(num_cpus=os.cpu_count(), object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    results, threads = {}, torch.get_num_threads()
    try:
        for name, store in (("live", None), ("store", work / "store"), ("prefilled", work / "prefilled")):
            cfg = run_config(args, data, work / "runs", teacher, name, store)
            prefill_s = None
            if name == "prefilled":
                t0 = time.perf_counter()
                fill_store(cfg, progress=False)
                prefill_s = round(time.perf_counter() - t0, 2)
            t0 = time.perf_counter()
            with ActorWatch(cfg) as actors:
                train(cfg, progress=False)
            torch.set_num_threads(threads)
            epochs = [dict(e, teacher_actors=actors.of(e["epoch"]), stored_views=actors.stored.get(e["epoch"]))
                      for e in per_epoch(cfg)]
            results[name] = {"run_s": round(time.perf_counter() - t0, 2), "prefill_s": prefill_s, "epochs": epochs}
            if store:
                parts = list((store / "parts").glob("*.arrow"))
                import pyarrow as pa

                views = sum(pa.ipc.open_file(pa.memory_map(str(x))).read_all().num_rows for x in parts)
                results[name].update(store_views=views, store_bytes=sum(x.stat().st_size for x in parts),
                                     store_bytes_per_view=round(sum(x.stat().st_size for x in parts) / views, 1))
    finally:
        ray.shutdown()
    out = {"command": "python bench/assignment_store.py " + " ".join(sys.argv[1:]), "args": vars(args),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "ray": ray.__version__, "results": results}
    print(f"{'run':<10} {'epoch':>5} {'actors':>7} {'teacher imgs':>12} {'stored':>7} {'step ms':>8} {'wait ms':>8} "
          f"{'wall s':>7}")
    for name, r in results.items():
        for e in r["epochs"]:
            print(f"{name:<10} {e['epoch']:>5} {e['teacher_actors']:>7} {e['teacher_images']:>12} "
                  f"{e['stored_views'] if e['stored_views'] is not None else '-':>7} {e['step_ms']:>8} "
                  f"{e['data_wait_ms']:>8} {e['wall_s']:>7}")
        extra = f", prefill {r['prefill_s']} s" if r["prefill_s"] is not None else ""
        size = f", store {r['store_bytes_per_view']} B/view" if "store_bytes_per_view" in r else ""
        print(f"{name:<10} whole run {r['run_s']} s{extra}{size}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

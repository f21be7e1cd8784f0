"""Co-learning measurements (docs/results.md, "Co-learning"; numbers -> bench/results/colearn.json).

    python bench/colearn.py steps [--steps 24] [--input-size 128] [--batch-size 8]
        inline vs split step cost through Ray on the built-in digits, networks of configs/colad_digits.yaml
        (A ResNet-18, B ResNet-34): inline with 1 and 2 torch threads, split with one 1-thread worker per network.
    python bench/colearn.py poll [--n 20000]
        what the per-step policy check costs a trainer (`PolicyWatch.poll`), and how long a PUT's roles.json
        takes to reach it (file poll + long-poll answer).
    python bench/colearn.py plot RUN_DIR [--out docs/colearn_teacher_ratio.png] [--window 10]
        the teacher ratio over training, per FPN level and per object size, from a run's metrics.jsonl.

Runs on a private local Ray (`num_cpus` = the machine's cores), shut down at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results" / "colearn.json"


def _save(key: str, value: dict) -> None:
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data[key] = value
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")


def _median(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def _config(data: Path, out: Path, name: str, mode: str, steps: int, input_size: int, batch: int, threads: int,
            cpus: float):
    from schemas.config import load_config

    return load_config(ROOT / "configs" / "colad_digits.yaml", [
        f"name={name}", f"output_dir={out}", f"data.train={data / 'train.json'}", f"data.val={data / 'val.json'}",
        f"data.input_size={input_size}", f"train.batch_size={batch}", f"train.max_steps={steps}",
        "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=100000", f"train.threads={threads}",
        "train.device=cpu", "pipeline.engine=ray", f"pipeline.cpus_per_worker={cpus}", f"colearn.mode={mode}"])


def cmd_steps(args) -> None:
    import ray

    from pipeline.ray_driver import train
    from pipeline.ray_env import init_local

    data = Path(args.data)
    if not (data / "train.json").exists():
        sys.exit(f"{data}/train.json not found: run `lad data digits --out {data}` first")
    out = Path(tempfile.mkdtemp(prefix="bench-colearn-"))
    cases = [("inline, 1 worker x 1 thread", "inline", 1, 1.0), ("inline, 1 worker x 2 threads", "inline", 2, 1.0),
             ("split, A 1 thread + B 1 thread", "split", 1, 1.0)]
    results = {}
    init_local(num_cpus=os.cpu_count())
    try:
        for label, mode, threads, cpus in cases:
            cfg = _config(data, out, f"{mode}{threads}", mode, args.steps, args.input_size, args.batch_size,
                          threads, cpus)
            t0 = time.perf_counter()
            train(cfg, progress=False)
            wall = time.perf_counter() - t0
            lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
            lines = [m for m in lines if "loss" in m][args.warmup:]
            row = {"step_ms": _median(m["step_ms"] for m in lines), "images_per_s": _median(m["images_per_s"]
                                                                                             for m in lines),
                   "steps_measured": len(lines), "run_wall_s": round(wall, 1)}
            if mode == "inline":
                row.update({k: _median(m.get(k) for m in lines) for k in ("forward_ms", "assign_ms", "backward_ms",
                                                                          "control_ms")})
            else:
                for side in "ab":
                    row.update({f"{k}_{side}": _median(m.get(f"{k}_{side}") for m in lines)
                                for k in ("forward_ms", "exchange_ms", "backward_ms", "finish_ms", "step_ms")})
                summary = json.loads((cfg.run_dir / "colearn.json").read_text())
                row["coordinator_merge_ms_mean"] = round(summary.get("merge_ms_mean", 0.0), 2)
            results[label] = row
            print(f"{label:34s} " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)
    payload = _payload_bytes(data, args.input_size, args.batch_size)
    print(f"split exchange payload: {payload}")
    _save("steps", {"machine": f"{os.cpu_count()} CPUs", "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
                    "input_size": args.input_size, "batch_size": args.batch_size, "steps": args.steps,
                    "warmup_steps_skipped": args.warmup, "networks": "A ResNet-18, B ResNet-34 (colad_digits.yaml)",
                    "cases": results, "exchange_payload": payload})


def _payload_bytes(data: Path, input_size: int, batch: int) -> dict:
    """Bytes a side sends per step (pickled sparse candidate losses + GT) against dense [A] losses."""
    import torch

    from pipeline.coco import load_coco
    from pipeline.dataset import DetectionDataset
    from schemas.config import load_config
    from trainer.colad import SideEngine, to_sparse

    cfg = load_config(ROOT / "configs" / "colad_digits.yaml", [f"data.input_size={input_size}"])
    ds = DetectionDataset(load_coco(str(data / "train.json")), input_size, train=False)
    batch_ = ds.collate([ds[i] for i in range(batch)])
    side = SideEngine(cfg, "a")
    with torch.no_grad():
        scored = side.score(batch_["images"], batch_["boxes"], batch_["labels"])
    sparse = to_sparse(scored, batch_["image_ids"].tolist(), batch_["boxes"], batch_["labels"])
    n_cand = sum(len(im["anchor"]) for im in sparse["images"])
    return {"images": batch, "anchors_per_image": int(scored.anchors.shape[0]), "candidates": n_cand,
            "sparse_bytes": len(pickle.dumps(sparse)), "dense_losses_bytes": 4 * batch * int(scored.anchors.shape[0])}


def cmd_poll(args) -> None:
    import ray

    from pipeline.colearn import PolicyWatch, get_or_create
    from pipeline.ray_env import init_local
    from schemas.config import config_from_dict
    from schemas.rundir import RunDir

    out = Path(tempfile.mkdtemp(prefix="bench-colearn-poll-"))
    cfg = config_from_dict({"name": "poll", "mode": "colad", "output_dir": str(out)})
    cfg.run_dir.mkdir(parents=True)
    init_local(num_cpus=os.cpu_count())
    try:
        coordinator = get_or_create(cfg, "auto")
        watch = PolicyWatch(coordinator)
        t0 = time.perf_counter()
        for _ in range(args.n):
            watch.poll()
        poll_us = (time.perf_counter() - t0) / args.n * 1e6
        latencies, pickup_ms = [], []
        for i in range(args.changes):
            policy = "pin-b" if i % 2 == 0 else "pin-a"
            t0 = time.perf_counter()
            RunDir(cfg.run_dir).request_roles(policy)   # what PUT /runs/{id}/roles does
            while watch.poll()["policy"] != policy:
                time.sleep(0.0005)
            latencies.append((time.perf_counter() - t0) * 1e3)
            t1 = time.perf_counter()
            watch.poll()
            pickup_ms.append((time.perf_counter() - t1) * 1e3)
            time.sleep(0.02)
        # the blocking alternative, for comparison: one ray.get per step
        t0 = time.perf_counter()
        for _ in range(200):
            ray.get(coordinator.control.remote())
        get_ms = (time.perf_counter() - t0) / 200 * 1e3
        row = {"poll_us_per_step": round(poll_us, 3), "roles_json_to_trainer_ms_median": _median(latencies),
               "roles_json_to_trainer_ms_max": round(max(latencies), 2), "changes": args.changes,
               "blocking_ray_get_ms_per_step": round(get_ms, 3), "file_poll_interval_ms": 50}
        print(json.dumps(row, indent=1))
        _save("poll", row)
        ray.kill(coordinator)
    finally:
        ray.shutdown()
        shutil.rmtree(out, ignore_errors=True)


def _series(run: Path) -> tuple[list[int], list[dict]]:
    """Per step role counts: from the coordinator's colearn.json (Ray runs), else rebuilt from metrics.jsonl ratios
    (in-process runs log ratios only: each step then weighs 1 per level, a coarser smoothing)."""
    path = run / "colearn.json"
    if path.exists():
        steps = json.loads(path.read_text())["steps"]
        if steps and "counts" in steps[0]:
            return [s["step"] for s in steps], [s["counts"] for s in steps], True
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "teacher_ratio" in m and "loss" in m]
    counts = []
    for m in lines:
        lv = [r for r in m["teacher_ratio_by_level"]]
        sz = [(m.get("teacher_ratio_by_size") or {}).get(k) for k in ("small", "medium", "large")]
        counts.append({"taught_level": [r or 0.0 for r in lv], "defined_level": [0 if r is None else 1 for r in lv],
                       "taught_size": [r or 0.0 for r in sz], "defined_size": [0 if r is None else 1 for r in sz]})
    return [m["step"] for m in lines], counts, False


def cmd_plot(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import yaml

    run = Path(args.run_dir)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    steps, counts, exact = _series(run)
    levels = cfg["model"]["fpn_levels"]
    w = args.window

    def windowed(taught_key, defined_key, k):
        """Moving ratio over the last `w` steps: pairs B taught / pairs defined in the window (count-weighted)."""
        out = []
        for i in range(len(counts)):
            win = counts[max(0, i - w + 1):i + 1]
            t = sum(c[taught_key][k] for c in win)
            d = sum(c[defined_key][k] for c in win)
            out.append(t / d if d else None)
        return out

    total = [{"t": [sum(c["taught_level"])], "d": [sum(c["defined_level"])]} for c in counts]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    all_ratio = []
    for i in range(len(total)):
        win = total[max(0, i - w + 1):i + 1]
        d = sum(x["d"][0] for x in win)
        all_ratio.append(sum(x["t"][0] for x in win) / d if d else None)
    ax1.plot(steps, all_ratio, color="black", lw=2, label="all levels")
    pairs_level = [sum(c["defined_level"][k] for c in counts) for k in range(len(levels))]
    steps_with = [sum(1 for c in counts if c["defined_level"][k]) for k in range(len(levels))]
    for k, lv in enumerate(levels):
        label = f"P{lv} (stride {2 ** lv}): " + (f"{pairs_level[k]:g} (GT, level) pairs" if exact else
                                                  f"pairs in {steps_with[k]} of {len(steps)} steps")
        if steps_with[k] < len(steps) / 2:  # a sparse level: a moving ratio would jump between 0 and 1; show points
            pts = [(s, c["taught_level"][k] / c["defined_level"][k]) for s, c in zip(steps, counts)
                   if c["defined_level"][k]]
            ax1.scatter([x for x, _ in pts], [y for _, y in pts], s=14, alpha=0.7, label=label + " (per step)")
        else:
            ax1.plot(steps, windowed("taught_level", "defined_level", k), label=label)
    sizes = ("small", "medium", "large")
    pairs_size = [sum(c["defined_size"][k] for c in counts) for k in range(3)]
    for k, size in enumerate(sizes):
        if pairs_size[k]:
            ax2.plot(steps, windowed("taught_size", "defined_size", k),
                     label=f"{size}: {pairs_size[k]:g} pairs" if exact else size)
    for ax, title in ((ax1, "per FPN level"), (ax2, "per object size (GT area, COCO bounds)")):
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("step")
        ax.set_title(f"B taught / (GT, level) pairs, {title}", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax1.set_ylabel(f"teacher ratio, last {w} steps" + ("" if exact else " (mean of step ratios)"))
    ax1.set_ylim(-0.03, 1.03)
    a = cfg["model"]["depth"]
    b = ((cfg.get("colearn") or {}).get("model_b") or {}).get("depth", a)
    fig.suptitle(f"CoLAD on the built-in digits: A = ResNet-{a}, B = ResNet-{b}, policy "
                 f"{cfg['colearn']['policy']}, input {cfg['data']['input_size']}, batch {cfg['train']['batch_size']} "
                 f"({len(steps)} steps, run {run.name})", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)

    def ratio(part, key_t, key_d, k=None):
        t = sum(c[key_t][k] if k is not None else sum(c[key_t]) for c in part)
        d = sum(c[key_d][k] if k is not None else sum(c[key_d]) for c in part)
        return round(t / d, 3) if d else None

    q = max(1, len(counts) // 4)
    row = {"run": str(run), "steps": len(steps), "teacher_ratio": ratio(counts, "taught_level", "defined_level"),
           "first_quarter": ratio(counts[:q], "taught_level", "defined_level"),
           "last_quarter": ratio(counts[-q:], "taught_level", "defined_level"),
           "by_level": {f"P{lv}": ratio(counts, "taught_level", "defined_level", k) for k, lv in enumerate(levels)},
           "pairs_by_level": {f"P{lv}": pairs_level[k] for k, lv in enumerate(levels)},
           "by_size": {s: ratio(counts, "taught_size", "defined_size", k) for k, s in enumerate(sizes)},
           "pairs_by_size": dict(zip(sizes, pairs_size)), "count_weighted": exact, "plot": str(args.out)}
    summary = run / "colearn.json"
    if summary.exists():  # the coordinator's exact totals over the whole run
        totals = json.loads(summary.read_text()).get("totals") or {}
        row["coordinator_totals"] = {k: totals.get(k) for k in ("teacher_ratio", "by_level", "by_size", "counts")}
    if not exact:  # per-step ratios only: these are numbers of steps, and the ratios are means of step ratios
        row["steps_with_pairs_by_level"] = row.pop("pairs_by_level")
        row["steps_with_pairs_by_size"] = row.pop("pairs_by_size")
    print(json.dumps(row, indent=1))
    _save("teacher_ratio", row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps")
    s.add_argument("--data", default=str(ROOT / "data" / "digits"))
    s.add_argument("--steps", type=int, default=24)
    s.add_argument("--warmup", type=int, default=4)
    s.add_argument("--input-size", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.set_defaults(fn=cmd_steps)
    s = sub.add_parser("poll")
    s.add_argument("--n", type=int, default=20000)
    s.add_argument("--changes", type=int, default=20)
    s.set_defaults(fn=cmd_poll)
    s = sub.add_parser("plot")
    s.add_argument("run_dir")
    s.add_argument("--out", default=str(ROOT / "docs" / "colearn_teacher_ratio.png"))
    s.add_argument("--window", type=int, default=10)
    s.set_defaults(fn=cmd_plot)
    args = p.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()

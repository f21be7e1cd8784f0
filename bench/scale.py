"""A COCO-sized rehearsal of the assignment stream on this machine, and the cost of planning a long run.

    python bench/scale.py stream     # LAD at COCO size: R101 teacher -> R50 student, FPN P3-P7, input (1333, 800),
                                     # 640x480 / 480x640 images, 80 classes, 2 workers, 2 assigners, a few steps
    python bench/scale.py stream --device cuda --steps 20 --batch 8    # the same on GPUs
    python bench/scale.py plan       # driver RSS and time to the first step: 1 epoch x 1,000 images,
                                     # 1 x 120,000 and 12 x 120,000 (a generated COCO file; tiny networks)
    python bench/scale.py plan --repo ../old --out old.json    # the same for another checkout, side by side

`stream` prints, from the run's own metrics: object-store bytes per image per step (against the mean encoded
file), the peak backlog against its bound, the driver's peak RSS, the student's step breakdown and the time to
the first step. `plan` runs `lad train` as a subprocess, reads its peak RSS (/proc VmHWM) when the first step is
logged, then stops it with SIGTERM. Both write JSON to bench/results/ (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from schemas.config import config_from_dict  # noqa: E402

CLASSES = 80


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def coco_like(root: Path, num_train: int, num_val: int) -> Path:
    """The built-in dataset at COCO sizes (640x480 and 480x640 in turn), relabelled over 80 categories."""
    from pipeline.digits import make_digits

    if not (root / "train.json").exists():
        make_digits(str(root), shapes=[(640, 480), (480, 640)], digit_size=(40, 220), digits_per_image=(3, 9),
                    num_train=num_train, num_val=num_val, progress=True)
        for split in ("train", "val"):
            path = root / f"{split}.json"
            coco = json.loads(path.read_text())
            coco["categories"] = [{"id": c + 1, "name": f"class{c}"} for c in range(CLASSES)]
            for a in coco["annotations"]:  # digit d of image i -> class d + 10 * (i % 8): every class is used
                a["category_id"] = (a["category_id"] - 1) + 10 * (a["image_id"] % 8) + 1
            path.write_text(json.dumps(coco))
    return root


def first_record_timer(metrics: Path, started: float) -> dict:
    """Watch for the run's first logged step: seconds since `started` (a thread; read `out` after the run)."""
    out: dict = {}

    def watch():
        while "s" not in out:
            if metrics.exists() and metrics.stat().st_size > 0:
                out["s"] = time.perf_counter() - started
                return
            time.sleep(0.05)
            if out.get("stop"):
                return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return out


# ----------------------------------------------------------------------------------------------- stream

def run_stream(args) -> dict:
    import ray

    from pipeline.ray_driver import train
    from pipeline.ray_env import init_local
    from tests.tiny import make_teacher

    work = Path(args.work)
    data = coco_like(work / "data", args.images, 8)
    model = {"depth": 50, "fpn_levels": [3, 4, 5, 6, 7], "fpn_channels": 256, "head_convs": 4,
             "head_channels": 256, "num_classes": CLASSES, "norm": "gn" if args.device == "cpu" else "bn"}
    gpu = args.device == "cuda"
    raw = {"name": "scale", "mode": "lad", "output_dir": str(work / "runs"),
           "data": {"train": str(data / "train.json"), "val": str(data / "val.json"), "input_size": [1333, 800]},
           "model": model,
           "train": {"epochs": 1, "max_steps": args.steps, "batch_size": args.batch, "log_every": 1,
                     "eval_every": 0, "checkpoint_every": 10_000, "device": args.device,
                     "threads": None if gpu else 1},
           "pipeline": {"engine": "ray", "num_workers": args.workers, "assigners": args.assigners,
                        "cpus_per_worker": 1 if gpu else 0.4, "cpus_per_assigner": 2 if gpu else 0.4,
                        "cpus_per_read_task": 0.1, "gpus_per_worker": 1 if gpu else 0,
                        "gpus_per_assigner": 1 if gpu else 0}}
    teacher = make_teacher(config_from_dict({**raw, "mode": "paa"}, "bench/scale.py"),
                           work / f"teacher_r101_{model['norm']}.pt", depth=101)
    cfg = config_from_dict({**raw, "teacher": {"checkpoint": str(teacher)}}, "bench/scale.py")
    metrics = cfg.run_dir / "metrics.jsonl"
    if cfg.run_dir.exists():
        import shutil
        shutil.rmtree(cfg.run_dir)
    init_local()
    started = time.perf_counter()
    timer = first_record_timer(metrics, started)
    train(cfg, progress=False)
    wall = time.perf_counter() - started
    ray.shutdown()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    files = [os.path.getsize(data / im["file_name"])
             for im in json.loads((data / "train.json").read_text())["images"]]
    images = sum(r["images"] for r in steps) if "images" in steps[0] else args.steps * args.batch * args.workers
    created = max(r.get("object_store_created_bytes", 0) for r in steps)

    def med(key):
        values = [r[key] for r in steps[1:] if r.get(key) is not None] or [r[key] for r in steps if key in r]
        return round(statistics.median(values), 1) if values else None

    image_bytes = [r["image_bytes"] / r["batch_images"] for r in steps if r.get("batch_images")]
    return {
        "steps": len(steps), "images_trained": images, "mean_file_bytes": round(statistics.mean(files)),
        "stream_image_bytes_per_image": round(statistics.mean(image_bytes)) if image_bytes else None,
        "stream_image_bytes_vs_file": round(statistics.mean(image_bytes) / statistics.mean(files), 3)
        if image_bytes else None,
        "object_store_created_bytes_per_image": round(created / max(1, images)),
        "object_store_created_vs_file": round(created / max(1, images) / statistics.mean(files), 3),
        "payload_bytes_per_image": round(statistics.mean(r["payload_bytes"] / r["batch_images"] for r in steps
                                                         if r.get("batch_images"))),
        "peak_backlog": max(r.get("peak_backlog", 0) for r in steps), "backlog_bound": cfg.pipeline.batches_ahead,
        "object_store_peak_mb": round(max(r.get("object_store_peak_bytes", 0) for r in steps) / 2 ** 20, 1),
        "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        "time_to_first_step_s": round(timer.get("s", float("nan")), 1), "wall_s": round(wall, 1),
        "median_ms": {k: med(k) for k in ("step_ms", "data_wait_ms", "decode_ms", "assign_ms", "forward_ms",
                                          "backward_ms")},
        "canvas": sorted({tuple(r["canvas"]) for r in steps if r.get("canvas")}),
    }


# ----------------------------------------------------------------------------------------------- plan

def generated_coco(root: Path, num_images: int, source: Path) -> Path:
    """A COCO file of `num_images` entries over the few real images of `source` (planning needs no more)."""
    src = json.loads((source / "train.json").read_text())
    images, annotations = [], []
    by_image: dict = {}
    for a in src["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in range(num_images):
        im = src["images"][i % len(src["images"])]
        images.append({**im, "id": i + 1, "file_name": str(source / im["file_name"])})
        for a in by_image.get(im["id"], []):
            annotations.append({**a, "id": len(annotations) + 1, "image_id": i + 1})
    path = root / f"generated_{num_images}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": src["categories"]}))
    return path


def run_plan(args) -> dict:
    from pipeline.digits import make_digits

    work = Path(args.work)
    source = work / "plan_source"
    if not (source / "train.json").exists():
        make_digits(str(source), num_train=16, num_val=4, progress=False)
    out = {}
    repo = Path(args.repo).resolve()
    for epochs, num_images in ((1, 1_000), (1, 120_000), (12, 120_000)):
        coco = generated_coco(work, num_images, source)
        run_dir = work / "runs" / f"plan_{epochs}x{num_images}"
        if run_dir.exists():
            import shutil
            shutil.rmtree(run_dir)
        overrides = [f"data.train={coco}", "data.val=null", f"train.epochs={epochs}", "train.eval_every=0",
                     "train.log_every=1", "train.threads=1", "pipeline.engine=ray", f"output_dir={work / 'runs'}",
                     f"name=plan_{epochs}x{num_images}", "mode=paa", "model.fpn_channels=16",
                     "model.head_channels=16", "model.head_convs=1"]
        cmd = [sys.executable, "-m", "services.cli", "train", str(repo / "configs/paa_digits.yaml")]
        for o in overrides:
            cmd += ["--set", o]
        started = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(repo)}
        log = open(work / f"plan_{epochs}x{num_images}.log", "w+")
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        metrics = run_dir / "metrics.jsonl"
        rss = float("nan")
        while proc.poll() is None:
            rss = peak_rss_mb(proc.pid)
            if metrics.exists() and metrics.stat().st_size > 0:
                break
            time.sleep(0.05)
        first = time.perf_counter() - started
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
        log.seek(0)
        err = log.read()
        key = f"{epochs} epochs x {num_images} images"
        out[key] = {"time_to_first_step_s": round(first, 1), "driver_peak_rss_mb": round(rss, 1),
                    "exit": proc.returncode, "planned_batches": epochs * -(-num_images // 16)}
        print(key, out[key], flush=True)
        if proc.returncode not in (0, 130, 143) and not metrics.exists():
            print(err[-2000:], file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["stream", "plan"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=4, help="stream: training steps")
    ap.add_argument("--batch", type=int, default=1, help="stream: images per worker per step")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--assigners", type=int, default=2)
    ap.add_argument("--images", type=int, default=32, help="stream: training images to render")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lad_scale"))
    ap.add_argument("--repo", default=str(REPO), help="plan: the checkout whose `lad train` to measure (e.g. an "
                    "older commit's worktree, for a side-by-side comparison)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = run_stream(args) if args.what == "stream" else run_plan(args)
    import torch
    import ray
    meta = {"command": " ".join(["python", "bench/scale.py", *sys.argv[1:]]), "machine": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
            "device": args.device}
    print(json.dumps(result, indent=1))
    out = Path(args.out or REPO / f"bench/results/scale_{args.what}_{args.device}.json")
    out.write_text(json.dumps({**meta, "result": result}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

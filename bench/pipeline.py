"""The assigner service against the in-process steps, side by side in one run with the same models and batches:

    (a) bare     the student's step on precomputed assignments (Engine.step_on_labels): the limit
    (b) paa      the student-alone PAA step (the student scores and assigns its own candidates)
    (c) lad      the in-process LAD step (teacher forward + assignment inside the step)
    (d) service  LAD through the pipeline (Ray Data read tasks + TeacherAssigner pool + Ray Train worker),
                 once per pool size: per step, what the trainer sees (step + time blocked on the stream + decode)

plus the stream codec: assignment payload vs image bytes per image, encode + decode ms per image (hard, and soft
labels for kd at the configured picture quality with the KD-loss difference against dense). Data: the built-in
digits dataset (made under --data if missing); networks untrained (assignment cost does not depend on training),
or a trained teacher (--teacher-checkpoint).
Prints a table and writes JSON (--out).

    python bench/pipeline.py                                    # digits 128 px, batch 8, pools 1 and 2
    python bench/pipeline.py --input-size 256 --batch-size 16 --pool-sizes 1,2,4 --teacher-depth 50 --device cuda
    # the codec in COCO's layout, with a trained P3-P7 teacher (bench/soft_labels.py's docstring makes one)
    python bench/pipeline.py --data data/coco_digits --input-size 1333,800 --levels 3,4,5,6,7 --batch-size 2 \
        --teacher-checkpoint runs/teacher_p37/checkpoints/best.pt --skip-service --steps 1 --warmup 1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from bench.soft_labels import jpeg_bytes  # noqa: E402
from pipeline.assigner import StreamSpec, TeacherAssigner, load_row_pixels  # noqa: E402
from pipeline.plan_source import plan_table, records_table  # noqa: E402
from pipeline.loop import epoch_order, group_by_orientation, plan_batches  # noqa: E402
from pipeline.coco import load_coco  # noqa: E402
from pipeline.dataset import DetectionDataset  # noqa: E402
from tests.tiny import make_data, make_teacher, tiny_config  # noqa: E402
from schemas.assignment import batch_canvas, decode_table_rows  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.losses import soft_label_kd  # noqa: E402
from trainer.worker import decode_stream_batch  # noqa: E402


def median(xs):
    return round(statistics.median(xs), 3) if xs else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def input_size(text: str):
    """--input-size: N, or LONG,SHORT."""
    sizes = [int(v) for v in text.split(",")]
    return sizes[0] if len(sizes) == 1 else sizes


def bench_config(args, root: Path, mode: str, teacher=None, **sections):
    model = {"depth": args.student_depth, "fpn_levels": [int(x) for x in args.levels.split(",")],
             "fpn_channels": args.channels, "head_convs": 2, "head_channels": args.channels}
    train = {"batch_size": args.batch_size, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 10_000,
             "eval_every": 0, "threads": args.threads, "device": args.device, **sections.pop("train", {})}
    cfg = tiny_config(args.data, root / "runs", mode=mode, teacher=teacher, input_size=args.input_size,
                      model=model, train=train, **sections)
    cfg.data.val = None
    return cfg


def load_batches(cfg, n: int):
    coco = load_coco(cfg.data.train)
    ds = DetectionDataset(coco, cfg.data.input_size, train=True, seed=cfg.seed, flip_prob=cfg.data.flip_prob)
    order = [int(i) for i in epoch_order(len(coco.records), cfg.seed, 0)]
    if not isinstance(cfg.data.input_size, int):   # keep-ratio batches, as the pipeline plans them
        order = group_by_orientation(order, [r.width >= r.height for r in coco.records], cfg.train.batch_size)
    plan = plan_batches(order, cfg.train.batch_size, 1)[:n]
    return coco, plan, [ds.collate([ds[i] for i in b]) for b in plan]


def to(batch, device):
    return (batch["images"].to(device), [b.to(device) for b in batch["boxes"]],
            [lab.to(device) for lab in batch["labels"]])


def time_steps(fn, batches, warmup: int, device) -> list[float]:
    out = []
    for i, batch in enumerate(batches):  # noqa: B007
        sync(device)
        t0 = time.perf_counter()
        fn(batch)
        sync(device)
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1e3)
    return out


class InProcess:
    """(a), (b), (c) on the same batches. The variants take turns batch by batch, so that on a shared machine
    they see the same load; `bare_again` re-times (a) later (e.g. right after a service run) for its ratio."""

    def __init__(self, args, root, teacher, batches, device):
        from trainer.teacher import assign_hard

        self.args, self.batches, self.device = args, batches, device
        self.lad = Engine(bench_config(args, root, "lad", teacher), device, 1000)
        self.precomputed = []
        for b in batches:  # the teacher's assignments, made once (what the service delivers)
            images, boxes, labels = to(b, device)
            with torch.no_grad():
                tout = self.lad.teacher(images)
            anchors, nl = self.lad.anchors(tout.level_sizes)
            self.precomputed.append((images, boxes, assign_hard(self.lad.cfg, tout, anchors, nl, boxes, labels)))
        self.bare = Engine(bench_config(args, root, "lad", teacher), device, 1000, load_teacher=False)
        self.paa = Engine(bench_config(args, root, "paa"), device, 1000)

    def _bare(self, i):
        p = self.precomputed[i]
        self.bare.step_on_labels(p[0], p[1], p[2])

    def run(self) -> dict:
        fns = {"a_bare": self._bare, "b_paa": lambda i: self.paa.step(*to(self.batches[i], self.device)),
               "c_lad": lambda i: self.lad.step(*to(self.batches[i], self.device))}
        out = {k: [] for k in fns}
        for i in range(len(self.batches)):
            for name, fn in fns.items():
                sync(self.device)
                t0 = time.perf_counter()
                fn(i)
                sync(self.device)
                if i >= self.args.warmup:
                    out[name].append((time.perf_counter() - t0) * 1e3)
        return out

    def bare_again(self) -> list[float]:
        return time_steps(self._bare, range(len(self.batches)), self.args.warmup, self.device)


def codec(args, root, teacher, coco, plan) -> dict:
    """Bytes and ms per image of the stream, hard (lad) and soft (kd at the configured picture quality)."""
    out = {}
    for mode in ("lad", "kd"):
        quality = {"soft_label_quality": args.soft_quality} if args.soft_quality else {}
        cfg = bench_config(args, root, mode, teacher, pipeline=quality)
        spec = StreamSpec.of(cfg)
        assigner = TeacherAssigner(cfg.to_dict(), records_table(coco.records))
        assigned = assigner(plan_table(0, [plan[0]]))
        rows = decode_table_rows(assigned, spec.anchor_hash)
        num_anchors = spec.num_anchors(batch_canvas(assigned))
        n = len(rows)
        enc, dec = [], []
        from schemas.assignment import encode_batch
        for _ in range(args.codec_repeats):
            t0 = time.perf_counter()
            encode_batch(rows, spec.anchor_hash, num_anchors, spec.num_classes, spec.soft)
            enc.append((time.perf_counter() - t0) * 1e3 / n)
            t0 = time.perf_counter()
            sb = decode_stream_batch(assigned, spec, torch.device("cpu"), hard=mode == "lad", soft=mode == "kd",
                                     load_pixels=lambda r: load_row_pixels(r, spec.input_size))
            dec.append((time.perf_counter() - t0) * 1e3 / n)
        entry = {"payload_bytes_per_image": sb.payload_bytes / n, "image_bytes_per_image": sb.image_bytes / n,
                 "payload_pct_of_image": round(100 * sb.payload_bytes / sb.image_bytes, 3),
                 # encode: the Arrow batch from decoded rows (the pictures are drawn in the assigner, before);
                 # decode: the whole student side, the pictures included
                 "encode_ms_per_image": median(enc), "decode_ms_per_image": median(dec),
                 "encode_decode_ms_per_image": round(median(enc) + median(dec), 4)}
        if mode == "kd":
            entry["image_jpeg_q90_bytes_per_image"] = statistics.mean(jpeg_bytes(io.BytesIO(bytes(r.image_file)))
                                                                      for r in rows)
            entry["payload_pct_of_jpeg"] = round(100 * sb.payload_bytes / n / entry["image_jpeg_q90_bytes_per_image"], 3)
            engine = Engine(cfg, "cpu", 10)
            with torch.no_grad():
                images = sb.images
                tout = engine.teacher(images)
                anchors, _ = engine.anchors(tout.level_sizes)
                dense = engine.soft_targets(tout, anchors, sb.gt_boxes)
                s = engine.model(images)
                d = cfg.distill
                kw = dict(cls_weight=d.cls_weight, iou_weight=d.iou_weight, box_weight=d.box_weight, gamma=d.gamma)
                ld = soft_label_kd(s.cls_logits, s.box_deltas, s.iou_logits, dense, anchors, **kw)
                ls = soft_label_kd(s.cls_logits, s.box_deltas, s.iou_logits, sb.soft, anchors, **kw)
            entry["dense_fp32_soft_bytes_per_image"] = num_anchors * spec.num_classes * 4
            entry["kd_cls_dense"], entry["kd_cls_streamed"] = float(ld["kd_cls"]), float(ls["kd_cls"])
            entry["kd_cls_rel_diff"] = float((ls["kd_cls"] - ld["kd_cls"]) / ld["kd_cls"])
            entry["soft_quality"] = cfg.pipeline.soft_label_quality
        out[mode] = entry
    return out


def service(args, root, teacher, pool: int, steps: int) -> dict:
    from pipeline.ray_driver import train

    cfg = bench_config(args, root, "lad", teacher, train={"max_steps": steps, "epochs": 100},
                       pipeline={"engine": "ray", "assigners": pool, "num_workers": 1,
                                 "cpus_per_worker": args.cpus_per_worker, "cpus_per_assigner": args.cpus_per_assigner,
                                 "gpus_per_worker": args.gpus_per_worker, "gpus_per_assigner": args.gpus_per_assigner,
                                 "prefetch_batches": args.prefetch})
    cfg.name = f"service_pool{pool}"
    t0 = time.perf_counter()
    train(cfg, progress=False, resume=False)
    wall = time.perf_counter() - t0
    metrics = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    metrics = [m for m in metrics if m.get("step", 0) > args.warmup + 1]   # pipeline start-up is not a step
    per_step = [m["step_ms"] + m["data_wait_ms"] + m["decode_ms"] for m in metrics]
    return {"pool": pool, "steps_timed": len(metrics), "ms_per_step": median(per_step),
            "mean_ms_per_step": round(statistics.mean(per_step), 3) if per_step else None,
            "step_ms": median([m["step_ms"] for m in metrics]),
            "data_wait_ms": median([m["data_wait_ms"] for m in metrics]),
            "data_wait_ms_mean": round(statistics.mean([m["data_wait_ms"] for m in metrics]), 3) if metrics else None,
            "decode_ms": median([m["decode_ms"] for m in metrics]),
            "assign_ms": median([m["assign_ms"] for m in metrics]),
            "backlog": median([m["backlog"] for m in metrics]),
            "payload_bytes": median([m["payload_bytes"] for m in metrics]),
            "image_bytes": median([m["image_bytes"] for m in metrics]), "wall_s_incl_startup": round(wall, 1)}


def pool_throughput(args, root, teacher, coco, pool: int, batches: int) -> dict:
    """The teacher pool alone (no student): assigned batches per second once the pool is up, consumed by this
    process as fast as they come. On k free cores (or GPUs), k actors should give k times one actor's rate."""
    import ray

    from pipeline import ray_env
    from pipeline.loop import Start
    from pipeline.plan_source import PlanSource
    from pipeline.stream import build_dataset

    cfg = bench_config(args, root, "lad", teacher, pipeline={"assigners": pool, "num_workers": 1,
                                                             "cpus_per_assigner": args.cpus_per_assigner,
                                                             "gpus_per_assigner": args.gpus_per_assigner})
    ray_env.configure_data_context(ray_env.budget(cfg))
    source = PlanSource(cfg, [r.image_id for r in coco.records], Start(), batches,
                        [r.width >= r.height for r in coco.records])
    times = []
    for _ in build_dataset(cfg, source, ray.put(records_table(coco.records))).iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=4):
        times.append(time.perf_counter())
    skip = min(2 * pool, len(times) - 2)   # the first batches come while actors start
    rate = (len(times) - 1 - skip) / (times[-1] - times[skip]) if len(times) - 1 > skip else None
    return {"pool": pool, "batches": len(times), "batches_per_s": round(rate, 3) if rate else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="digits dataset dir (made if missing; default: a temp dir)")
    p.add_argument("--num-train", type=int, default=160, help="images when the dataset is made")
    p.add_argument("--input-size", type=input_size, default=128, help="data.input_size: N (a square canvas) or "
                   "LONG,SHORT (keep ratio, as COCO's 1333,800)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--levels", default="2,3,4", help="FPN levels (default 2,3,4: strides 4/8/16, as the digits "
                                                     "configs)")
    p.add_argument("--channels", type=int, default=64, help="FPN and head channels")
    p.add_argument("--student-depth", type=int, default=18)
    p.add_argument("--teacher-depth", type=int, default=34)
    p.add_argument("--steps", type=int, default=12, help="timed steps per variant (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pool-sizes", default="1,2", help="assigner pool sizes for (d)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (in-process variants and the service's GPUs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--cpus-per-assigner", type=float, default=0.5)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--gpus-per-assigner", type=float, default=0.0)
    p.add_argument("--prefetch", type=int, default=2, help="pipeline.prefetch_batches")
    p.add_argument("--soft-quality", type=int, default=None, help="pipeline.soft_label_quality (default: the "
                   "config's)")
    p.add_argument("--teacher-checkpoint", default=None, help="a trained teacher (e.g. `lad demo`'s "
                   "runs/demo/teacher_r34/checkpoints/best.pt, with --data runs/demo/data) instead of an untrained one: "
                   "soft-label sizes and the KD-loss error depend on what the teacher predicts")
    p.add_argument("--codec-repeats", type=int, default=20)
    p.add_argument("--skip-service", action="store_true", help="only (a)-(c) and the codec")
    p.add_argument("--out", default="bench/results/pipeline.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lad_bench_pipeline_"))
    try:
        return run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> int:
    square = args.input_size if isinstance(args.input_size, int) else args.input_size[1]
    args.data = str(make_data(args.data or root / "data", image_size=square, num_train=args.num_train,
                              num_val=8))
    device = torch.device(args.device)
    teacher = args.teacher_checkpoint or make_teacher(bench_config(args, root, "paa"), root / "teacher.pt",
                                                      depth=args.teacher_depth)
    n = args.warmup + args.steps
    cfg = bench_config(args, root, "lad", teacher)
    coco, plan, batches = load_batches(cfg, n)
    if len(batches) < n:
        raise SystemExit(f"{len(coco.records)} images make {len(batches)} batches; need {n}: raise --num-train")
    steps = InProcess(args, root, teacher, batches, device)
    res = steps.run()
    codec_res = codec(args, root, teacher, coco, plan)
    services = []
    if not args.skip_service:
        import ray

        from pipeline import ray_env
        ray_env.init_local(num_cpus=os.cpu_count())
        try:
            for pool in [int(x) for x in args.pool_sizes.split(",")]:
                try:
                    s = service(args, root, teacher, pool, n + 1)
                except ray_env.PipelineResourceError as e:
                    print(f"pool {pool}: skipped, {e}")
                    continue
                s["bare_ms_after"] = median(steps.bare_again())  # (a) again, under the load of this moment
                s["pool_alone"] = pool_throughput(args, root, teacher, coco, pool, n)
                services.append(s)
        finally:
            ray.shutdown()
    bare = median(res["a_bare"])
    for s in services:  # against the mean of (a) timed with the others and (a) timed right after this run
        s["bare_ms_ref"] = round((bare + s["bare_ms_after"]) / 2, 3)
        s["ratio_to_bare"] = round(s["ms_per_step"] / s["bare_ms_ref"], 3)
        # within the run, insensitive to the machine's load changing between variants: what the student waits
        # for beyond its own step (the step there is (a), run beside the assigners)
        s["ratio_to_own_step"] = round(s["ms_per_step"] / s["step_ms"], 3)
    rows = [(name, median(v), bare, None) for name, v in res.items()]
    rows += [(f"d_service_pool{s['pool']}", s["ms_per_step"], s["bare_ms_ref"], s["data_wait_ms"]) for s in services]
    print(f"\ninput {args.input_size}, batch {args.batch_size}, student R{args.student_depth}, teacher "
          f"R{args.teacher_depth}, device {device}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"{'variant':<20}{'ms/step':>10}{'x bare':>9}{'wait ms':>10}{'x own step':>12}")
    for name, ms, ref, wait in rows:
        own = next((f"{s['ratio_to_own_step']:12.3f}" for s in services if name.endswith(f"pool{s['pool']}")), "")
        print(f"{name:<20}{ms:>10.1f}{ms / ref:>9.2f}{'' if wait is None else f'{wait:10.1f}'}{own}")
    for s in services:
        pa_ = s["pool_alone"]
        print(f"pool {s['pool']} alone (no student): {pa_['batches_per_s']} batches/s"
              + (f" = {pa_['batches_per_s'] / services[0]['pool_alone']['batches_per_s']:.2f}x pool 1"
                 if pa_["batches_per_s"] and services[0]["pool_alone"]["batches_per_s"] else ""))
    for mode, c in codec_res.items():
        print(f"codec {mode}: payload {c['payload_bytes_per_image']:.0f} B/image = {c['payload_pct_of_image']:.2f}% "
              f"of the image ({c['image_bytes_per_image']:.0f} B); encode+decode {c['encode_decode_ms_per_image']:.3f}"
              f" ms/image" + (f"; {c['payload_pct_of_jpeg']:.1f}% of the image as JPEG q90; kd_cls "
                              f"{c['kd_cls_rel_diff']:+.2%} vs dense" if mode == "kd" else ""))
    result = {
        "args": vars(args), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "ms_per_step": {k: median(v) for k, v in res.items()}, "samples_ms": res,
        "ratio_to_bare": {k: round(median(v) / bare, 3) for k, v in res.items()} |
                         {f"d_service_pool{s['pool']}": s["ratio_to_bare"] for s in services},
        "service": services, "codec": codec_res,
    }
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Issue 20's comparison made again on this machine: MMDetection 3.3's PAA and LAD steps beside ours, interleaved.

The same random batches (bench/steps.py's `random_batch`: 512x512, batch 2, 3-12 GT boxes of 80 classes) go to
both sides, one step of each variant per round, each round starting one variant further along, so that load
changes on a shared machine hit every variant alike. MMDetection's side is its own configs
(`paa/paa_r50_fpn_1x_coco.py`, `lad/lad_r50-paa-r101_fpn_2xb8_coco_1x.py`: R50 student with frozen_stages 1 and
norm_eval, R101 teacher, P3-P7 x 256, 4 GN head convs) with random weights (its `init_weights`, the teacher's
too); a step is its `train_step` (data preprocessor, losses, backward, SGD), with a plain fp32 `OptimWrapper`
where the LAD config has an AMP one. It runs as configured (NCHW) and with its weights moved to NHWC, which its
configs cannot ask for. Ours is `Engine.step` with bench/steps.py's `--preset coco`, in NHWC memory (the default
`train.channels_last`) and in NCHW; it clips gradients at 35 (`train.grad_clip`) and MMDetection's configs do not.
fp32 on the CPU, 2 threads.

MMDetection wants mmcv 2.1, whose compiled ops have no wheel for this torch. Its CPU training path for these two
detectors calls none of them (focal loss takes its Python form off CUDA; NMS is for inference), so this bench
runs it on mmcv without ops ("mmcv-lite") and puts a stand-in for `mmcv._ext` in `sys.modules` whose every op
raises if called: a step that needed one would fail, not run differently. Set-up, in a venv beside the project:

    python -m venv --system-site-packages /tmp/mmenv && . /tmp/mmenv/bin/activate
    pip install wheel setuptools && pip download --no-deps --no-binary :all: mmcv==2.1.0 -d /tmp/mmsrc
    tar xzf /tmp/mmsrc/mmcv-2.1.0.tar.gz -C /tmp/mmsrc
    MMCV_WITH_OPS=0 pip install --no-build-isolation /tmp/mmsrc/mmcv-2.1.0 mmengine==0.10.7 terminaltables shapely scikit-learn
    pip install --no-deps mmdet==3.3.0
    python bench/mmdet_steps.py --steps 7 --out bench/results/mmdet_steps.json
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from steps import PRESETS, random_batch, shared_config  # noqa: E402

from bench.report import write_results  # noqa: E402

from schemas.config import config_from_dict  # noqa: E402
from trainer.engine import Engine  # noqa: E402


def _ops_stand_in() -> None:
    """`mmcv._ext` whose every op raises when called (see the docstring)."""
    ext = types.ModuleType("mmcv._ext")

    def attr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError(f"mmcv op {name} was called: this step needs mmcv's compiled ops")
        return op
    ext.__getattr__ = attr
    sys.modules["mmcv._ext"] = ext


def mmdet_model(config: str, classes: int):
    """An MMDetection detector from its own config file, random weights, no pretrained or teacher checkpoint."""
    import mmdet
    from mmengine.config import Config
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    cfg = Config.fromfile(str(Path(mmdet.__file__).parent / ".mim" / "configs" / config))
    cfg.model.backbone.init_cfg = None
    if cfg.model.type == "LAD":
        cfg.model.teacher_ckpt = None
        cfg.model.teacher_bbox_head.num_classes = classes
    cfg.model.bbox_head.num_classes = classes
    model = MODELS.build(cfg.model)
    model.init_weights()
    if cfg.model.type == "LAD":   # its teacher is no registered submodule, so the call above does not reach it
        for part in (model.teacher_model.backbone, model.teacher_model.neck, model.teacher_model.bbox_head):
            part.init_weights()
    model.train()
    return model


def timed(fn, laps: list[float]):
    """`fn`, appending each call's wall time in ms to `laps` (MMDetection's teacher forward inside its LAD step)."""
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        laps.append((time.perf_counter() - t0) * 1000)
        return out
    return wrapper


def mmdet_data(images: torch.Tensor, boxes, labels) -> dict:
    """Our batch as MMDetection's `train_step` input: uint8 images (its preprocessor normalises) and samples."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData
    samples = []
    for b, lab in zip(boxes, labels):
        s = DetDataSample()
        h, w = images.shape[-2:]
        s.set_metainfo(dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0), pad_shape=(h, w)))
        s.gt_instances = InstanceData(bboxes=b.float(), labels=lab.long())
        samples.append(s)
    return {"inputs": list(images), "data_samples": samples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant (after 2 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/mmdet_steps.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _ops_stand_in()
    import mmdet
    import mmengine
    from mmengine.logging import MMLogger
    MMLogger.get_instance("mmengine", log_level="WARNING")   # init_weights logs every parameter at INFO
    from mmengine.optim import OptimWrapper

    p = PRESETS["coco"]
    torch.manual_seed(0)
    variants: dict = {}
    teacher_laps: dict[str, list[float]] = {v: [] for v in ("mmdet/lad", "mmdet/lad/nhwc", "ours/lad", "ours/lad/nchw")}
    for name, config in [("mmdet/paa", "paa/paa_r50_fpn_1x_coco.py"), ("mmdet/paa/nhwc", "paa/paa_r50_fpn_1x_coco.py"),
                         ("mmdet/lad", "lad/lad_r50-paa-r101_fpn_2xb8_coco_1x.py"),
                         ("mmdet/lad/nhwc", "lad/lad_r50-paa-r101_fpn_2xb8_coco_1x.py")]:
        model = mmdet_model(config, p["classes"])
        if name.endswith("/nhwc"):   # not an MMDetection option: its weights in NHWC, which convolutions propagate
            torch.nn.Module.to(model, memory_format=torch.channels_last)   # LAD overrides .to(device)
            if name.startswith("mmdet/lad"):
                model.teacher_model.to(memory_format=torch.channels_last)
        if name.startswith("mmdet/lad"):   # its teacher: backbone + neck, then the head (mmdet/models/detectors/lad.py)
            model.extract_teacher_feat = timed(model.extract_teacher_feat, teacher_laps[name])
            head = model.teacher_model.bbox_head
            head.forward = timed(head.forward, teacher_laps[name])
        params = [q for q in model.parameters() if q.requires_grad]  # the teacher is no registered submodule
        wrapper = OptimWrapper(torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4))
        variants[name] = (lambda m, w: lambda batch: m.train_step(mmdet_data(*batch), w))(model, wrapper)

    base, _, teacher_path = shared_config(types.SimpleNamespace(**p, gmm="torch"))
    for mode in ("paa", "lad"):
        for nhwc in (True, False):
            extra = {"teacher": {"checkpoint": teacher_path}} if mode == "lad" else {}
            cfg = {**base, "mode": mode, **extra, "train": {**base["train"], "channels_last": nhwc}}
            engine = Engine(config_from_dict(cfg), torch.device("cpu"), total_steps=1000, sync_timing=True)
            name = f"ours/{mode}" + ("" if nhwc else "/nchw")

            def step(batch, engine=engine, laps=teacher_laps.get(name)):
                res = engine.step(*batch)
                if laps is not None:
                    laps.append(float(res.metrics["teacher_ms"]))
            variants[name] = step

    gt = tuple(int(x) for x in p["gt"].split(","))
    batches = [random_batch(p["batch"], p["input_size"], gt, s, "cpu", p["classes"]) for s in range(a.steps + 2)]
    # One step of each variant per round, starting one further along each round; a round in which any step
    # fails (MMDetection's PAA hands collapsed candidate losses to scikit-learn's GMM, which can refuse them)
    # is left out for every variant, so that all medians cover the same batches.
    names = list(variants)
    rounds: list[dict[str, float]] = []
    failed: dict[str, int] = {v: 0 for v in variants}
    for i, batch in enumerate(batches):
        took, teacher = {}, {}
        for name in names[i % len(names):] + names[:i % len(names)]:
            laps = teacher_laps.get(name)
            start = len(laps) if laps is not None else 0
            t0 = time.perf_counter()
            try:
                variants[name](batch)
            except ValueError as e:
                if "mixture model" not in str(e):
                    raise
                failed[name] += 1
                continue
            took[name] = (time.perf_counter() - t0) * 1000
            if laps is not None:
                teacher[name] = sum(laps[start:])
        if i >= 2 and len(took) == len(names):
            rounds.append({**took, **{f"{k}:teacher": v for k, v in teacher.items()}})
        print(f"round {i + 1}/{len(batches)}", file=sys.stderr, flush=True)
    if not rounds:
        sys.exit("no round without a failed step; run more --steps")
    results = {v: {"step_ms": statistics.median(r[v] for r in rounds), "all_ms": [r[v] for r in rounds],
                   "failed_steps": failed[v]} for v in names}
    for v in teacher_laps:
        results[v]["teacher_ms"] = statistics.median(r[f"{v}:teacher"] for r in rounds)
    for v, r in results.items():
        teacher = f"   teacher forward {r['teacher_ms']:7.1f} ms" if "teacher_ms" in r else ""
        failures = f"   ({r['failed_steps']} steps failed in sklearn's GMM)" if r["failed_steps"] else ""
        print(f"{v:15s} step {r['step_ms']:8.1f} ms{teacher}{failures}")
    ratios = {}
    for mode in ("paa", "lad"):   # ours in NHWC (the default) and NCHW, against MMDetection in each layout
        ours = {"nhwc": results[f"ours/{mode}"]["step_ms"], "nchw": results[f"ours/{mode}/nchw"]["step_ms"]}
        theirs = {"nhwc": results[f"mmdet/{mode}/nhwc"]["step_ms"], "nchw": results[f"mmdet/{mode}"]["step_ms"]}
        for o in ours:
            for t in theirs:
                ratios[f"{mode}: ours {o} / mmdet {t}"] = ours[o] / theirs[t]
    print(f"{len(rounds)} rounds timed")
    for k, r in ratios.items():
        print(f"{k:32s} {r:.2f}x")
    env = {"device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "mmdet": mmdet.__version__, "mmengine": mmengine.__version__,
           "args": vars(a), "command": " ".join(sys.argv), "preset": p}
    write_results(a.out, {"env": env, "results": results, "ratios": ratios})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Time one training step of every mode side by side, with the same student, and print ratios to PAA-alone.

Each step is split into the student's forward, the teacher's forward, label assignment and backward(+optimizer);
on a GPU the sections are synchronised so the split is honest. Random images with realistic GT counts; the
networks are untrained (assignment cost does not depend on training). Writes JSON (--out).

    python bench/steps.py                                   # digits scale on this machine's device
    python bench/steps.py --input-size 512 --student-depth 50 --teacher-depth 101 --levels 3,4,5,6,7 --batch 8
    python bench/steps.py --amp          # every mode in float32 and with mixed precision (train.amp), side by side
    python bench/steps.py --preset coco  # issue 20's comparison with MMDetection: 512x512, batch 2, R50 student,
                                         # R101 teacher, P3-P7 x 256, 4 head convs, 80 classes, 2 threads
    python bench/steps.py --preset coco --nchw   # each mode in NHWC (the default) and NCHW memory, side by side
    python bench/steps.py --preset coco --input-size 800 --device cuda
    python bench/steps.py --preset coco --modes paa --profile   # where a step's time goes, by op
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from schemas.config import config_from_dict  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.engine import Engine, pick_device  # noqa: E402
from trainer.model import build_model  # noqa: E402

# backward_ms covers the losses, the backward pass and the SGD update; soft_ms is KD/SoLAD building the soft targets
SECTIONS = ["forward_ms", "teacher_ms", "soft_ms", "assign_ms", "backward_ms"]
# issue 20's side-by-side with MMDetection 3.3 (its PAA and LAD configs at these shapes, random init, fp32)
PRESETS = {"coco": dict(input_size=512, batch=2, student_depth=50, teacher_depth=101, levels="3,4,5,6,7",
                        channels=256, head_convs=4, classes=80, gt="3,12", threads=2, frozen_stages=1,
                        norm_eval=True)}


def random_batch(batch: int, size: int, gt_range: tuple[int, int], seed: int, device, classes: int = 10):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(gt_range[0], gt_range[1] + 1, (1,), generator=g))
        wh = (torch.rand(n, 2, generator=g) * 0.35 + 0.08) * size
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        labels.append(torch.randint(0, classes, (n,), generator=g).to(device))
    return images.to(device), boxes, labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--student-depth", type=int, default=18)
    ap.add_argument("--teacher-depth", type=int, default=34)
    ap.add_argument("--levels", default="2,3,4", help="FPN levels, e.g. 3,4,5,6,7")
    ap.add_argument("--channels", type=int, default=64, help="FPN and head width")
    ap.add_argument("--head-convs", type=int, default=2)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--frozen-stages", type=int, default=-1, help="the student's model.frozen_stages")
    ap.add_argument("--norm-eval", action="store_true", help="the student's model.norm_eval")
    ap.add_argument("--gt", default="2,5", help="GT boxes per image: min,max")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode (after 2 warm-up steps)")
    ap.add_argument("--modes", default="paa,lad,kd,solad,colad")
    ap.add_argument("--gmm", default="torch", choices=["torch", "sklearn"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", action="store_true", help="also time each mode with train.amp (bf16 on CPU, fp16 on CUDA)")
    ap.add_argument("--nchw", "--channels-last", dest="nchw", action="store_true",
                    help="also time each mode in NCHW (train.channels_last=false) beside the default NHWC")
    ap.add_argument("--out", default="bench/results/steps.json")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="shapes of a named comparison; flags given too win")
    ap.add_argument("--threads", type=int, help="intra-op threads on a CPU (default: torch's)")
    ap.add_argument("--profile", action="store_true", help="then profile the timed steps of the last variant "
                    "once more (torch.profiler) and write its operator table beside --out (.profile.txt)")
    a = ap.parse_args()
    if a.preset:
        given = {arg.lstrip("-").split("=")[0].replace("-", "_") for arg in sys.argv[1:] if arg.startswith("--")}
        for k, v in PRESETS[a.preset].items():
            if k not in given:
                setattr(a, k, v)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    base, model, teacher_path = shared_config(a)
    gt_range = tuple(int(x) for x in a.gt.split(","))
    batches = [random_batch(a.batch, a.input_size, gt_range, s, device, a.classes) for s in range(a.steps + 2)]
    engines = {}
    for mode in a.modes.split(","):
        extra = {"teacher": {"checkpoint": str(teacher_path)}} if mode in ("lad", "kd", "solad") else {}
        if mode == "colad":
            extra = {"colearn": {"model_b": {**model, "depth": a.teacher_depth}}}
        for amp in ((False, True) if a.amp else (False,)):
            for nhwc in ((False, True) if a.nchw else (True,)):
                cfg = {**base, "mode": mode, **extra, "train": {**base["train"], "amp": amp, "channels_last": nhwc}}
                name = mode + ("/amp" if amp else "") + ("" if nhwc else "/nchw")
                engines[name] = Engine(config_from_dict(cfg), device, total_steps=1000, sync_timing=True)
    # Interleaved (one step of each mode in turn) so that load changes on a shared machine hit every mode alike.
    times: dict[str, list] = {m: [] for m in engines}
    for i, (images, boxes, labels) in enumerate(batches):
        for mode, engine in engines.items():
            t0 = time.perf_counter()
            res = engine.step(images, boxes, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 2:
                times[mode].append({"step_ms": (time.perf_counter() - t0) * 1000,
                                    **{k: res.metrics.get(k, 0.0) for k in SECTIONS}})
    if a.profile:
        profile_steps(list(engines.items())[-1], batches[2:], device, Path(a.out).with_suffix(".profile.txt"))
    results = {}
    for mode, ts in times.items():
        results[mode] = {k: statistics.median(t[k] for t in ts) for k in ["step_ms"] + SECTIONS}
        print(f"{mode:10s} " + "  ".join(f"{k[:-3]} {v:8.1f} ms" for k, v in results[mode].items()), flush=True)
    paa = results.get("paa", {}).get("step_ms")
    if paa:
        print("\nratio to PAA-alone step: " + ", ".join(f"{m} {r['step_ms'] / paa:.2f}x" for m, r in results.items()))
        for r in results.values():
            r["ratio_to_paa"] = r["step_ms"] / paa
    if a.amp:
        print("mixed precision / float32 step: " + ", ".join(
            f"{m} {results[m + '/amp']['step_ms'] / r['step_ms']:.2f}x" for m, r in results.items() if "/" not in m))
    if a.nchw:
        print("NHWC / NCHW step: " + ", ".join(
            f"{m} {r['step_ms'] / results[m + '/nchw']['step_ms']:.2f}x" for m, r in results.items() if "/" not in m))
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "args": vars(a), "command": " ".join(sys.argv)}
    write_results(a.out, {"env": env, "results": results})
    return 0


def shared_config(a) -> tuple[dict, dict, str]:
    """What every variant shares, from the shape arguments `a` (the parser's, or a preset's): the config base,
    the networks' FPN and head settings (CoLAD's second network takes them too), and an untrained teacher
    checkpoint of `a.teacher_depth` in a temporary folder."""
    levels = [int(x) for x in a.levels.split(",")]
    model = dict(fpn_levels=levels, fpn_channels=a.channels, head_channels=a.channels, head_convs=a.head_convs,
                 num_classes=a.classes)
    base = {"data": {"input_size": a.input_size},
            "model": {**model, "depth": a.student_depth, "frozen_stages": a.frozen_stages, "norm_eval": a.norm_eval},
            "assign": {"gmm": a.gmm}, "train": {"warmup_steps": 0}}
    teacher_cfg = config_from_dict({**base, "model": {**model, "depth": a.teacher_depth}})
    teacher_path = Path(tempfile.mkdtemp()) / "teacher.pt"
    save_checkpoint(teacher_path, {"config": teacher_cfg.to_dict(),
                                   "models": {"a": build_model(teacher_cfg.model).state_dict()}})
    return base, model, str(teacher_path)


def profile_steps(named_engine, batches, device, path: Path) -> None:
    """The operators' self time over `batches` of one engine's steps, as torch.profiler tabulates it."""
    from torch.profiler import ProfilerActivity, profile
    name, engine = named_engine
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for images, boxes, labels in batches:
            engine.step(images, boxes, labels)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25)
    path.write_text(f"{name}, {len(batches)} steps\n{table}")
    print(f"{name}, {len(batches)} steps, by operator:\n{table}\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())

"""Time PAA's selection: the batched torch EM (`paa_select_batch(gmm="torch")`) against the official per-GT
scikit-learn loop (`gmm="sklearn"`), on the same COCO-like batch, and check that they agree.

The batch imitates a detector in training: 16 images of about 800x1333, anchors at strides 8..128, 3-11 GTs each
with COCO-like sizes, and candidate losses computed by `candidate_losses` from predictions whose quality grows
with the anchor's IoU (a low-loss cluster of good anchors plus spread, higher losses).

    python bench/assign.py [--images 16] [--threads 1] [--compile] [--out bench/results/assign.json]

Figures: wall-clock median/min per call, and process CPU time per call, whose ratio a busy shared machine
distorts least. `--compile` also times the EM through torch.compile (its first call compiles).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.anchors import feature_sizes_for, make_anchors  # noqa: E402
from trainer.assign import candidate_losses, paa_select_batch, preassign  # noqa: E402
from trainer.box_coder import encode  # noqa: E402

STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 80


def random_gt_boxes(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """COCO-like boxes: log-uniform sides of 12..500 px, aspect ratio 1:3..3:1, inside the image."""
    side = torch.exp(torch.empty(count).uniform_(math.log(12), math.log(500), generator=generator))
    aspect = torch.exp(torch.empty(count).uniform_(-math.log(3), math.log(3), generator=generator))
    wh = torch.stack((side * aspect.sqrt(), side / aspect.sqrt()), dim=1)
    wh = torch.minimum(wh, torch.tensor([width - 1.0, height - 1.0]))
    top_left = torch.rand(count, 2, generator=generator) * (torch.tensor([width, height]) - wh)
    return torch.cat((top_left, top_left + wh), dim=1)


def simulated_losses(generator: torch.Generator, anchors: torch.Tensor, gt_boxes: torch.Tensor,
                     gt_labels: torch.Tensor, cand_gt: torch.Tensor) -> torch.Tensor:
    """Candidate losses of a half-trained detector: better boxes and scores where the anchor fits its GT."""
    idx = torch.nonzero(cand_gt >= 0).squeeze(1)
    gt = cand_gt[idx]
    iou = _aligned_iou(anchors[idx], gt_boxes[gt])
    skill = 0.4 + 0.5 * torch.rand(len(gt_boxes), generator=generator)  # how well each object is learnt
    quality = (iou * skill[gt] * 1.6).clamp(0, 1)
    noise = torch.randn(len(idx), 4, generator=generator) * (0.6 - 0.4 * quality)[:, None]
    deltas = encode(anchors[idx], gt_boxes[gt]) * (1 - quality)[:, None] * 0.8 + noise
    logits = torch.randn(len(idx), NUM_CLASSES, generator=generator) * 0.3 - 4.6
    logits[torch.arange(len(idx)), gt_labels[gt]] = (-4.0 + 7.0 * quality
                                                     + 0.8 * torch.randn(len(idx), generator=generator))
    sub_losses = candidate_losses(anchors[idx], logits, deltas, gt_boxes, gt_labels, gt)
    losses = torch.zeros(len(anchors))
    losses[idx] = sub_losses
    return losses


def _aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    low = torch.maximum(a[:, :2], b[:, :2])
    high = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (high - low).clamp_min(0).prod(dim=1)
    area = lambda box: (box[:, 2:] - box[:, :2]).prod(dim=1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def coco_like_batch(seed: int = 0, num_images: int = 16, height: int = 800, width: int = 1333):
    """(anchors, num_anchors_per_level, pos_losses list, cand_gt list, num_gt) for a simulated batch."""
    generator = torch.Generator().manual_seed(seed)
    anchors, num_anchors_per_level = make_anchors(feature_sizes_for((height, width), STRIDES), STRIDES)
    pos_losses, cand_gts, num_gt = [], [], 0
    for _ in range(num_images):
        count = int(torch.randint(3, 12, (1,), generator=generator))
        gt_boxes = random_gt_boxes(generator, count, height, width)
        gt_labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        cand_gt = preassign(anchors, gt_boxes)
        pos_losses.append(simulated_losses(generator, anchors, gt_boxes, gt_labels, cand_gt))
        cand_gts.append(cand_gt)
        num_gt += count
    return anchors, num_anchors_per_level, pos_losses, cand_gts, num_gt


def _time_ms(fn, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU milliseconds per call (CPU time is what a shared, busy machine distorts least)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def _agreeing_gts(fast, ref, cand_gts) -> tuple[int, int]:
    """How many GTs get exactly the same positive anchors from both results, out of how many."""
    same = total = 0
    for (pos_fast, _), (pos_ref, _), cand in zip(fast, ref, cand_gts):
        for gt in range(int(cand.max()) + 1):
            mine = cand == gt
            same += bool(torch.equal(pos_fast & mine, pos_ref & mine))
            total += 1
    return same, total


def _select(compile_em: bool):
    os.environ["LAD_GMM_COMPILE"] = "1" if compile_em else "0"
    return lambda losses, cands, levels: paa_select_batch(losses, cands, levels, gmm="torch")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls of the torch path (default 20)")
    parser.add_argument("--sklearn-repeats", type=int, default=5, help="timed calls of the sklearn loop (default 5)")
    parser.add_argument("--batches", type=int, default=10, help="extra batches checked for agreement (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as Ray gives an actor; more only pay off on an idle machine)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the EM through torch.compile (LAD_GMM_COMPILE=1); compiling takes minutes here")
    parser.add_argument("--out", default="bench/results/assign.json", help="where to write the figures")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    with threadpool_limits(limits=args.threads):  # numpy's BLAS too: no helper threads spinning between calls
        return _run(args)


def _run(args: argparse.Namespace) -> dict:
    anchors, levels, losses, cands, num_gt = coco_like_batch(args.seed, args.images)
    select_sklearn = lambda: paa_select_batch(losses, cands, levels, gmm="sklearn")  # noqa: E731
    eager = _select(False)
    select_torch = lambda: eager(losses, cands, levels)  # noqa: E731
    # First the torch path in a process that has not imported scikit-learn, as a trainer or assigner running
    # gmm="torch" is: importing scikit-learn (it pulls pandas, scipy, ...) slows the candidate table by ~20 %.
    sklearn_imported_first = "sklearn" in sys.modules
    select_torch()
    clean_ms, clean_cpu = _time_ms(select_torch, args.repeats)
    compiled_figures = {}
    if args.compile:
        compiled = _select(True)
        start = time.perf_counter()
        compiled(losses, cands, levels)
        compiled_figures["compile_s"] = time.perf_counter() - start
        compiled_figures["timings"] = _time_ms(lambda: compiled(losses, cands, levels), args.repeats)
        os.environ["LAD_GMM_COMPILE"] = "0"
    select_sklearn()  # warm-up (imports)
    torch_ms, sklearn_ms, torch_cpu, sklearn_cpu = [], [], [], []
    for _ in range(args.sklearn_repeats):  # then interleaved, so both see the same machine load
        wall, cpu = _time_ms(select_sklearn, 1)
        sklearn_ms += wall
        sklearn_cpu += cpu
        wall, cpu = _time_ms(select_torch, max(1, args.repeats // args.sklearn_repeats))
        torch_ms += wall
        torch_cpu += cpu
    sklearn_median, sklearn_cpu_median = statistics.median(sklearn_ms), statistics.median(sklearn_cpu)
    result = {
        "images": args.images,
        "num_gt": num_gt,
        "threads": args.threads,
        "torch_ms_median": statistics.median(clean_ms),
        "torch_ms_min": min(clean_ms),
        "torch_cpu_ms_median": statistics.median(clean_cpu),
        "sklearn_ms_median": sklearn_median,
        "sklearn_ms_min": min(sklearn_ms),
        "sklearn_cpu_ms_median": sklearn_cpu_median,
        "speedup_median": sklearn_median / statistics.median(clean_ms),
        "speedup_cpu_time": sklearn_cpu_median / statistics.median(clean_cpu),
        "torch_interleaved_ms_median": statistics.median(torch_ms),
        "torch_interleaved_cpu_ms_median": statistics.median(torch_cpu),
        "speedup_interleaved_median": sklearn_median / statistics.median(torch_ms),
        "speedup_interleaved_cpu_time": sklearn_cpu_median / statistics.median(torch_cpu),
        "sklearn_imported_before_torch_timing": sklearn_imported_first,
    }
    if args.compile:
        wall, cpu = compiled_figures["timings"]
        result["compile_s"] = compiled_figures["compile_s"]
        result.update(torch_compiled_ms_median=statistics.median(wall), torch_compiled_ms_min=min(wall),
                      torch_compiled_cpu_ms_median=statistics.median(cpu),
                      speedup_compiled_median=sklearn_median / statistics.median(wall),
                      speedup_compiled_cpu_time=sklearn_cpu_median / statistics.median(cpu))
    result["load_average_1min"] = os.getloadavg()[0]

    agree = agree_compiled = total = 0
    for seed in range(args.seed, args.seed + 1 + args.batches):
        if seed != args.seed:
            _, _, losses, cands, _ = coco_like_batch(seed, args.images)
        ref = paa_select_batch(losses, cands, levels, gmm="sklearn")
        same, count = _agreeing_gts(_select(False)(losses, cands, levels), ref, cands)
        agree, total = agree + same, total + count
        if args.compile:
            agree_compiled += _agreeing_gts(_select(True)(losses, cands, levels), ref, cands)[0]
    os.environ["LAD_GMM_COMPILE"] = "0"
    result.update(agreement=agree / total, gt_compared=total, torch_version=torch.__version__)
    if args.compile:
        result["agreement_compiled"] = agree_compiled / total

    print(f"batch: {args.images} images, {num_gt} GTs, {args.threads} torch thread(s), "
          f"load average {result['load_average_1min']:.1f}")
    print(f"torch   paa_select_batch: median {result['torch_ms_median']:.2f} ms  (min {result['torch_ms_min']:.2f}, "
          f"CPU {result['torch_cpu_ms_median']:.2f})")
    print(f"sklearn per-GT loop:      median {sklearn_median:.1f} ms  (min {result['sklearn_ms_min']:.1f}, "
          f"CPU {sklearn_cpu_median:.1f})")
    print(f"speed-up: {result['speedup_median']:.1f}x median wall-clock, {result['speedup_cpu_time']:.1f}x CPU time")
    print(f"  (torch timed between the sklearn calls, after importing scikit-learn: "
          f"{result['torch_interleaved_ms_median']:.2f} ms, {result['speedup_interleaved_median']:.1f}x wall, "
          f"{result['speedup_interleaved_cpu_time']:.1f}x CPU)")
    if args.compile:
        print(f"compiled EM:              median {result['torch_compiled_ms_median']:.2f} ms  "
              f"(min {result['torch_compiled_ms_min']:.2f}, CPU {result['torch_compiled_cpu_ms_median']:.2f}; "
              f"compiling took {result['compile_s']:.0f} s): {result['speedup_compiled_median']:.1f}x median, "
              f"{result['speedup_compiled_cpu_time']:.1f}x CPU time, "
              f"agreement {100 * result['agreement_compiled']:.2f}%")
    print(f"agreement: {agree}/{total} GTs with identical positives ({100 * result['agreement']:.2f}%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

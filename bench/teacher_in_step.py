"""Why the teacher's forward is slower inside a LAD step than alone: the same frozen teacher timed in the contexts
it meets, interleaved one by one, at the shapes of issue 20's comparison (512x512, batch 2, ResNet-50 student,
ResNet-101 teacher, FPN P3-P7 of 256 channels, 4 head convs, 80 classes, fp32, untrained; the student with
frozen_stages 1 and norm_eval, as MMDetection's).

    alone            teacher forward under torch.no_grad, nothing else alive
    alone/inference  the same under torch.inference_mode
    after student    the student's forward has run first and its autograd graph is held (the order of the step
                     before the fix), then the teacher under no_grad
    after/inference  the same, the teacher under inference_mode
    before student   the teacher first, then the student's forward
    ..., heap kept   with glibc told (mallopt) to keep freed memory for reuse instead of unmapping large blocks

and the whole LAD step (forward, teacher, assignment, backward, update) both ways: as Engine.step runs it (the
teacher first) and in the order it had before (the student's forward first). Prints medians and writes JSON
(--out).

    python bench/teacher_in_step.py                   # 2 threads, 6 timed rounds
    python bench/teacher_in_step.py --threads 16 --rounds 10 --size 800
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.steps import random_batch  # noqa: E402
from schemas.config import config_from_dict  # noqa: E402
from trainer.checkpoint import save_checkpoint  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.model import build_model  # noqa: E402

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters
try:
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt  # noqa: B018  (glibc only)
except (OSError, AttributeError):
    libc = None
MODEL = dict(fpn_levels=[3, 4, 5, 6, 7], fpn_channels=256, head_channels=256, head_convs=4, num_classes=80)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up round)")
    ap.add_argument("--out", default="bench/results/teacher_in_step.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = {"data": {"input_size": a.size}, "model": {**MODEL, "depth": 50, "frozen_stages": 1, "norm_eval": True},
            "train": {"warmup_steps": 0}}
    tmp = Path(tempfile.mkdtemp())
    tcfg = config_from_dict({**base, "model": {**MODEL, "depth": 101}})
    save_checkpoint(tmp / "teacher.pt", {"config": tcfg.to_dict(), "models": {"a": build_model(tcfg.model).state_dict()}})
    engine = Engine(config_from_dict({**base, "mode": "lad", "teacher": {"checkpoint": str(tmp / "teacher.pt")}}),
                    "cpu", total_steps=1000)
    student, teacher = engine.model.train(), engine.teacher
    images, boxes, labels = random_batch(a.batch, a.size, (3, 12), 0, "cpu")

    def teacher_forward(inference: bool):
        with (torch.inference_mode() if inference else torch.no_grad()):
            return teacher(images)

    def after_student(inference: bool) -> float:
        out = student(images)       # its graph is alive while the teacher runs
        ms = timed(lambda: teacher_forward(inference))
        sum(v.float().sum() for v in (out.cls_logits, out.box_deltas)).backward()
        student.zero_grad(set_to_none=True)
        return ms

    def before_student() -> float:
        ms = timed(lambda: teacher_forward(False))
        out = student(images)
        sum(v.float().sum() for v in (out.cls_logits, out.box_deltas)).backward()
        student.zero_grad(set_to_none=True)
        return ms

    def step_student_first():
        """Engine.step before the fix, from the engine's own parts."""
        from trainer.engine import Timer
        from trainer.teacher import assign_hard

        timer = Timer(engine.device, False)
        out = engine.precision.forward(engine.forward_a, images)
        anchors, nl = engine.anchors(out.level_sizes)
        with torch.no_grad():
            tout = engine.precision.forward(teacher, images)
        labels_ = assign_hard(engine.cfg, tout, anchors, nl, boxes, labels)
        return engine._finish(out, anchors, labels_, boxes, None, timer)

    def kept_heap(case):
        """`case` with glibc told to keep freed memory (no mmap for large blocks, no trim), then back to defaults."""
        def run():
            libc.mallopt(M_MMAP_MAX, 0)
            libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
            try:
                return case()
            finally:
                libc.mallopt(M_MMAP_MAX, 65536)
                libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
                libc.malloc_trim(0)
        return run

    cases = {"alone": lambda: timed(lambda: teacher_forward(False)),
             "alone/inference": lambda: timed(lambda: teacher_forward(True)),
             "after student": lambda: after_student(False),
             "after/inference": lambda: after_student(True),
             "before student": before_student,
             "LAD step": lambda: timed(lambda: engine.step(images, boxes, labels)),
             "LAD step, student first": lambda: timed(step_student_first)}
    if libc is not None:
        cases.update({"after student, heap kept": kept_heap(lambda: after_student(False)),
                      "LAD step, heap kept": kept_heap(lambda: timed(lambda: engine.step(images, boxes, labels))),
                      "LAD step, student first, heap kept": kept_heap(lambda: timed(step_student_first))})
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(a.rounds + 1):
        for name, case in cases.items():   # interleaved: a load change on the machine hits every case alike
            ms = case()
            if r:
                times[name].append(ms)
        print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in times.items() if v), flush=True)
    results = {k: round(statistics.median(v), 1) for k, v in times.items()}
    for k, v in results.items():
        print(f"{k:36s} {v:8.1f} ms  ({v / results['alone']:.2f}x alone)")
    print(f"LAD step, teacher first / student first: {results['LAD step'] / results['LAD step, student first']:.3f}")
    if libc is not None:
        print(f"LAD step, heap kept / default: {results['LAD step, heap kept'] / results['LAD step']:.3f}")
    env = {"cpu": platform.processor() or platform.machine(), "threads": a.threads, "torch": torch.__version__,
           "args": vars(a), "command": "python bench/teacher_in_step.py " + " ".join(sys.argv[1:])}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"env": env, "median_ms": results, "all_ms": times}, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

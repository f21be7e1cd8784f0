"""`lad demo`, the README's main job: the built-in dataset, a PAA teacher, a LAD student, their COCO tables.

Everything runs on this machine's CPU (a GPU is used if present); the student goes through the same entrypoint as
`lad train` with the config's `pipeline.engine`. `--quick` (the default under CI=true) shortens both runs.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.run import run
from pipeline.validate import format_table
from schemas.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

FULL = dict(num_train=1200, num_val=200, teacher_epochs=6, student_epochs=6, warmup_steps=100)
QUICK = dict(num_train=320, num_val=64, teacher_epochs=6, student_epochs=4, warmup_steps=20)


def demo(quick: bool = False, out: str = "runs/demo", progress: bool = True, engine: str | None = None) -> int:
    size = QUICK if quick else FULL
    out_dir = Path(out)
    data = out_dir / "data"
    started = time.time()
    if not (data / "val.json").exists():
        from pipeline.digits import make_digits
        print(f"[1/3] built-in dataset -> {data}")
        make_digits(data, num_train=size["num_train"], num_val=size["num_val"], progress=progress)
    common = [f"output_dir={out_dir}", f"data.train={data / 'train.json'}", f"data.val={data / 'val.json'}",
              f"train.warmup_steps={size['warmup_steps']}"]
    teacher = load_config(CONFIGS / "paa_digits.yaml", common + [
        "name=teacher_r34", "model.depth=34", f"train.epochs={size['teacher_epochs']}", "train.eval_every=0"])
    print(f"[2/3] teacher: PAA ResNet-{teacher.model.depth}, {teacher.train.epochs} epochs -> {teacher.run_dir}")
    teacher_stats = run(teacher, progress=progress)
    student = load_config(CONFIGS / "lad_digits.yaml", common + [
        "name=student_lad_r18", f"teacher.checkpoint={teacher.run_dir / 'checkpoints' / 'best.pt'}",
        f"train.epochs={size['student_epochs']}", "train.eval_every=0"] + ([f"pipeline.engine={engine}"] if engine else []))
    print(f"[3/3] student: LAD ResNet-{student.model.depth} taught by the teacher, {student.train.epochs} epochs, "
          f"engine {student.pipeline.engine} -> {student.run_dir}")
    student_stats = run(student, progress=progress)
    print(f"\nTeacher (PAA, ResNet-{teacher.model.depth}) on {data / 'val.json'}:\n{format_table(teacher_stats['a'])}")
    print(f"\nStudent (LAD, ResNet-{student.model.depth}) on {data / 'val.json'}:\n{format_table(student_stats['a'])}")
    print(f"\ndemo finished in {time.time() - started:.0f} s; runs in {out_dir}")
    return 0

"""`lad demo`, the README's main job: the built-in dataset, a PAA teacher, then an R18 PAA baseline and an R18 LAD
student on the same data and schedule, so that the one table it prints shows what LAD changed.

Everything runs on this machine's CPU (a GPU is used if present); the student goes through the same entrypoint as
`lad train` with the config's `pipeline.engine` (the assigner pipeline on a local Ray); the baseline trains
in-process. Every run evaluates after each epoch, and `<out>/demo_ap.png` plots the three AP curves. `--quick`
(the default under CI=true) shortens the runs.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.run import run
from schemas.config import RunConfig, load_config
from schemas.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

FULL = dict(num_train=800, num_val=200, teacher_epochs=6, student_epochs=6, warmup_steps=100)
QUICK = dict(num_train=320, num_val=64, teacher_epochs=6, student_epochs=4, warmup_steps=20)


def _train(title: str, cfg: RunConfig, progress: bool) -> dict:
    print(f"{title} -> {cfg.run_dir}")
    started = time.time()
    stats = run(cfg, progress=progress)["a"]
    return {"stats": stats, "seconds": time.time() - started, "run": RunDir(cfg.run_dir)}


def table(rows: list[tuple[str, dict]]) -> str:
    lines = [f"{'run':<30} {'AP':>6} {'AP50':>6} {'AP75':>6} {'time':>7}"]
    for name, r in rows:
        s = r["stats"]
        lines.append(f"{name:<30} {s['AP']:6.3f} {s['AP50']:6.3f} {s['AP75']:6.3f} {r['seconds']:6.0f}s")
    return "\n".join(lines)


def plot_curves(rows: list[tuple[str, dict]], path: Path) -> None:
    """AP after each epoch of every run, one line each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in rows:
        evals = [e for e in r["run"].evals() if e.get("network", "a") == "a"]
        ax.plot([e["epoch"] + 1 for e in evals], [e["stats"]["AP"] for e in evals], marker="o", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("COCO AP (val)")
    ax.set_title("lad demo: AP after each epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(quick: bool = False, out: str = "runs/demo", progress: bool = True, engine: str | None = None) -> int:
    size = QUICK if quick else FULL
    out_dir = Path(out)
    data = out_dir / "data"
    started = time.time()
    if not (data / "val.json").exists():
        from pipeline.digits import make_digits
        print(f"[1/4] built-in dataset -> {data}")
        make_digits(data, num_train=size["num_train"], num_val=size["num_val"], progress=progress)
    common = [f"output_dir={out_dir}", f"data.train={data / 'train.json'}", f"data.val={data / 'val.json'}",
              f"train.warmup_steps={size['warmup_steps']}", "train.eval_every=1"]
    teacher = load_config(CONFIGS / "paa_digits.yaml", common + [
        "name=teacher_r34", "model.depth=34", f"train.epochs={size['teacher_epochs']}"])
    student = load_config(CONFIGS / "lad_digits.yaml", common + [
        "name=student_lad_r18", f"teacher.checkpoint={teacher.run_dir / 'checkpoints' / 'best.pt'}",
        f"train.epochs={size['student_epochs']}"] + ([f"pipeline.engine={engine}"] if engine else []))
    baseline = load_config(CONFIGS / "paa_digits.yaml", common + [
        "name=baseline_paa_r18", f"model.depth={student.model.depth}", f"train.epochs={size['student_epochs']}"])
    rows = [
        (f"teacher: PAA R{teacher.model.depth}",
         _train(f"[2/4] teacher: PAA ResNet-{teacher.model.depth}, {teacher.train.epochs} epochs", teacher, progress)),
        (f"baseline: PAA R{baseline.model.depth}",
         _train(f"[3/4] baseline: PAA ResNet-{baseline.model.depth}, {baseline.train.epochs} epochs, in-process",
                baseline, progress)),
        (f"student: LAD R{student.model.depth}",
         _train(f"[4/4] student: LAD ResNet-{student.model.depth} taught by the teacher, {student.train.epochs} "
                f"epochs, engine {student.pipeline.engine}", student, progress)),
    ]
    plot = out_dir / "demo_ap.png"
    plot_curves(rows, plot)
    gain = rows[2][1]["stats"]["AP"] - rows[1][1]["stats"]["AP"]
    print(f"\nCOCO bbox AP on {data / 'val.json'} (baseline and student: the same data, schedule and initial "
          f"weights; only who assigns the labels differs):\n{table(rows)}")
    print(f"\nLAD - baseline: {gain:+.3f} AP (one seed; bench/replicate.py measures it over seeds). "
          f"AP curves: {plot}")
    print(f"demo finished in {time.time() - started:.0f} s; runs in {out_dir}")
    return 0

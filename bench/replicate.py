"""The paper's Tables 2 and 3 (and CoLAD) at small scale, on the built-in dataset, over several seeds.

    python bench/replicate.py                     # the full table (about an hour of a 2-core CPU per seed set)
    python bench/replicate.py --quick             # a few minutes: tiny data and schedule (CI-sized smoke run)
    python bench/replicate.py --seeds 0 1 2 --epochs 4 --out bench/results/replicate

Resumable: a finished run (progress.json says succeeded) is skipped, an interrupted one resumes from its
last.pt. Per seed it trains, every student with the same data and schedule (--epochs):
  Table 2 (strong teacher -> small student): a PAA-R34 teacher trained --teacher-epochs (as the paper's teachers
           are trained to convergence before they teach); R18 students: PAA baseline, KD, LAD, SoLAD
  Table 3 (small teacher -> large student): the R18 PAA baseline teaches R34 with LAD and KD, against R34's own
           PAA baseline (student schedule, same init seed)
  CoLAD: R18 + R34 together (auto, pin-a, pin-b, alternate:N) vs each alone (the two PAA baselines, same init)
Tables 2 and 3 of every seed are trained before any CoLAD run, so a cut-short run still has whole tables.
Writes results.json, table.md and ap_curves.png into --out, and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.config import load_config  # noqa: E402
from schemas.rundir import RunDir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = 18, 34


@dataclass
class Spec:
    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    group: str = ""
    label: str = ""


def specs_for_seed(seed: int, alt_n: int, teacher_epochs: int) -> list[Spec]:
    """Runs of one seed, teachers first. Network B of CoLAD uses init seed `seed + 1`, as its PAA baseline does."""
    s = f"s{seed}"
    teacher_big = f"{s}_teacher_r{LARGE}"
    teacher_small = f"{s}_paa_r{SMALL}"
    ck = lambda run: f"teacher.checkpoint={{out}}/{run}/checkpoints/last.pt"  # noqa: E731
    big = [f"model.depth={LARGE}", f"model_seed={seed + 1}"]
    colad = [f"colearn.model_b.depth={LARGE}", f"model_seed={seed}", f"colearn.seed_b={seed + 1}"]
    return [
        Spec(teacher_big, "paa_digits", big + [f"train.epochs={teacher_epochs}", "train.eval_every=3"], "table2",
             f"R{LARGE} PAA teacher ({teacher_epochs} epochs)"),
        Spec(teacher_small, "paa_digits", [f"model_seed={seed}"], "table2", f"R{SMALL} PAA baseline"),
        Spec(f"{s}_paa_r{LARGE}", "paa_digits", big, "table3", f"R{LARGE} PAA (own baseline)"),
        Spec(f"{s}_kd_r{SMALL}", "kd_digits", [ck(teacher_big), f"model_seed={seed}"], "table2",
             f"R{SMALL} soft-label KD (R{LARGE} teacher)"),
        Spec(f"{s}_lad_r{SMALL}", "lad_digits", [ck(teacher_big), f"model_seed={seed}"], "table2",
             f"R{SMALL} LAD (R{LARGE} teacher)"),
        Spec(f"{s}_solad_r{SMALL}", "solad_digits", [ck(teacher_big), f"model_seed={seed}"], "table2",
             f"R{SMALL} SoLAD (R{LARGE} teacher)"),
        Spec(f"{s}_lad_r{LARGE}", "lad_digits", [ck(teacher_small)] + big, "table3",
             f"R{LARGE} LAD (R{SMALL} teacher)"),
        Spec(f"{s}_kd_r{LARGE}", "kd_digits", [ck(teacher_small)] + big, "table3",
             f"R{LARGE} soft-label KD (R{SMALL} teacher)"),
        *[Spec(f"{s}_colad_{p.replace(':', '')}", "colad_digits", colad + [f"colearn.policy={p}"], "colad",
               f"CoLAD R{SMALL}+R{LARGE} {p}") for p in ("auto", "pin-a", "pin-b", f"alternate:{alt_n}")],
    ]


def run_spec(spec: Spec, out: Path, data: Path, schedule: list[str]) -> dict:
    from pipeline.local import train
    overrides = [o.replace("{out}", str(out)) for o in spec.overrides]
    cfg = load_config(REPO / "configs" / f"{spec.config}.yaml", [
        f"name={spec.name}", f"output_dir={out}", f"data.train={data / 'train.json'}",
        f"data.val={data / 'val.json'}", *schedule, *overrides])
    seed = int(spec.name.split("_")[0][1:])
    cfg.seed = seed
    run = RunDir(cfg.run_dir)
    if (run.progress() or {}).get("state") == "succeeded":
        return {"skipped": True}
    t0 = time.time()
    train(cfg, progress=False)
    return {"wall_s": time.time() - t0}


def summarise(out: Path, specs: list[Spec]) -> dict:
    """Per label: the final AP/AP50 of each seed (network A; for CoLAD also B), mean, std, ms per step."""
    rows: dict[str, dict] = {}
    curves: dict[str, list] = {}
    for spec in specs:
        run = RunDir(out / spec.name)
        evals = run.evals()
        if not evals:
            continue
        nets = sorted({e["network"] for e in evals})
        step_ms = [m["step_ms"] for m in run.iter_metrics() if "step_ms" in m]
        for net in nets:
            label = spec.label + (f" -> network {net.upper()} (R{SMALL if net == 'a' else LARGE})"
                                  if spec.group == "colad" else "")
            final = [e for e in evals if e["network"] == net][-1]["stats"]
            r = rows.setdefault(label, {"group": spec.group, "AP": [], "AP50": [], "ms_per_step": []})
            r["AP"].append(final["AP"])
            r["AP50"].append(final["AP50"])
            if step_ms:
                r["ms_per_step"].append(statistics.median(step_ms))
            curves.setdefault(label, []).append([(e["epoch"], e["stats"]["AP"]) for e in evals if e["network"] == net])
    for r in rows.values():
        for k in ("AP", "AP50", "ms_per_step"):
            vals = r[k]
            r[f"{k}_mean"] = statistics.fmean(vals) if vals else float("nan")
            r[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"rows": rows, "curves": curves}


def table_markdown(summary: dict) -> str:
    lines = ["| group | run | seeds | AP (mean ± std) | AP50 (mean ± std) | ms/step |", "|---|---|---|---|---|---|"]
    for label, r in summary["rows"].items():
        lines.append(f"| {r['group']} | {label} | {len(r['AP'])} | {100 * r['AP_mean']:.1f} ± {100 * r['AP_std']:.1f} "
                     f"| {100 * r['AP50_mean']:.1f} ± {100 * r['AP50_std']:.1f} | {r['ms_per_step_mean']:.0f} |")
    return "\n".join(lines)


def plot_curves(summary: dict, path: Path) -> None:
    """One panel per group, mean AP over seeds per epoch. The CoLAD panel also shows each network trained alone
    (dashed), and the Table 2 teacher, which trains 3x longer, is a dashed line at its final AP (its own curve
    would squash the students')."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, curves = summary["rows"], summary["curves"]
    alone = [label for label in rows if label.startswith(f"R{SMALL} PAA baseline") or
             label.startswith(f"R{LARGE} PAA (own baseline)")]
    groups = sorted({r["group"] for r in rows.values()})
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.8), squeeze=False)
    for ax, group in zip(axes[0], groups):
        labels = [label for label in curves if rows[label]["group"] == group]
        extra = alone if group == "colad" else []
        for label in labels + [a for a in extra if a not in labels]:
            runs = curves[label]
            if label.startswith(f"R{LARGE} PAA teacher"):
                ax.axhline(100 * rows[label]["AP_mean"], color="k", ls=":", label=f"{label}: final AP")
                continue
            epochs = sorted({e for run in runs for e, _ in run})
            mean = [statistics.fmean([ap for run in runs for e, ap in run if e == ep]) for ep in epochs]
            ax.plot([e + 1 for e in epochs], [100 * m for m in mean], marker="o", label=label,
                    ls="--" if label in extra else "-")
        ax.set_title(group)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val AP x 100 (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/replicate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=4, help="every student's schedule")
    ap.add_argument("--teacher-epochs", type=int, default=None,
                    help="the Table 2 teacher's schedule (default 3x --epochs: a teacher trained longer)")
    ap.add_argument("--warmup", type=int, default=40, help="linear warm-up steps of every run")
    ap.add_argument("--num-train", type=int, default=480)
    ap.add_argument("--num-val", type=int, default=150)
    ap.add_argument("--alternate", type=int, default=20, help="N of the alternate:N CoLAD policy")
    ap.add_argument("--only", default=None, help="comma-separated groups to run: table2,table3,colad")
    ap.add_argument("--quick", action="store_true", help="tiny data and schedule, one seed: a smoke run")
    ap.add_argument("--summarise-only", action="store_true",
                    help="train nothing: rebuild the table and plot from the runs already in --out")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.epochs, a.num_train, a.num_val, a.warmup = a.seeds[:1], 1, 48, 16, 2
    a.teacher_epochs = a.teacher_epochs or 3 * a.epochs
    out = Path(a.out)
    data = out / "data"
    if not (data / "val.json").exists():
        from pipeline.digits import make_digits
        make_digits(data, num_train=a.num_train, num_val=a.num_val, seed=1234, progress=False)
    schedule = [f"train.epochs={a.epochs}", "train.eval_every=1", "train.log_every=5",
                f"train.warmup_steps={a.warmup}"]
    per_seed = [specs_for_seed(seed, a.alternate, a.teacher_epochs) for seed in a.seeds]
    specs = [s for group in (("table2", "table3"), ("colad",)) for seed_specs in per_seed
             for s in seed_specs if s.group in group]
    if a.only:
        keep = set(a.only.split(","))
        needed = {s.name for s in specs if s.group in keep}
        teachers = {o.split("/")[-3] for s in specs if s.name in needed for o in s.overrides if "checkpoint=" in o}
        specs = [s for s in specs if s.name in needed | teachers]
    log = {}
    bar = tqdm([] if a.summarise_only else specs, desc="replicate", unit="run", dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        log[spec.name] = run_spec(spec, out, data, schedule)
    summary = summarise(out, [s for s in specs if (RunDir(out / s.name).progress() or {}).get("state") == "succeeded"])
    md = table_markdown(summary)
    (out / "table.md").write_text(md + "\n")
    record = {"args": vars(a), "command": " ".join(sys.argv), "runs": log}
    previous = out / "results.json"
    if a.summarise_only and previous.exists():  # keep the training invocation's command, arguments and run log
        old = json.loads(previous.read_text())
        record = {**{k: old[k] for k in ("args", "command", "runs") if k in old},
                  "summarised_by": " ".join(sys.argv)}
    (out / "results.json").write_text(json.dumps({**record, **summary}, indent=1))
    plot_curves(summary, out / "ap_curves.png")
    print(md)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'}, {out / 'ap_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

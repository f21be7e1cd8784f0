"""The paper's Tables 2 and 3 (and CoLAD) at small scale, on the built-in dataset, over several seeds.

    python bench/replicate.py                     # the full table from scratch (1 h 40 min of a 2-core CPU)
    python bench/replicate.py --quick             # a few minutes: tiny data and schedule, into replicate_quick
    python bench/replicate.py --seeds 0 1 2 --epochs 4 --out bench/results/replicate
    python bench/replicate.py --regime pretrained --out bench/results/replicate_pretrained   # the paper's regime
    python bench/replicate.py --regime pretrained --recipe official --only table2 --epochs 6 --seeds 0 1 2 \
        --out bench/results/replicate_pretrained_official --reuse bench/results/replicate_pretrained
    python bench/replicate.py --regime pretrained --recipe official --set train.warmup_max_fraction=null \
        --only table2 --epochs 6 --seeds 0 1 2 3 4 --out bench/results/replicate_pretrained_official_w40
        # the official recipe with its warm-up cap lifted, the teacher included (add --reuse DIR to keep DIR's
        # teacher instead)

Resumable: a finished run (progress.json says succeeded) is skipped, an interrupted one resumes from its
last.pt. Per seed it trains, every student with the same data and schedule (--epochs):
  Table 2 (strong teacher -> small student): a PAA-R34 teacher trained --teacher-epochs (as the paper's teachers
           are trained to convergence before they teach); R18 students: PAA baseline, KD, LAD, SoLAD
  Table 3 (small teacher -> large student): the R18 PAA baseline teaches R34 with LAD and KD, against R34's own
           PAA baseline (student schedule, same init seed)
  CoLAD: R18 + R34 together (auto, pin-a, pin-b, alternate:N) vs each alone (the two PAA baselines, same init)
Tables 2 and 3 of every seed are trained before any CoLAD run, so a cut-short run still has whole tables.

--regime pretrained is the paper's setting: every backbone starts from weights `lad pretrain` made (ResNet-18 and
-34 classifiers on digit crops of a separate dataset: the stand-in for ImageNet, made once and kept in
--out/weights), trained as the official configs train a pretrained backbone (frozen_stages 1, norm_eval); one
Table 2 teacher serves every seed (the paper's teachers are fixed models); CoLAD runs its auto policy.

Writes results.json, table.md (means and the per-seed paired differences with 95 % intervals) and
ap_curves.png into --out, and prints the tables.
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
    seed: int = 0

    @property
    def key(self) -> str:
        """The run without its seed (`s3_lad_r18` -> `lad_r18`): what the paired differences match across seeds."""
        head, _, rest = self.name.partition("_")
        return rest if head[:1] == "s" and head[1:].isdigit() else self.name


PRETRAINED_BACKBONE = ["model.frozen_stages=1", "model.norm_eval=true"]  # as the official configs train one
SHARED_TEACHER_SEED = 100


def teacher_spec(name: str, seed: int, teacher_epochs: int, backbone: list[str]) -> Spec:
    return Spec(name, "paa_digits", [f"model.depth={LARGE}", f"model_seed={seed + 1}", *backbone,
                                     f"train.epochs={teacher_epochs}", "train.eval_every=3"], "table2",
                f"R{LARGE} PAA teacher ({teacher_epochs} epochs)", seed)


def specs_for_seed(seed: int, alt_n: int, teacher_epochs: int, backbones: dict[int, list[str]] | None = None,
                   shared_teacher: str | None = None, policies: list[str] | None = None) -> list[Spec]:
    """Runs of one seed, teachers first. Network B of CoLAD uses init seed `seed + 1`, as its PAA baseline does.
    `backbones` maps a depth to the overrides that start it from pretrained weights; `shared_teacher` names the
    one Table 2 teacher every seed learns from (else each seed trains its own)."""
    s = f"s{seed}"
    small_bb, big_bb = (backbones or {}).get(SMALL, []), (backbones or {}).get(LARGE, [])
    teacher_big = shared_teacher or f"{s}_teacher_r{LARGE}"
    teacher_small = f"{s}_paa_r{SMALL}"
    ck = lambda run: f"teacher.checkpoint={{out}}/{run}/checkpoints/last.pt"  # noqa: E731
    small = [f"model_seed={seed}", *small_bb]
    big = [f"model.depth={LARGE}", f"model_seed={seed + 1}", *big_bb]
    colad = [f"colearn.model_b.depth={LARGE}", f"model_seed={seed}", f"colearn.seed_b={seed + 1}", *small_bb,
             *[o.replace("model.", "colearn.model_b.", 1) for o in big_bb]]
    policies = policies or ["auto", "pin-a", "pin-b", f"alternate:{alt_n}"]
    specs = [] if shared_teacher else [teacher_spec(teacher_big, seed, teacher_epochs, big_bb)]
    return specs + [Spec(*spec, seed=seed) for spec in [
        (teacher_small, "paa_digits", small, "table2", f"R{SMALL} PAA baseline"),
        (f"{s}_paa_r{LARGE}", "paa_digits", big, "table3", f"R{LARGE} PAA (own baseline)"),
        (f"{s}_kd_r{SMALL}", "kd_digits", [ck(teacher_big), *small], "table2",
         f"R{SMALL} soft-label KD (R{LARGE} teacher)"),
        (f"{s}_lad_r{SMALL}", "lad_digits", [ck(teacher_big), *small], "table2", f"R{SMALL} LAD (R{LARGE} teacher)"),
        (f"{s}_solad_r{SMALL}", "solad_digits", [ck(teacher_big), *small], "table2",
         f"R{SMALL} SoLAD (R{LARGE} teacher)"),
        (f"{s}_lad_r{LARGE}", "lad_digits", [ck(teacher_small)] + big, "table3", f"R{LARGE} LAD (R{SMALL} teacher)"),
        (f"{s}_kd_r{LARGE}", "kd_digits", [ck(teacher_small)] + big, "table3",
         f"R{LARGE} soft-label KD (R{SMALL} teacher)"),
        *[(f"{s}_colad_{p.replace(':', '')}", "colad_digits", colad + [f"colearn.policy={p}"], "colad",
           f"CoLAD R{SMALL}+R{LARGE} {p}") for p in policies],
    ]]


def pretrained_backbones(out: Path, a: argparse.Namespace) -> dict[int, list[str]]:
    """`lad pretrain` R18 and R34 on a digits dataset of their own (other images and seed than the detectors'),
    once: an existing weights file is kept (it is written whole or not at all)."""
    from pipeline.digits import make_digits
    from pipeline.pretrain import pretrain
    data = out / "pretrain_data"
    if not (data / "val.json").exists():
        make_digits(data, num_train=a.pretrain_images, num_val=100, seed=4321, progress=False)
    backbones = {}
    for depth in (SMALL, LARGE):
        weights = out / "weights" / f"r{depth}.pth"
        if not weights.exists():
            epochs = a.pretrain_epochs if depth == SMALL else a.pretrain_epochs_large
            info = pretrain(str(data / "train.json"), str(data / "val.json"), str(weights), depth=depth,
                            epochs=epochs, seed=depth)
            print(f"pretrained R{depth}: val accuracy {info['val_accuracy']:.3f} in {info['wall_s']:.0f} s")
        backbones[depth] = [f"model.pretrained={weights}", *PRETRAINED_BACKBONE]
    return backbones


# what decides a finished run's result: runs in one --out must share them, or the table would mix regimes
SETTINGS = ("regime", "recipe", "epochs", "teacher_epochs", "warmup", "num_train", "num_val", "pretrain_images",
            "pretrain_epochs", "pretrain_epochs_large", "set")
STUDENT_SETTINGS = ("recipe", "set")   # what --reuse may change: the students' recipe, not what they learn from


def same_runs(out: Path, a: argparse.Namespace) -> None:
    """Record the settings in --out/settings.json, or leave (one line) when the runs there were made otherwise."""
    mine = {k: getattr(a, k) for k in SETTINGS}
    path = out / "settings.json"
    if path.exists():
        theirs = json.loads(path.read_text())
        theirs = {"regime": "scratch", "recipe": "lad", "set": [], **theirs}
        differ = [f"{k} {theirs.get(k)} there, {mine[k]} now" for k in SETTINGS if theirs.get(k) != mine[k]
                  and not (k.startswith("pretrain_") and a.regime == "scratch")]
        if differ:
            sys.exit(f"error: {out} holds runs made with other settings ({'; '.join(differ)}); use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))


def reuse(out: Path, source: Path, a: argparse.Namespace) -> None:
    """Link --reuse's backbones, data and shared teacher into --out, so that only the students' recipe differs
    between the two sets of runs. Refused (one line) where --reuse was made with other settings."""
    theirs = json.loads((source / "settings.json").read_text()) if (source / "settings.json").exists() else None
    differ = [k for k in SETTINGS if k not in STUDENT_SETTINGS and (theirs or {}).get(k) != getattr(a, k)]
    if theirs is None or differ:
        sys.exit(f"error: --reuse {source}: " + (f"its settings differ ({', '.join(differ)})" if theirs else
                                                 "no settings.json there; run the bench into it first"))
    shared = ("weights", "pretrain_data", "data", f"teacher_r{LARGE}")
    absent = [name for name in shared if not (source / name).exists()]
    if absent:
        sys.exit(f"error: --reuse {source}: {', '.join(absent)} not there (run files stay on the machine that "
                 "made them); run the bench into it first")
    out.mkdir(parents=True, exist_ok=True)
    for name in shared:
        if not (out / name).exists():
            (out / name).symlink_to((source / name).resolve(), target_is_directory=True)


def run_spec(spec: Spec, out: Path, data: Path, schedule: list[str]) -> dict:
    from pipeline.local import train
    overrides = [o.replace("{out}", str(out)) for o in spec.overrides]
    cfg = load_config(REPO / "configs" / f"{spec.config}.yaml", [
        f"name={spec.name}", f"output_dir={out}", f"data.train={data / 'train.json'}",
        f"data.val={data / 'val.json'}", *schedule, *overrides])
    cfg.seed = spec.seed
    run = RunDir(cfg.run_dir)
    if (run.progress() or {}).get("state") == "succeeded":
        return {"skipped": True}
    t0 = time.time()
    train(cfg, progress=False)
    state = (run.progress() or {}).get("state")
    if state != "succeeded":  # stopped (a SIGTERM, a stop request) or failed: the next runs would build on it
        sys.exit(f"{spec.name} ended {state}; the bench stops here (run the same command to resume)")
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
            key = spec.key + (f"@{net}" if spec.group == "colad" else "")
            r = rows.setdefault(label, {"group": spec.group, "key": key, "seeds": [], "AP": [], "AP50": [],
                                        "ms_per_step": []})
            r["seeds"].append(spec.seed)
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


# (the paper's claim, the run, the run it is measured against, what the claim says of run - against):
# ">" a gain, ">=" no loss, "not >" no gain. Each is tested with per-seed paired differences.
COMPARISONS = [
    ("LAD > baseline (Table 2)", f"lad_r{SMALL}", f"paa_r{SMALL}", ">"),
    ("KD > baseline (Table 2)", f"kd_r{SMALL}", f"paa_r{SMALL}", ">"),
    ("SoLAD > baseline (Table 2)", f"solad_r{SMALL}", f"paa_r{SMALL}", ">"),
    ("SoLAD >= LAD (Table 2)", f"solad_r{SMALL}", f"lad_r{SMALL}", ">="),
    ("LAD lifts the larger student (Table 3)", f"lad_r{LARGE}", f"paa_r{LARGE}", ">"),
    ("KD does not lift it (Table 3)", f"kd_r{LARGE}", f"paa_r{LARGE}", "not >"),
    (f"CoLAD network A (R{SMALL}) >= R{SMALL} alone", "colad_auto@a", f"paa_r{SMALL}", ">="),
    (f"CoLAD network B (R{LARGE}) >= R{LARGE} alone", "colad_auto@b", f"paa_r{LARGE}", ">="),
]


def verdict(low: float, high: float, claim: str) -> tuple[str, str]:
    """(what the interval says of the difference, what that says of the claim)."""
    if not low == low:  # one seed: no interval
        return "one seed", "not tested"
    diff = "above 0" if low > 0 else "below 0" if high < 0 else "includes 0"
    if claim == ">":
        return diff, {"above 0": "holds", "below 0": "reversed", "includes 0": "not shown (within the noise)"}[diff]
    if claim == ">=":
        return diff, {"above 0": "holds (a gain)", "below 0": "fails", "includes 0": "holds (no resolved loss)"}[diff]
    return diff, {"above 0": "fails (it lifts it)", "below 0": "holds (a loss)",
                  "includes 0": "holds (no resolved gain)"}[diff]


def paired(summary: dict, confidence: float = 0.95) -> list[dict]:
    """Per comparison: AP differences seed by seed (the same data order and init on both sides), their mean, a
    Student-t interval, and what it says of the difference and of the claim."""
    from scipy import stats
    by_key = {r["key"]: dict(zip(r["seeds"], r["AP"])) for r in summary["rows"].values() if "key" in r}
    out = []
    for what, run, against, claim in COMPARISONS:
        a, b = by_key.get(run, {}), by_key.get(against, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            continue
        diffs = [a[s] - b[s] for s in seeds]
        mean = statistics.fmean(diffs)
        half = (stats.t.ppf(0.5 + confidence / 2, len(diffs) - 1) * statistics.stdev(diffs) / len(diffs) ** 0.5
                if len(diffs) > 1 else float("nan"))
        difference, holds = verdict(mean - half, mean + half, claim)
        out.append({"claim": what, "run": run, "against": against, "seeds": seeds, "diffs": diffs, "mean": mean,
                    "low": mean - half, "high": mean + half, "difference": difference, "verdict": holds})
    return out


def paired_markdown(rows: list[dict]) -> str:
    lines = ["| claim | run - against | seeds | per-seed AP difference x 100 | mean | 95 % interval | interval | "
             "claim |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_seed = ", ".join(f"{100 * d:+.1f}" for d in r["diffs"])
        lines.append(f"| {r['claim']} | {r['run']} - {r['against']} | {len(r['seeds'])} | {per_seed} | "
                     f"{100 * r['mean']:+.2f} | [{100 * r['low']:+.2f}, {100 * r['high']:+.2f}] | {r['difference']} "
                     f"| {r['verdict']} |")
    return "\n".join(lines)


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
    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--out", default=None, help="default bench/results/replicate, replicate_pretrained with "
                    "--regime pretrained, replicate_quick with --quick (relative to the current directory)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one set of runs per seed")
    ap.add_argument("--epochs", type=int, default=4, help="every student's schedule")
    ap.add_argument("--teacher-epochs", type=int, default=None,
                    help="the Table 2 teacher's schedule (default 3x --epochs: a teacher trained longer)")
    ap.add_argument("--warmup", type=int, default=40, help="linear warm-up steps of every run")
    ap.add_argument("--num-train", type=int, default=480, help="training images of the detectors' digits")
    ap.add_argument("--num-val", type=int, default=150, help="validation images, the AP's")
    ap.add_argument("--alternate", type=int, default=20, help="N of the alternate:N CoLAD policy")
    ap.add_argument("--only", default=None, help="comma-separated groups to run: table2,table3,colad")
    ap.add_argument("--regime", choices=["scratch", "pretrained"], default="scratch",
                    help="scratch: every backbone from random init; pretrained: from `lad pretrain` weights, "
                    "one shared Table 2 teacher, CoLAD's auto policy (the paper's setting)")
    ap.add_argument("--recipe", choices=["lad", "official"], default="lad", help="train.recipe of every run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override of every run trained here (repeatable), after the recipe, e.g. "
                    "train.warmup_max_fraction=null; recorded in --out's settings")
    ap.add_argument("--pretrain-images", type=int, default=1000, help="pretrained regime: images of the crop set")
    ap.add_argument("--pretrain-epochs", type=int, default=6, help=f"pretrained regime: `lad pretrain --epochs` "
                    f"of R{SMALL}")
    ap.add_argument("--pretrain-epochs-large", type=int, default=12,
                    help=f"the same for R{LARGE}, which learns more slowly (after 6 epochs: 56 %% accuracy against "
                    f"R{SMALL}'s 80 %%), so that its teacher is the stronger network, as in the paper")
    ap.add_argument("--reuse", default=None, metavar="DIR",
                    help="pretrained regime: take the backbones, data and shared teacher from DIR, runs made with "
                    "another --recipe or --set, so that only the students' recipe differs")
    ap.add_argument("--quick", action="store_true", help="tiny data and schedule, one seed: a smoke run")
    ap.add_argument("--summarise-only", action="store_true",
                    help="train nothing: rebuild the table and plot from the runs already in --out")
    a = ap.parse_args()
    if a.set:  # a bad override is one line before anything is written or trained
        from schemas.config import ConfigError
        try:
            load_config(REPO / "configs" / "paa_digits.yaml", a.set)
        except ConfigError as e:
            sys.exit(f"error: --set: {e}")
    if a.quick:
        a.seeds, a.epochs, a.num_train, a.num_val, a.warmup = a.seeds[:1], 1, 48, 16, 2
        a.pretrain_images, a.pretrain_epochs, a.pretrain_epochs_large = 48, 1, 1
    a.teacher_epochs = a.teacher_epochs or 3 * a.epochs
    a.out = a.out or ("bench/results/replicate" + ("_quick" if a.quick else "_pretrained" if a.regime == "pretrained"
                                                   else ""))
    out = Path(a.out)
    if a.summarise_only and not any((p / "eval.json").exists() for p in out.glob("*/")):
        sys.exit(f"error: no runs in {out} to summarise (run directories stay on the machine that trained them)")
    if not a.summarise_only:
        if a.reuse:  # before --out records its settings, so that a refusal leaves nothing behind
            reuse(out, Path(a.reuse), a)
        same_runs(out, a)
    data = out / "data"
    if not (data / "val.json").exists():
        from pipeline.digits import make_digits
        make_digits(data, num_train=a.num_train, num_val=a.num_val, seed=1234, progress=False)
    schedule = [f"train.epochs={a.epochs}", "train.eval_every=1", "train.log_every=5",
                f"train.warmup_steps={a.warmup}", f"train.recipe={a.recipe}", *a.set]
    shared, backbones, policies = None, None, None
    if a.regime == "pretrained":
        backbones = ({d: [] for d in (SMALL, LARGE)} if a.summarise_only else pretrained_backbones(out, a))
        shared, policies = f"teacher_r{LARGE}", ["auto"]
    per_seed = [specs_for_seed(seed, a.alternate, a.teacher_epochs, backbones, shared, policies) for seed in a.seeds]
    specs = [teacher_spec(shared, SHARED_TEACHER_SEED, a.teacher_epochs, backbones[LARGE])] if shared else []
    specs += [s for group in (("table2", "table3"), ("colad",)) for seed_specs in per_seed
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
    summary["paired"] = paired(summary)
    md = table_markdown(summary) + "\n\n" + paired_markdown(summary["paired"])
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

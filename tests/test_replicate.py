"""bench/replicate.py's bookkeeping on hand-made run directories (no training): which runs a seed trains, the
summary's per-seed values, means and spreads, the markdown table, the plot, and --summarise-only keeping the
training invocation's log."""
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def replicate():
    spec = importlib.util.spec_from_file_location("bench_replicate", REPO / "bench" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _fake_run(out: Path, name: str, aps: dict[str, list[float]], step_ms: float) -> None:
    """A finished run: eval.json with one AP per epoch per network, metrics with step_ms, progress succeeded."""
    run = out / name
    run.mkdir(parents=True)
    evals = [{"epoch": e, "step": 10 * (e + 1), "network": net, "stats": {"AP": ap, "AP50": 2 * ap}}
             for net, curve in aps.items() for e, ap in enumerate(curve)]
    (run / "eval.json").write_text(json.dumps(evals))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "step_ms": step_ms + s}) + "\n"
                                               for s in (1, 2, 3)))
    (run / "progress.json").write_text(json.dumps({"state": "succeeded"}))


def test_each_seed_trains_teachers_first_and_every_group(replicate):
    specs = replicate.specs_for_seed(3, alt_n=20, teacher_epochs=12)
    names = [s.name for s in specs]
    assert names[:3] == ["s3_teacher_r34", "s3_paa_r18", "s3_paa_r34"]
    assert {s.group for s in specs} == {"table2", "table3", "colad"}
    teacher = specs[0]
    assert "train.epochs=12" in teacher.overrides and "model.depth=34" in teacher.overrides
    by_name = {s.name: s for s in specs}
    # Table 2 students learn from the long-trained R34; Table 3's R34 students from the R18 baseline
    assert any("s3_teacher_r34/checkpoints" in o for o in by_name["s3_lad_r18"].overrides)
    assert any("s3_paa_r18/checkpoints" in o for o in by_name["s3_lad_r34"].overrides)
    # R34 has init seed s + 1 wherever it appears: alone, as a student, as CoLAD's network B
    assert "model_seed=4" in by_name["s3_paa_r34"].overrides and "model_seed=4" in by_name["s3_kd_r34"].overrides
    assert "colearn.seed_b=4" in by_name["s3_colad_auto"].overrides
    assert [s.name for s in specs if s.group == "colad"] == [
        "s3_colad_auto", "s3_colad_pin-a", "s3_colad_pin-b", "s3_colad_alternate20"]


def test_summary_table_and_plot(replicate, tmp_path):
    specs = [s for seed in (0, 1) for s in replicate.specs_for_seed(seed, 20, 12)]
    finals = {0: 0.10, 1: 0.14}
    for seed in (0, 1):
        _fake_run(tmp_path, f"s{seed}_paa_r18", {"a": [0.02, finals[seed]]}, 100.0)
        _fake_run(tmp_path, f"s{seed}_colad_auto", {"a": [0.03, 0.2 + seed / 10], "b": [0.01, 0.05]}, 300.0)
    summary = replicate.summarise(tmp_path, [s for s in specs if (tmp_path / s.name).exists()])
    base = summary["rows"]["R18 PAA baseline"]
    assert base["AP"] == [0.10, 0.14] and base["AP_mean"] == pytest.approx(0.12)
    assert base["AP_std"] == pytest.approx(statistics.stdev([0.10, 0.14]))
    assert base["AP50"] == [0.20, 0.28] and base["ms_per_step"] == [102.0, 102.0]
    colad_a = summary["rows"]["CoLAD R18+R34 auto -> network A (R18)"]
    colad_b = summary["rows"]["CoLAD R18+R34 auto -> network B (R34)"]
    assert colad_a["AP"] == pytest.approx([0.2, 0.3]) and colad_b["AP"] == [0.05, 0.05] and colad_b["AP_std"] == 0.0
    table = replicate.table_markdown(summary)
    assert "| table2 | R18 PAA baseline | 2 | 12.0 ± 2.8 | 24.0 ± 5.7 | 102 |" in table
    replicate.plot_curves(summary, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_summarise_only_keeps_the_training_runs_log(replicate, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    (out / "data").mkdir(parents=True)
    (out / "data" / "val.json").write_text("{}")  # no dataset is made when one is there
    _fake_run(out, "s0_paa_r18", {"a": [0.02, 0.1]}, 100.0)
    trained = {"args": {"seeds": [0]}, "command": "bench/replicate.py --seeds 0", "runs": {"s0_paa_r18": {"wall_s": 5}}}
    (out / "results.json").write_text(json.dumps(trained))
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--summarise-only", "--seeds", "0", "--out", str(out)])
    assert replicate.main() == 0
    record = json.loads((out / "results.json").read_text())
    assert {k: record[k] for k in trained} == trained
    assert record["summarised_by"].endswith(f"--out {out}") and "R18 PAA baseline" in record["rows"]
    assert "R18 PAA baseline" in (out / "table.md").read_text()


def test_the_pretrained_regime_starts_every_backbone_from_its_own_weights(replicate):
    backbones = {18: ["model.pretrained=W/r18.pth", "model.frozen_stages=1", "model.norm_eval=true"],
                 34: ["model.pretrained=W/r34.pth", "model.frozen_stages=1", "model.norm_eval=true"]}
    specs = replicate.specs_for_seed(2, 20, 12, backbones, shared_teacher="teacher_r34", policies=["auto"])
    by_name = {s.name: s for s in specs}
    assert "s2_teacher_r34" not in by_name and all(s.seed == 2 for s in specs)
    assert [s.name for s in specs if s.group == "colad"] == ["s2_colad_auto"]
    for name in ("s2_paa_r18", "s2_lad_r18", "s2_kd_r18", "s2_solad_r18"):
        assert "model.pretrained=W/r18.pth" in by_name[name].overrides
    for name in ("s2_paa_r34", "s2_lad_r34", "s2_kd_r34"):
        assert "model.pretrained=W/r34.pth" in by_name[name].overrides
        assert "model.pretrained=W/r18.pth" not in by_name[name].overrides
    assert any("/teacher_r34/checkpoints" in o for o in by_name["s2_lad_r18"].overrides)
    colad = by_name["s2_colad_auto"].overrides
    assert {"model.pretrained=W/r18.pth", "colearn.model_b.pretrained=W/r34.pth",
            "colearn.model_b.frozen_stages=1", "colearn.model_b.norm_eval=true"} <= set(colad)
    teacher = replicate.teacher_spec("teacher_r34", 100, 12, backbones[34])
    assert teacher.key == "teacher_r34" and by_name["s2_lad_r18"].key == "lad_r18"
    assert "model.pretrained=W/r34.pth" in teacher.overrides and "train.epochs=12" in teacher.overrides


def test_paired_differences_and_their_interval(replicate, tmp_path):
    seeds = [0, 1, 2, 3, 4]
    base = [0.10, 0.12, 0.11, 0.13, 0.09]
    lad = [b + d for b, d in zip(base, [0.02, 0.03, 0.01, 0.02, 0.02])]   # every seed up: holds
    kd = [b + d for b, d in zip(base, [0.02, -0.03, 0.01, -0.02, 0.01])]  # both ways: noise
    for s in seeds:
        _fake_run(tmp_path, f"s{s}_paa_r18", {"a": [base[s]]}, 100.0)
        _fake_run(tmp_path, f"s{s}_lad_r18", {"a": [lad[s]]}, 100.0)
        _fake_run(tmp_path, f"s{s}_kd_r18", {"a": [kd[s]]}, 100.0)
    specs = [s for seed in seeds for s in replicate.specs_for_seed(seed, 20, 12) if (tmp_path / s.name).exists()]
    rows = {r["claim"]: r for r in replicate.paired(replicate.summarise(tmp_path, specs))}
    assert set(rows) == {"LAD > baseline (Table 2)", "KD > baseline (Table 2)"}  # only what both sides have
    lad_row = rows["LAD > baseline (Table 2)"]
    diffs = [0.02, 0.03, 0.01, 0.02, 0.02]
    assert lad_row["diffs"] == pytest.approx(diffs) and lad_row["seeds"] == seeds
    half = 2.7764451 * statistics.stdev(diffs) / 5 ** 0.5  # t(0.975, 4)
    assert (lad_row["low"], lad_row["high"]) == pytest.approx((0.02 - half, 0.02 + half))
    assert (lad_row["difference"], lad_row["verdict"]) == ("above 0", "holds")
    kd_row = rows["KD > baseline (Table 2)"]
    assert (kd_row["difference"], kd_row["verdict"]) == ("includes 0", "not shown (within the noise)")
    md = replicate.paired_markdown(list(rows.values()))
    assert "| LAD > baseline (Table 2) | lad_r18 - paa_r18 | 5 | +2.0, +3.0, +1.0, +2.0, +2.0 | +2.00 |" in md


@pytest.mark.parametrize("low,high,claim,expected", [
    (0.01, 0.03, ">", "holds"), (-0.03, -0.01, ">", "reversed"), (-0.01, 0.01, ">", "not shown (within the noise)"),
    (-0.01, 0.01, ">=", "holds (no resolved loss)"), (-0.03, -0.01, ">=", "fails"),
    (0.01, 0.03, "not >", "fails (it lifts it)"), (-0.01, 0.01, "not >", "holds (no resolved gain)"),
])
def test_the_verdict_reads_the_interval_as_the_claim_is_worded(replicate, low, high, claim, expected):
    assert replicate.verdict(low, high, claim)[1] == expected


def test_runs_made_with_other_settings_are_not_mixed_into_the_table(replicate, tmp_path, monkeypatch, capsys):
    out = tmp_path / "rep"
    (out / "data").mkdir(parents=True)
    (out / "data" / "val.json").write_text("{}")
    (out / "settings.json").write_text(json.dumps({"regime": "scratch", "recipe": "lad", "epochs": 4}))
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--out", str(out), "--epochs", "6"])
    with pytest.raises(SystemExit) as stop:
        replicate.main()
    assert "other settings" in str(stop.value) and "epochs 4 there, 6 now" in str(stop.value)


def test_reuse_links_the_other_recipes_backbones_data_and_teacher_and_refuses_other_settings(replicate, tmp_path):
    source, out = tmp_path / "lad", tmp_path / "official"
    for name in ("weights", "pretrain_data", "data", "teacher_r34"):
        (source / name).mkdir(parents=True)
    out.mkdir()
    args = replicate.argparse.Namespace(regime="pretrained", recipe="official", epochs=6, teacher_epochs=18,
                                        warmup=40, num_train=480, num_val=150, pretrain_images=1000,
                                        pretrain_epochs=6, pretrain_epochs_large=12)
    (source / "settings.json").write_text(json.dumps({**vars(args), "recipe": "lad", "epochs": 4}))
    with pytest.raises(SystemExit) as stop:
        replicate.reuse(out, source, args)
    assert "its settings differ (epochs)" in str(stop.value) and not list(out.iterdir())
    (source / "settings.json").write_text(json.dumps({**vars(args), "recipe": "lad"}))
    replicate.reuse(out, source, args)
    assert sorted(p.name for p in out.iterdir()) == ["data", "pretrain_data", "teacher_r34", "weights"]
    assert (out / "teacher_r34").resolve() == (source / "teacher_r34").resolve()


def test_reuse_of_a_folder_without_its_runs_is_refused_before_anything_is_written(replicate, tmp_path, monkeypatch):
    source, out = tmp_path / "lad", tmp_path / "official"
    source.mkdir()
    (source / "settings.json").write_text(json.dumps({"regime": "pretrained", "recipe": "lad", "epochs": 6,
                                                      "teacher_epochs": 18, "warmup": 40, "num_train": 480,
                                                      "num_val": 150, "pretrain_images": 1000,
                                                      "pretrain_epochs": 6, "pretrain_epochs_large": 12}))
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--regime", "pretrained", "--recipe", "official",
                                      "--epochs", "6", "--out", str(out), "--reuse", str(source)])
    with pytest.raises(SystemExit) as stop:
        replicate.main()
    assert "weights, pretrain_data, data, teacher_r34 not there" in str(stop.value) and not out.exists()


def test_summarise_only_without_runs_is_one_line(replicate, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--summarise-only", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as stop:
        replicate.main()
    assert "no runs in" in str(stop.value)


def test_a_bad_set_is_one_line_and_another_set_is_not_mixed_into_the_table(replicate, tmp_path, monkeypatch):
    out = tmp_path / "rep"
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--out", str(out), "--set", "train.nope=1"])
    with pytest.raises(SystemExit) as stop:
        replicate.main()
    assert "--set" in str(stop.value) and "train.nope" in str(stop.value) and not out.exists()
    (out / "data").mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"regime": "scratch", "recipe": "lad", "epochs": 4,
                                                   "teacher_epochs": None, "warmup": 40, "num_train": 480,
                                                   "num_val": 150}))
    monkeypatch.setattr(sys, "argv", ["bench/replicate.py", "--out", str(out), "--epochs", "4",
                                      "--set", "train.warmup_max_fraction=null"])
    with pytest.raises(SystemExit) as stop:
        replicate.main()
    assert "set [] there, ['train.warmup_max_fraction=null'] now" in str(stop.value)

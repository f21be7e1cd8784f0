"""The README's "Using it" commands, through the real `lad` CLI: every example config runs as written after
`lad data digits` and the teacher command its comment gives, shortened only by `--set train.max_steps`.

Each run must write the run directory of the contract with its mode's own metrics; `lad eval` reads a CoLAD
checkpoint's networks A, B or both.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

from services.cli import main as lad

REPO = Path(__file__).resolve().parents[1]
SHORT = ["--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.threads=1", "--quiet"]

# per mode: metrics every logged step must carry (beyond the common step/epoch/loss/lr/step_ms/data_wait_ms)
MODE_METRICS = {
    "lad": {"loss_cls", "loss_box", "loss_iou", "num_pos"},
    "kd": {"kd_cls", "kd_iou", "kd_box", "teacher_ms"},
    "solad": {"loss_cls", "kd_cls", "kd_box", "teacher_ms", "assign_ms"},
    "colad": {"loss_a", "loss_b", "teacher_ratio", "cand_loss_mean_a", "cand_loss_std_b", "policy"},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh directory laid out as the README's: data/digits and the teacher at runs/teacher_r34."""
    work = tmp_path_factory.mktemp("readme")
    old = os.getcwd()
    os.chdir(work)
    try:
        assert lad(["data", "digits", "--out", "data/digits", "--num-train", "32", "--num-val", "4",
                    "--quiet"]) == 0
        assert lad(["train", str(REPO / "configs/paa_digits.yaml"), "--set", "name=teacher_r34",
                    "--set", "model.depth=34", *SHORT]) == 0
        yield work
    finally:
        os.chdir(old)


def _read_run(run: Path) -> tuple[dict, list[dict], list[dict], dict]:
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = json.loads((run / "eval.json").read_text())
    progress = json.loads((run / "progress.json").read_text())
    return config, metrics, evals, progress


def test_the_teacher_command_wrote_the_run_directory(workdir):
    config, metrics, evals, progress = _read_run(workdir / "runs/teacher_r34")
    assert config["mode"] == "paa" and config["model"]["depth"] == 34
    assert progress["state"] == "succeeded" and progress["step"] == 2
    assert [m["step"] for m in metrics] == [1, 2]
    assert {"assign_ms", "step_ms", "data_wait_ms", "lr", "epoch"} <= set(metrics[0])
    assert (workdir / "runs/teacher_r34/checkpoints/best.pt").exists()
    assert set(evals[-1]["stats"]) >= {"AP", "AP50", "AP75", "APs", "ARl"} and len(evals[-1]["stats"]) == 12


@pytest.mark.parametrize("mode", ["lad", "kd", "solad", "colad"])
def test_example_config_runs_as_written(workdir, mode, capsys):
    assert lad(["train", str(REPO / f"configs/{mode}_digits.yaml"), *SHORT]) == 0
    run = workdir / "runs" / f"{mode}_digits"
    config, metrics, evals, progress = _read_run(run)
    assert config["mode"] == mode and progress["state"] == "succeeded"
    assert len(metrics) == 2
    for m in metrics:
        missing = MODE_METRICS[mode] - set(m)
        assert not missing, f"{mode} step {m['step']} lacks {missing}"
        assert all(m[k] is not None for k in MODE_METRICS[mode] if k != "policy")
    networks = {e["network"] for e in evals}
    assert networks == ({"a", "b"} if mode == "colad" else {"a"})
    assert (run / "checkpoints/last.pt").exists() and (run / "checkpoints/best.pt").exists()
    out = capsys.readouterr().out
    assert "Average Precision" in out and f"runs/{mode}_digits" in out


@pytest.mark.parametrize("network,expected", [("a", ["A"]), ("b", ["B"]), ("both", ["A", "B"])])
def test_eval_reads_either_network_of_a_colad_checkpoint(workdir, capsys, network, expected):
    ckpt = workdir / "runs/colad_digits/checkpoints/last.pt"
    if not ckpt.exists():
        assert lad(["train", str(REPO / "configs/colad_digits.yaml"), *SHORT]) == 0
        capsys.readouterr()
    assert lad(["eval", "--checkpoint", str(ckpt), "--data", "data/digits/val.json", "--network", network,
                "--quiet", "--out", f"eval_{network}.json"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("network ")] == expected
    assert out.count("Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all") == len(expected)


def test_eval_refuses_a_network_the_checkpoint_does_not_hold(workdir, capsys):
    assert lad(["eval", "--checkpoint", "runs/teacher_r34/checkpoints/last.pt", "--data", "data/digits/val.json",
                "--network", "b", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no network 'b'" in err and "teacher_r34" in err

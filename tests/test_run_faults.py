"""Faults a user meets around `lad train`, injected from outside the way the world does: a truncated teacher file,
a second `lad train` on a run that is training, a file-size limit that fails the checkpoint write (a full disk).
Each ends in one line, keeps what was there, and starts nothing it does not need."""
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import wait_for
from tests.tiny import make_data, make_teacher, tiny_config
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e


def lad(*args, env=None, preexec_fn=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, preexec_fn=preexec_fn)


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def test_a_truncated_teacher_is_one_line_in_seconds_before_any_ray_process(tmp_path):
    data = make_data(tmp_path / "data")
    teacher = make_teacher(tiny_config(data, tmp_path / "runs", mode="paa"), tmp_path / "teacher.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(teacher.read_bytes()[: teacher.stat().st_size // 2])
    cfg = tiny_config(data, tmp_path / "runs", mode="lad", teacher=str(cut), pipeline={"engine": "ray"})
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir()
    t0 = time.monotonic()
    out = lad("train", str(write_config(cfg, tmp_path / "lad.yaml")), "--quiet", env={"RAY_TMPDIR": str(ray_tmp)})
    elapsed = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    lines = errors(out.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(cut) in lines[0], lines
    assert "truncated" in lines[0] and "Traceback" not in out.stderr
    assert elapsed < 60, f"{elapsed:.0f} s"
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started"
    assert not (cfg.run_dir / "checkpoints").exists()   # nothing of the run was written either


def test_a_second_lad_train_on_a_run_that_is_training_is_refused(tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", train={"epochs": 50, "log_every": 1})
    config = write_config(cfg, tmp_path / "paa.yaml")
    first = subprocess.Popen([sys.executable, "-m", "services.cli", "train", str(config), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (cfg.run_dir / "metrics.jsonl").exists(), timeout=120, what="the first run's first step")
        second = lad("train", str(config), "--quiet")
        assert second.returncode == 2
        lines = errors(second.stderr)
        assert len(lines) == 1 and f"another `lad train` (pid {first.pid})" in lines[0], lines
        assert first.poll() is None   # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 0
    # once it has ended (stopped), the run is free again: a resume is accepted
    again = lad("train", str(config), "--quiet", "--set", "train.max_steps=1")
    assert again.returncode == 0, again.stderr


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_is_one_line(tmp_path):
    """The resumed run may write no file larger than half a checkpoint (RLIMIT_FSIZE, set on its process from
    outside, as a full disk would stop it): its first checkpoint fails, the previous last.pt stays whole, and the
    console gets one line naming the file with the traceback."""
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", train={"max_steps": 2, "epochs": 5})
    config = write_config(cfg, tmp_path / "paa.yaml")
    assert lad("train", str(config), "--quiet").returncode == 0
    last = cfg.run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = len(before) // 2

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    logs = tmp_path / "errors"
    out = lad("train", str(config), "--quiet", "--set", "train.max_steps=4", env={"LAD_ERROR_DIR": str(logs)},
              preexec_fn=small_files)
    assert out.returncode == 1
    lines = errors(out.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: OSError: {last.parent}/"), lines
    assert "writing the checkpoint failed" in lines[0] and ".pt is unchanged" in lines[0]
    log = Path(lines[0].rsplit("traceback in ", 1)[1].rstrip(")"))
    assert log.parent == logs and "Traceback" in log.read_text()
    assert last.read_bytes() == before and load_checkpoint(last)["step"] == 2
    assert [p.name for p in last.parent.iterdir() if p.name.startswith(".")] == []   # no temporary left


def test_a_sigkilled_lad_train_resumes_from_its_last_checkpoint_with_every_step_once(tmp_path):
    """SIGKILL of the driver mid-run (no handler runs), then the same command again: it resumes from last.pt, the
    metrics and evaluations logged after that checkpoint are rewound, and the run ends with each step logged once."""
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa",
                      train={"epochs": 10, "checkpoint_every": 2, "eval_every": 2, "log_every": 1})
    config = write_config(cfg, tmp_path / "paa.yaml")
    first = subprocess.Popen([sys.executable, "-m", "services.cli", "train", str(config), "--quiet"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = cfg.run_dir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 9, timeout=300,
             what="9 logged steps")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    killed_at = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["step"]
    assert 0 < killed_at < 60
    again = lad("train", str(config), "--quiet")
    assert again.returncode == 0, again.stderr
    import json
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 61))
    assert json.loads((cfg.run_dir / "progress.json").read_text())["state"] == "succeeded"
    evals = json.loads((cfg.run_dir / "eval.json").read_text())
    assert [e["epoch"] for e in evals] == [1, 3, 5, 7, 9]


def test_a_run_that_died_between_its_last_pt_and_its_best_pt_mends_best_pt_when_run_again(tmp_path):
    """A commit whose evaluation improved writes last.pt (recording that it is the best) and then best.pt; an
    attempt that died in between leaves best.pt older than the best, or none. Run again, the run makes best.pt from
    last.pt, whether it has training left or not."""
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", inference={"score_thr": 0.0})
    config = write_config(cfg, tmp_path / "paa.yaml")
    assert lad("train", str(config), "--quiet").returncode == 0
    best, last = cfg.run_dir / "checkpoints" / "best.pt", cfg.run_dir / "checkpoints" / "last.pt"
    final = load_checkpoint(last)
    assert final["best"]["step"] == final["step"] == load_checkpoint(best)["step"]
    other = tiny_config(data, tmp_path / "other", mode="paa", train={"max_steps": 1})
    assert lad("train", str(write_config(other, tmp_path / "other.yaml")), "--quiet").returncode == 0
    best.write_bytes((other.run_dir / "checkpoints" / "last.pt").read_bytes())   # the best before, of step 1
    assert lad("train", str(config), "--quiet").returncode == 0
    mended = load_checkpoint(best)
    assert mended["step"] == final["step"]
    assert all(mended["models"]["a"][k].equal(v) for k, v in final["models"]["a"].items())
    best.unlink()   # died before writing any best.pt
    assert lad("train", str(config), "--quiet").returncode == 0
    assert load_checkpoint(best)["step"] == final["step"]


def finished_run_without_validation(tmp_path: Path, steps: int):
    """(config, its file) of a `lad train` run of `steps` steps that has finished; no validation data."""
    cfg = tiny_config(make_data(tmp_path / "data"), tmp_path / "runs", mode="paa", train={"max_steps": steps})
    cfg.data.val = None
    config = write_config(cfg, tmp_path / "paa.yaml")
    assert lad("train", str(config), "--quiet").returncode == 0
    return cfg, config


def test_a_last_pt_cut_in_half_is_one_line_and_no_resume_starts_over(tmp_path):
    cfg, config = finished_run_without_validation(tmp_path, 2)
    last = cfg.run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    out = lad("train", str(config), "--quiet", "--set", "train.max_steps=3")
    lines = errors(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "cannot resume" in lines[0] and "last.pt" in lines[0] and "--no-resume" in lines[0], lines
    assert lad("train", str(config), "--quiet", "--no-resume", "--set", "train.max_steps=3").returncode == 0
    assert load_checkpoint(last)["step"] == 3


def test_no_resume_starts_over_without_the_checkpoints_of_the_run_before(tmp_path):
    """`--no-resume` drops the old run's last.pt and best.pt with its metrics: a run without validation data ends
    with its own best.pt (its final weights), not the old run's."""
    cfg, config = finished_run_without_validation(tmp_path, 4)
    best = cfg.run_dir / "checkpoints" / "best.pt"
    assert load_checkpoint(best)["step"] == 4
    assert lad("train", str(config), "--quiet", "--no-resume", "--set", "train.max_steps=2").returncode == 0
    assert load_checkpoint(best)["step"] == 2
    assert load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["step"] == 2


def test_a_class_count_other_than_the_datasets_is_one_line(tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", model={"num_classes": 3})
    out = lad("train", str(write_config(cfg, tmp_path / "paa.yaml")), "--quiet")
    assert out.returncode == 2
    lines = errors(out.stderr)
    assert len(lines) == 1 and "has 10 categories" in lines[0] and "--set model.num_classes=10" in lines[0], lines


def test_a_failed_metrics_append_is_one_line_and_the_run_resumes_with_every_step_once(tmp_path):
    """The resumed run may not grow any file past metrics.jsonl's size plus a few bytes (RLIMIT_FSIZE from
    outside): its first new metrics line fails half written. One line names the file; last.pt is untouched; the
    same command without the limit resumes, drops the torn line, and logs every step once."""
    import json

    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", train={"max_steps": 12, "epochs": 5})
    config = write_config(cfg, tmp_path / "paa.yaml")
    assert lad("train", str(config), "--quiet").returncode == 0
    metrics, last = cfg.run_dir / "metrics.jsonl", cfg.run_dir / "checkpoints" / "last.pt"
    before = last.read_bytes()
    limit = metrics.stat().st_size + 64
    assert limit > (cfg.run_dir / "config.yaml").stat().st_size   # the limit bites on metrics, not the config

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = lad("train", str(config), "--quiet", "--set", "train.max_steps=16",
              env={"LAD_ERROR_DIR": str(tmp_path / "errors")}, preexec_fn=small_files)
    assert out.returncode == 1
    lines = errors(out.stderr)
    assert len(lines) == 1 and f"{metrics}: appending a metrics line failed" in lines[0], lines
    assert not metrics.read_text().endswith("\n")             # the torn line is there ...
    assert last.read_bytes() == before
    assert lad("train", str(config), "--quiet", "--set", "train.max_steps=16").returncode == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 17))                        # ... and gone after the resume


def test_a_pipeline_too_big_for_this_machine_is_one_line_before_ray_starts(tmp_path):
    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", pipeline={"engine": "ray", "num_workers": 64})
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir()
    out = lad("train", str(write_config(cfg, tmp_path / "paa.yaml")), "--quiet", env={"RAY_TMPDIR": str(ray_tmp)})
    assert out.returncode == 2
    lines = errors(out.stderr)
    assert len(lines) == 1 and "does not fit the Ray cluster" in lines[0] and "pipeline.num_workers" in lines[0]
    assert list(ray_tmp.iterdir()) == [], "a Ray session was started"


def test_an_unreadable_pretrained_backbone_is_one_line_before_training(tmp_path):
    data = make_data(tmp_path / "data")
    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(b"PK\x03\x04 cut short")
    cfg = tiny_config(data, tmp_path / "runs", mode="paa", model={"pretrained": str(weights)})
    out = lad("train", str(write_config(cfg, tmp_path / "paa.yaml")), "--quiet")
    assert out.returncode == 2
    lines = errors(out.stderr)
    assert len(lines) == 1 and f"model.pretrained {weights}: unreadable" in lines[0], lines

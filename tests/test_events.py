"""TensorBoard events beside metrics.jsonl, read back with TensorBoard's own reader; a resumed run's events after
its checkpoint are purged as its metrics lines are."""
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from schemas.events import scalars
from schemas.rundir import RunDir


def _read(run: RunDir) -> EventAccumulator:
    acc = EventAccumulator(str(run.path / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return acc


def test_metrics_and_evaluations_are_tensorboard_scalars(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    for step in (1, 2, 3):
        run.log({"step": step, "epoch": 0, "loss": 2.0 / step, "kd_cls": 0.5, "lr": 0.01 * step, "num_pos": 7,
                 "images_per_s": 30.0, "data_wait_ms": 0.1, "policy": "auto", "teacher_ratio": 0.25,
                 "teacher_ratio_by_level": [0.5, float("nan")], "teacher_ratio_by_size": {"small": 0.1}})
    run.add_eval({"epoch": 0, "step": 3, "network": "a", "stats": {"AP": 0.42, "AP50": 0.7, "APl": -1.0}})
    run.add_eval({"epoch": 0, "step": 3, "network": "b", "stats": {"AP": 0.4}})
    tags = set(_read(run).Tags()["scalars"])
    assert {"loss/loss", "loss/kd_cls", "train/lr", "train/num_pos", "speed/images_per_s", "speed/data_wait_ms",
            "colad/teacher_ratio", "colad/teacher_ratio_by_level/level0", "colad/teacher_ratio_by_size/small",
            "eval/AP", "eval/AP50", "eval_b/AP"} <= tags
    assert "eval/APl" not in tags and "colad/teacher_ratio_by_level/level1" not in tags  # -1 and NaN: no value
    acc = _read(run)
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss/loss")] == [(1, 2.0), (2, 1.0), (3, 0.666667)]
    assert abs(acc.Scalars("eval/AP")[0].value - 0.42) < 1e-6


def test_a_resumed_run_replaces_the_events_after_its_checkpoint(tmp_path):
    first = RunDir(tmp_path / "r")
    first.path.mkdir()
    for step in (1, 2, 3, 4):
        first.log({"step": step, "epoch": 0, "loss": 10.0})
    resumed = RunDir(tmp_path / "r")  # another process, resuming from the checkpoint of step 2
    for step in (3, 4, 5):
        resumed.log({"step": step, "epoch": 0, "loss": 1.0})
    events = _read(resumed).Scalars("loss/loss")
    assert [(e.step, e.value) for e in events] == [(1, 10.0), (2, 10.0), (3, 1.0), (4, 1.0), (5, 1.0)]


def test_scalars_skip_text_and_bools():
    assert scalars({"step": 1, "policy": "auto", "resumed": True, "loss": 1}) == {"loss/loss": 1.0}


def test_a_training_run_writes_its_events(tmp_path):
    """`lad train` in-process: the steps' losses and the final evaluation land in <run>/tensorboard/."""
    from pipeline.local import train
    from tests.tiny import make_data, tiny_config

    cfg = tiny_config(make_data(tmp_path / "d", num_train=8, num_val=4), tmp_path / "runs", mode="paa",
                      train={"max_steps": 2})
    train(cfg, progress=False)
    acc = _read(RunDir(cfg.run_dir))
    assert [e.step for e in acc.Scalars("loss/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("eval/AP")] == [2]


def test_a_rewind_in_the_same_process_starts_a_new_session(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    for step in (1, 2, 3, 4):
        run.log({"step": step, "epoch": 0, "loss": 10.0})
    run.rewind(2)  # as the split coordinator after a lost worker group
    for step in (3, 4):
        run.log({"step": step, "epoch": 0, "loss": 1.0})
    assert [(e.step, e.value) for e in _read(run).Scalars("loss/loss")] == [(1, 10.0), (2, 10.0), (3, 1.0), (4, 1.0)]


def test_events_that_cannot_be_written_are_one_warning_and_the_metrics_go_on(tmp_path, capsys):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    (run.path / "tensorboard").write_text("a file where the folder should be")
    for step in (1, 2):
        run.log({"step": step, "epoch": 0, "loss": 1.0})
    err = capsys.readouterr().err
    assert err.count("TensorBoard events are off") == 1 and "metrics.jsonl is complete" in err
    assert [m["step"] for m in run.iter_metrics()] == [1, 2]


def test_an_evaluation_made_again_after_a_resume_replaces_the_one_before(tmp_path):
    """An attempt that evaluated at the step of its checkpoint and died before rewriting last.pt leaves that
    evaluation, which the resumed run (rewound to that step) makes again: eval.json keeps one per epoch."""
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    run.add_eval({"epoch": 0, "step": 2, "network": "a", "stats": {"AP": 0.6}})
    RunDir(tmp_path / "r").rewind(2)
    again = RunDir(tmp_path / "r")
    again.add_eval({"epoch": 0, "step": 2, "network": "a", "stats": {"AP": 0.5}})
    again.add_eval({"epoch": 0, "step": 2, "network": "b", "stats": {"AP": 0.4}})
    again.add_eval({"epoch": 1, "step": 4, "network": "a", "stats": {"AP": 0.7}})
    assert [(e["epoch"], e["network"], e["stats"]["AP"]) for e in again.evals()] == [
        (0, "a", 0.5), (0, "b", 0.4), (1, "a", 0.7)]

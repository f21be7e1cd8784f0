"""The control plane's incremental metrics index answers what a whole read of metrics.jsonl answers: pages and
the roles view, while the file grows, after a torn line is completed, and after a resume rewrites it."""
import json

from schemas.rundir import RunDir
from services.metrics_index import MetricsIndex


def _line(step, **extra):
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "policy": "auto", "teacher_ratio": 0.25,
            "teacher_ratio_by_level": [0.5, 0.0], "teacher_ratio_by_size": {"small": 0.1}, **extra}


def _same(index: MetricsIndex, run: RunDir):
    fresh = MetricsIndex(run)
    fresh.refresh()
    for since in (None, 0, 3, 7, 100):
        for limit in (1, 4, 1000):
            assert index.page(since, limit) == run.metrics_page(since, limit), (since, limit)
    assert list(index.history) == list(fresh.history) and index.changes == fresh.changes
    assert index.reported == fresh.reported


def test_the_index_follows_appends_torn_lines_and_a_resume(tmp_path):
    run = RunDir(tmp_path)
    index = MetricsIndex(run)
    index.refresh()
    assert index.page(None, 10) == ([], False)
    for step in range(1, 6):
        run.log(_line(step))
    run.log({"step": 5, "event": "policy", "policy": "pin-b"})
    run.log({"note": "a record without a step"})
    run.flush()
    index.refresh()
    _same(index, run)
    assert [c.policy for c in index.changes] == ["pin-b"] and index.reported == "pin-b"
    with open(run.metrics_path, "a") as f:          # a line being appended: not a record yet
        f.write(json.dumps(_line(6, policy="pin-b"))[:20])
    index.refresh()
    _same(index, run)
    assert index.page(5, 10) == ([], False)
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(_line(6, policy="pin-b"))[20:] + "\n")
    index.refresh()
    _same(index, run)
    assert [m["step"] for m in index.page(5, 10)[0]] == [6]
    RunDir(tmp_path).rewind(3)                       # a resume from step 3 rewrites the file ...
    again = RunDir(tmp_path)
    for step in range(4, 9):                         # ... and logs the steps after it again, longer
        again.log(_line(step, extra_field="x" * 40))
    again.flush()
    index.refresh()
    _same(index, run)
    steps = [m.get("step") for m in index.page(None, 100)[0]]
    assert steps == [1, 2, 3, None, 4, 5, 6, 7, 8] and index.changes == []   # the note has no step: kept
    run.metrics_path.delete()
    index.refresh()
    assert index.page(None, 10) == ([], False) and list(index.history) == []

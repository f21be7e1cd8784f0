"""The assignment service end to end on a private 2-CPU local Ray (one session for the module): the same losses
as in-process LAD, and every image exactly once per epoch with 2 workers, a killed assigner actor, a killed
Train worker, a SIGTERM stop and a resume. Image ids are counted from per-step traces the workers write."""
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.evaluate_checkpoint import evaluate_checkpoint
from tests.tiny import make_data, make_teacher, tiny_config
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream_ray")
    data = make_data(root / "data")
    teacher = make_teacher(tiny_config(data, root / "runs", mode="paa"), root / "teacher.pt")
    return root, data, teacher


def traced_ids(trace_dir: Path) -> dict[int, Counter]:
    """epoch -> Counter of image ids trained in it (from every rank's trace)."""
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    for path in trace_dir.glob("trace.rank*.jsonl"):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            per_epoch[rec["epoch"]].update(rec["ids"])
    return per_epoch


def assert_exactly_once(trace_dir: Path, all_ids: set, epochs: int) -> None:
    per_epoch = traced_ids(trace_dir)
    assert sorted(per_epoch) == list(range(epochs))
    for epoch, counts in per_epoch.items():
        assert set(counts) == all_ids, f"epoch {epoch}: missing {sorted(all_ids - set(counts))}"
        twice = {i: c for i, c in counts.items() if c != 1}
        assert not twice, f"epoch {epoch}: trained more than once: {twice}"


def image_ids(data: Path) -> set:
    return {im["id"] for im in json.loads((data / "train.json").read_text())["images"]}


def test_lad_through_the_service_trains_like_in_process(ray_session, tiny):
    """20 deterministic CPU steps (4 epochs of 6 batches, mid-epoch end), 1 worker: the same losses, the same
    assignment (num_pos), the same weights, evaluations and checkpoint progress as the in-process run."""
    from pipeline.local import train as local_train
    from pipeline.ray_driver import train as stream_train

    root, data, teacher = tiny
    sections = dict(train={"epochs": 4, "max_steps": 20, "eval_every": 2, "checkpoint_every": 5})
    local_cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, **sections)
    local_cfg.name = "equal_local"
    ray_cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, **sections)
    ray_cfg.name = "equal_ray"
    ray_cfg.pipeline.engine = "ray"
    local_eval = local_train(local_cfg, progress=False)
    threads = torch.get_num_threads()
    ray_eval = stream_train(ray_cfg, progress=False)
    torch.set_num_threads(threads)

    def steps(cfg):
        return [m for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]

    a, b = steps(local_cfg), steps(ray_cfg)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, 21))
    for x, y in zip(a, b):
        for key in ("loss", "loss_cls", "loss_box", "loss_iou", "num_pos", "lr", "epoch"):
            assert x[key] == y[key], (x["step"], key, x[key], y[key])
    assert all(m["data_wait_ms"] >= 0 and m["assign_ms"] > 0 and m["teacher_lag"] == 0 for m in b)
    assert ray_eval == local_eval and ray_eval["a"]["AP"] >= 0
    evals = [json.loads((c.run_dir / "eval.json").read_text()) for c in (local_cfg, ray_cfg)]
    assert evals[0] == evals[1] and [e["epoch"] for e in evals[0]] == [1, 3]
    ca, cb = load_checkpoint(local_cfg.run_dir / "checkpoints/last.pt"), load_checkpoint(ray_cfg.run_dir /
                                                                                         "checkpoints/last.pt")
    assert ca["step"] == cb["step"] == 20 and ca["progress"] == cb["progress"]
    assert ca["progress"]["epoch"] == 3 and len(ca["progress"]["trained_ids"]) == 8
    for k, v in ca["models"]["a"].items():
        assert torch.equal(v, cb["models"]["a"][k]), k
    progress = json.loads((ray_cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 20
    assert (ray_cfg.run_dir / "checkpoints/best.pt").exists() and (ray_cfg.run_dir / "config.yaml").exists()


def test_two_workers_and_a_killed_assigner_train_every_image_once_per_epoch(ray_session, tiny):
    """2 DDP workers, batch 5: 24 images = 2 steps of 5+5 and a last step of 2+2 (nothing dropped). The test
    SIGKILLs the assigner actor (its pid from the trace) while it holds its 2nd batch (assigned, not yet
    returned); Ray restarts it and re-runs that batch."""
    from pipeline.ray_driver import train as stream_train
    from tests.tracing import KillFromOutside, Tracer

    root, data, teacher = tiny
    faults_dir = root / "faults_assigner"
    faults_dir.mkdir()
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, train={"epochs": 2, "batch_size": 5},
                      pipeline={"num_workers": 2, "assigners": 1})
    cfg.name = "two_workers"
    # the 2nd batch's assigner, while it holds that batch (the tracer sleeps after writing its line)
    with KillFromOutside(faults_dir / "assigned.jsonl", lambda batches: len(batches) >= 2) as kill:
        stream_train(cfg, progress=False, observers=(Tracer(faults_dir, assign_sleep_s=1.0),))
    assert kill.killed, "the assigner was not killed"
    assert_exactly_once(faults_dir, image_ids(data), epochs=2)
    steps = [json.loads(line) for line in (faults_dir / "trace.rank0.jsonl").read_text().splitlines()]
    steps1 = [json.loads(line) for line in (faults_dir / "trace.rank1.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [s["step"] for s in steps1] == [1, 2, 3, 4, 5, 6]
    assert sorted(len(s["ids"]) for s in steps + steps1) == [2] * 4 + [5] * 8
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints/last.pt")
    assert ckpt["step"] == 6 and ckpt["progress"] == {"epoch": 2, "trained_ids": []}
    metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {m["workers_active"] for m in metrics} == {2} and all(m["images_per_s"] > 0 for m in metrics)
    # the final evaluation was sharded over both workers: it scores as one process evaluating last.pt
    final = json.loads((cfg.run_dir / "eval.json").read_text())[-1]
    alone = evaluate_checkpoint(str(cfg.run_dir / "checkpoints/last.pt"), cfg.data.val, progress=False)["a"]
    assert final["step"] == 6 and final["stats"] == pytest.approx(alone, abs=1e-6)


def test_run_ahead_stays_within_its_bound_when_the_teacher_is_much_faster(ray_session, tiny):
    """A tiny teacher (ResNet-18, narrow) and a slow student (ResNet-50): the pool could assign the whole run while
    the student trains on its first batch. With `pipeline.max_batches_ahead: 3` (the least for one worker that
    prefetches 1) the stream never holds more than 3 batches that are assigned and not trained on, and reaches that
    bound (so the teacher was held back)."""
    from pipeline.ray_driver import train as stream_train

    root, data, teacher = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, train={"epochs": 2, "batch_size": 2},
                      pipeline={"max_batches_ahead": 3, "prefetch_batches": 1})
    cfg.name = "bounded"
    cfg.model.depth = 50
    stream_train(cfg, progress=False)
    metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 25))
    assert all(0 <= m["backlog"] <= 3 and m["peak_backlog"] <= 3 for m in steps)
    assert max(m["peak_backlog"] for m in steps) == 3
    assert all(m["object_store_peak_bytes"] >= m["object_store_bytes"] >= 0 for m in steps)


class ProgressWatcher:
    """Every distinct progress.json a run writes, read every 20 ms from a thread (what GET /runs/{id} shows)."""

    def __init__(self, path):
        import threading
        self.path, self.seen, self.done = path, [], threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self):
        while not self.done.is_set():
            try:
                p = json.loads(self.path.read_text())
            except (OSError, ValueError):
                p = None
            if p and (not self.seen or p != self.seen[-1]):
                self.seen.append(p)
            self.done.wait(0.02)

    def __enter__(self):
        self.thread.start()
        return self.seen

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self._watch_once()

    def _watch_once(self):
        p = json.loads(self.path.read_text())
        if not self.seen or p != self.seen[-1]:
            self.seen.append(p)


def test_two_workers_recover_when_one_is_killed_from_outside(ray_session, tiny):
    """2 DDP workers: the test SIGKILLs rank 1's process (its pid from the trace) after its 2nd step. The surviving
    rank's collective fails ("Connection closed by peer"): a lost peer, not a bug, so the driver resumes from
    last.pt with a new group and the run succeeds by itself, every image trained exactly once per epoch."""
    from pipeline.ray_driver import train as stream_train
    from tests.tracing import KillFromOutside, Tracer

    root, data, teacher = tiny
    trace_dir = root / "faults_peer"
    trace_dir.mkdir()
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher,
                      train={"epochs": 2, "checkpoint_every": 1}, pipeline={"num_workers": 2, "max_failures": 1})
    cfg.name = "lost_peer"
    trace = trace_dir / "trace.rank1.jsonl"
    with KillFromOutside(trace, lambda steps: steps[-1]["step"] >= 2) as kill, \
            ProgressWatcher(cfg.run_dir / "progress.json") as seen:
        stream_train(cfg, progress=False, observers=(Tracer(trace_dir, step_sleep_s=0.3),))
    assert kill.killed, "rank 1 was not killed"
    recovering = [p for p in seen if p["state"] == "recovering"]
    assert recovering, f"the recovery never showed in progress.json: {[p['state'] for p in seen]}"
    assert recovering[0]["recovery"]["attempt"] == 1 and recovering[0]["recovery"]["max"] == 1
    assert "a training worker was lost" in recovering[0]["recovery"]["reason"]
    assert seen.index(recovering[-1]) < len(seen) - 1 and seen[-1]["state"] == "succeeded"
    assert_exactly_once(trace_dir, image_ids(data), epochs=2)
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == progress["total_steps"] == 6
    steps = [m["step"] for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())]
    assert steps == list(range(1, 7)), "metrics.jsonl must hold each step once after the recovery"
    pids = {json.loads(x)["pid"] for x in trace.read_text().splitlines()}
    assert len(pids) == 2 and kill.killed[0] in pids, "rank 1's steps after the recovery come from a new process"


def test_a_lost_stream_monitor_beyond_max_failures_ends_with_one_line_and_a_whole_checkpoint(ray_session, tiny,
                                                                                             capsys, monkeypatch):
    """`lad train` of a LAD stream with no recoveries allowed: the test SIGKILLs the stream's monitor actor
    (found by its process title) after step 2. The run ends with one line naming what was lost and the
    checkpoint to resume from, exit status 1, and that checkpoint loads."""
    from pipeline.run import main
    from tests.tracing import KillFromOutside, Tracer, pids_of

    root, data, teacher = tiny
    trace_dir = root / "trace_monitor"
    trace_dir.mkdir()
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, train={"epochs": 3, "checkpoint_every": 1},
                      pipeline={"engine": "ray", "max_failures": 0})
    cfg.name = "lost_monitor"
    config = root / "lost_monitor.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    import pipeline.ray_driver as driver
    real_train = driver.train   # the CLI's run, with the test's tracer handed to it
    monkeypatch.setattr(driver, "train",
                        lambda c, **kw: real_train(c, observers=(Tracer(trace_dir, step_sleep_s=0.3),), **kw))
    with KillFromOutside(trace_dir / "trace.rank0.jsonl", lambda steps: steps[-1]["step"] >= 2,
                         target=lambda: pids_of("ray::StreamMonitor")) as kill:
        status = main([str(config), "--quiet"])
    assert len(kill.killed) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert status == 1 and len(err) == 1, err
    assert "the stream monitor was lost" in err[0] and str(cfg.run_dir / "checkpoints/last.pt") in err[0]
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints/last.pt")
    assert ckpt["step"] >= 1 and ckpt["progress"]["epoch"] == 0
    assert json.loads((cfg.run_dir / "progress.json").read_text())["state"] == "failed"


def test_lad_train_recovers_a_killed_worker_and_stops_on_sigterm(tiny):
    """A Ray-engine run in a subprocess (its own in-process local Ray): the test SIGKILLs its Train worker (the pid
    in the worker's trace) once it has taken step 3 (last checkpoint at step 2 or 4), and the run resumes from
    last.pt by itself; then SIGTERM stops it mid-run (state 'stopped', exit 0). Every image is trained at most once
    per epoch, all of them in the finished epochs, the checkpoint's trained ids are exactly those of the stopped
    epoch, and after the recovery the teacher never saw an image its epoch had already trained."""
    root, data, teacher = tiny
    faults_dir = root / "faults_worker"
    faults_dir.mkdir()
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher,
                      train={"epochs": 3, "checkpoint_every": 2}, pipeline={"engine": "ray", "max_failures": 1})
    cfg.name = "kill_and_stop"
    path = root / "kill_and_stop.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    marker = faults_dir / "worker.killed"
    tracer = {"trace_dir": str(faults_dir), "step_sleep_s": 0.4}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    log = root / "kill_and_stop.log"  # not a pipe: unread while the run goes, a full pipe would block its prints
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "run_traced.py"), str(path), json.dumps(tracer)],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    metrics, trace = cfg.run_dir / "metrics.jsonl", faults_dir / "trace.rank0.jsonl"
    deadline = time.time() + 600  # generous: a loaded 2-core machine runs this several times slower
    try:
        while time.time() < deadline and proc.poll() is None:
            if not marker.exists():
                steps = [json.loads(x) for x in (trace.read_text().splitlines() if trace.exists() else [])]
                at_3 = [s for s in steps if s["step"] >= 3]
                if at_3:
                    os.kill(at_3[0]["pid"], signal.SIGKILL)
                    marker.write_text(str(at_3[0]["pid"]))
            else:
                lines = metrics.read_text().splitlines() if metrics.exists() else []
                if any(json.loads(x).get("step", 0) >= 8 for x in lines):
                    proc.send_signal(signal.SIGTERM)
                    break
            time.sleep(0.1)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "a training worker was lost" in out, out[-3000:]
    # the console of a normal run: the driver's bar (and the recovery on it), none of Ray's internal lines
    assert f"lad {cfg.name}" in out and "(recovering 1/" in out, out[-3000:]
    for noise in ("(TrainController", "core_worker.cc", "Progress bars disabled", "Token authentication",
                  "(RayTrainWorker"):
        assert noise not in out, f"{noise!r} on the console:\n{out[-3000:]}"
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "stopped", progress
    ckpt = load_checkpoint(cfg.run_dir / "checkpoints/last.pt")
    assert 8 <= ckpt["step"] < 18 and ckpt["step"] == progress["step"]
    stopped_epoch, stopped_ids = ckpt["progress"]["epoch"], ckpt["progress"]["trained_ids"]

    per_epoch = traced_ids(faults_dir)
    all_ids = image_ids(data)
    for epoch, counts in per_epoch.items():
        assert all(c == 1 for c in counts.values()), f"epoch {epoch}: {counts}"
        if epoch < stopped_epoch:
            assert set(counts) == all_ids
    assert sorted(per_epoch.get(stopped_epoch, {})) == sorted(stopped_ids)
    steps = [m["step"] for m in map(json.loads, metrics.read_text().splitlines())]
    assert steps == list(range(1, ckpt["step"] + 1)), "metrics.jsonl must hold each step once after the recovery"

    before_kill = {i for rec in map(json.loads, (faults_dir / "trace.rank0.jsonl").read_text().splitlines())
                   if rec["step"] <= 2 for i in rec["ids"]}          # trained and checkpointed before the kill
    assigned = [json.loads(line) for line in (faults_dir / "assigned.jsonl").read_text().splitlines()]
    after = {i for rec in assigned if rec["time"] > marker.stat().st_mtime and rec["epoch"] == 0 for i in rec["ids"]}
    assert len(before_kill) == 8 and after and not after & before_kill, \
        "the recovered run sent already-trained images to the teacher"

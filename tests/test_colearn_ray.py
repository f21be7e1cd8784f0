"""Co-learning through Ray on a private 2-CPU local Ray (one session for the module): `inline` and `split` train
exactly what the in-process CoLAD loop trains (same assignments, losses, evaluations, weights, checkpoints), and
the coordinator picks up the control plane's roles.json and pushes it to the trainer without costing a step."""
import json
import time
from pathlib import Path

import pytest
import torch

from tests.tiny import make_data, tiny_config
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e

TIMING = ("_ms", "images_per_s", "workers_active")


def _metrics(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_split_run_whole(cfg, data, trace_dir) -> None:
    """A 2-epoch split run that lost a process: it succeeded by itself, each side trained every image once per
    epoch (its rank 0's trace), and each of its 6 steps is in metrics.jsonl once."""
    all_ids = {im["id"] for im in json.loads((data / "train.json").read_text())["images"]}
    for name in ("a", "b"):
        per_epoch = {}
        for rec in map(json.loads, (trace_dir / f"trace.{name}.rank0.jsonl").read_text().splitlines()):
            per_epoch.setdefault(rec["epoch"], []).extend(rec["ids"])
        assert sorted(per_epoch) == [0, 1] and all(sorted(v) == sorted(all_ids) for v in per_epoch.values()), name
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 6
    assert [m["step"] for m in _metrics(cfg) if "loss" in m] == list(range(1, 7))


def _cfg(data, out, name, engine, mode="inline"):
    cfg = tiny_config(data, out, mode="colad",
                      train={"epochs": 2, "max_steps": 5, "eval_every": 1, "checkpoint_every": 2},
                      colearn={"mode": mode}, pipeline={"engine": engine})
    cfg.name = name
    return cfg


def test_inline_and_split_train_exactly_the_in_process_colad(ray_session, tmp_path):
    """12 images, batch 4, 5 steps over 2 epochs (the 2nd cut mid-epoch), evaluation every epoch, checkpoint every
    2 steps. In split, network B's worker raises before step 4: A must fail at once (not wait out the exchange
    timeout), then the run resumes from last.pt (checkpoint written by the coordinator, split back per side). Every logged number (losses of A and B, positives, teacher ratio per level and size), eval.json,
    both networks' weights, the optimizer state and the checkpoints equal the in-process run's; inline's and
    split's per-step assignment digests are equal."""
    from pipeline.ray_driver import train as ray_train
    from pipeline.local import train as local_train
    from tests.tracing import Tracer

    data = make_data(tmp_path / "data", num_train=12, num_val=4)
    out = tmp_path / "runs"
    local = _cfg(data, out, "local", "local")
    threads = torch.get_num_threads()
    local_eval = local_train(local, progress=False)
    traces, runs = {}, {}
    for mode in ("inline", "split"):
        cfg = _cfg(data, out, mode, "ray", mode)
        cfg.colearn.exchange_timeout_s = 900
        traces[mode] = tmp_path / f"trace_{mode}"
        traces[mode].mkdir()
        tracer = Tracer(traces[mode])
        if mode == "inline":  # straight through (stopping a live inline run: tests/test_colearn_rest.py)
            assert ray_train(cfg, progress=False, observers=(tracer,)) == local_eval
            runs[mode] = (cfg, 0)
            continue
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="side b rank 0: RuntimeError: injected failure before step 4"):
            ray_train(cfg, progress=False, observers=(Tracer(traces[mode], fail_at_step={"tag": "b", "step": 4}),))
        # waiting out the exchange timeout would take 900 s on top of the run; failing at once takes the run
        assert time.monotonic() - t0 < cfg.colearn.exchange_timeout_s, "side A waited for the dead side B"
        progress = json.loads((cfg.run_dir / "progress.json").read_text())
        assert progress["state"] == "failed" and "injected failure" in progress["error"]
        stopped_at = load_checkpoint(cfg.run_dir / "checkpoints" / "last.pt")["step"]
        assert 2 <= stopped_at <= 3
        assert ray_train(cfg, progress=False, observers=(tracer,)) == local_eval  # resumes from last.pt
        runs[mode] = (cfg, stopped_at)
    torch.set_num_threads(threads)

    ref = _metrics(local)
    assert [m["step"] for m in ref] == [1, 2, 3, 4, 5]
    for mode, (cfg, stopped_at) in runs.items():
        got = _metrics(cfg)
        assert [m["step"] for m in got] == [1, 2, 3, 4, 5], mode
        for x, y in zip(ref, got):
            for key, value in x.items():
                if not key.endswith(TIMING):
                    assert y.get(key) == value, (mode, x["step"], key, value, y.get(key))
        evals = json.loads((cfg.run_dir / "eval.json").read_text())
        assert evals == json.loads((local.run_dir / "eval.json").read_text())
        assert [(e["epoch"], e["network"]) for e in evals] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
        progress = json.loads((cfg.run_dir / "progress.json").read_text())
        assert progress["state"] == "succeeded" and progress["step"] == 5
        for ckpt in ("last.pt", "best.pt"):
            a, b = load_checkpoint(local.run_dir / "checkpoints" / ckpt), load_checkpoint(cfg.run_dir / "checkpoints" / ckpt)
            assert (a["step"], a["epoch"], a["progress"], a["best"], a["policy"]) == \
                (b["step"], b["epoch"], b["progress"], b["best"], b["policy"]), (mode, ckpt)
            for net in ("a", "b"):
                for k, v in a["models"][net].items():
                    assert torch.equal(v, b["models"][net][k]), (mode, ckpt, net, k)
            for k, v in a["optimizer"]["state"].items():
                assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"]), (mode, k)
        summary = json.loads((cfg.run_dir / "colearn.json").read_text())  # of the last (resumed) run
        assert [s["step"] for s in summary["steps"]] == list(range(stopped_at + 1, 6))
        assert [s["teacher_ratio"] for s in summary["steps"]] == [m["teacher_ratio"] for m in ref[stopped_at:]]
        assert summary["history"][0] == {**summary["history"][0], "policy": "auto", "from_step": stopped_at + 1,
                                         "source": "checkpoint" if stopped_at else "config"}
        assert summary["totals"]["by_size"]

    def digests(path: Path) -> dict:  # step -> assignment digest; a step trained again after a crash must agree
        out = {}
        for rec in map(json.loads, path.read_text().splitlines()):
            assert out.setdefault(rec["step"], rec["labels"]) == rec["labels"], rec
        return out

    inline = digests(traces["inline"] / "trace.inline.rank0.jsonl")
    assert sorted(inline) == [1, 2, 3, 4, 5]
    for side in ("a", "b"):
        assert digests(traces["split"] / f"trace.{side}.rank0.jsonl") == inline


def test_inline_with_two_workers_recovers_when_one_is_killed_from_outside(ray_session, tmp_path):
    """Inline co-learning, 2 workers: the test SIGKILLs rank 1's process (its pid from the trace) after its 2nd
    step; the driver resumes the group from last.pt, the coordinator forgets the role records after it, and the run
    succeeds by itself: every image once per epoch, each step once in metrics.jsonl and in colearn.json."""
    from collections import Counter

    from pipeline.ray_driver import train as ray_train
    from tests.tracing import KillFromOutside, Tracer

    data = make_data(tmp_path / "data", num_train=12, num_val=4)
    cfg = tiny_config(data, tmp_path / "runs", mode="colad", train={"epochs": 2, "checkpoint_every": 1},
                      pipeline={"engine": "ray", "num_workers": 2, "max_failures": 1})
    cfg.name = "inline_lost_peer"
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    with KillFromOutside(trace_dir / "trace.inline.rank1.jsonl", lambda steps: steps[-1]["step"] >= 2) as kill:
        ray_train(cfg, progress=False, observers=(Tracer(trace_dir, step_sleep_s=0.3),))
    assert kill.killed, "rank 1 was not killed"
    per_epoch = {}
    for path in trace_dir.glob("trace.inline.rank*.jsonl"):
        for rec in map(json.loads, path.read_text().splitlines()):
            per_epoch.setdefault(rec["epoch"], Counter()).update(rec["ids"])
    all_ids = {im["id"] for im in json.loads((data / "train.json").read_text())["images"]}
    assert sorted(per_epoch) == [0, 1]
    for epoch, counts in per_epoch.items():
        assert set(counts) == all_ids and set(counts.values()) == {1}, (epoch, counts)
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 4
    assert [m["step"] for m in _metrics(cfg) if "loss" in m] == [1, 2, 3, 4]
    summary = json.loads((cfg.run_dir / "colearn.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3, 4]


def test_split_recovers_when_a_worker_of_each_side_is_killed_from_outside(ray_session, tmp_path):
    """Split co-learning: the test SIGKILLs side A's worker (its pid from the trace) after its 2nd step and, once
    the run has recovered, side B's after its 4th. Each time the driver closes the other side's rendezvous at once
    (not after the 900 s exchange timeout) and resumes both groups from last.pt, and the run succeeds by itself:
    every image once per epoch on each side, each step once in metrics.jsonl and colearn.json. (One run for both
    sides: a Ray run is the costly part of this test.)"""
    from pipeline.ray_driver import train as ray_train
    from tests.tracing import KillFromOutside, Tracer

    data = make_data(tmp_path / "data", num_train=12, num_val=4)
    cfg = tiny_config(data, tmp_path / "runs", mode="colad", train={"epochs": 2, "checkpoint_every": 1},
                      pipeline={"engine": "ray", "max_failures": 2}, colearn={"mode": "split"})
    cfg.name = "split_lost_a_then_b"
    cfg.colearn.exchange_timeout_s = 900
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    t0 = time.monotonic()
    with KillFromOutside(trace_dir / "trace.a.rank0.jsonl", lambda steps: steps[-1]["step"] >= 2) as kill_a, \
            KillFromOutside(trace_dir / "trace.b.rank0.jsonl", lambda steps: steps[-1]["step"] >= 4) as kill_b:
        ray_train(cfg, progress=False, observers=(Tracer(trace_dir, step_sleep_s=0.3),))
    assert kill_a.killed and kill_b.killed, f"killed: a {kill_a.killed}, b {kill_b.killed}"
    assert kill_a.killed != kill_b.killed
    assert time.monotonic() - t0 < cfg.colearn.exchange_timeout_s, "a side waited out the exchange timeout"
    _assert_split_run_whole(cfg, data, trace_dir)
    summary = json.loads((cfg.run_dir / "colearn.json").read_text())
    assert [s["step"] for s in summary["steps"]] == list(range(1, 7))


def test_split_recovers_when_the_coordinator_is_killed_from_outside(ray_session, tmp_path):
    """Split co-learning: the test SIGKILLs the coordinator actor's process (found by its title) after step 2.
    Both groups fail on their next call to it; the driver makes a new coordinator from last.pt (policy, step,
    best) and resumes both groups, and the run succeeds by itself with every image once per epoch on each side."""
    from pipeline.ray_driver import train as ray_train
    from tests.tracing import KillFromOutside, Tracer, pids_of

    data = make_data(tmp_path / "data", num_train=12, num_val=4)
    cfg = tiny_config(data, tmp_path / "runs", mode="colad", train={"epochs": 2, "checkpoint_every": 1},
                      pipeline={"engine": "ray", "max_failures": 1}, colearn={"mode": "split"})
    cfg.name = "split_lost_coordinator"
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    with KillFromOutside(trace_dir / "trace.a.rank0.jsonl", lambda steps: steps[-1]["step"] >= 2,
                         target=lambda: pids_of("ray::ColearnCoordinator")) as kill:
        ray_train(cfg, progress=False, observers=(Tracer(trace_dir, step_sleep_s=0.3),))
    assert len(kill.killed) == 1, f"killed {kill.killed}"
    _assert_split_run_whole(cfg, data, trace_dir)
    steps = [s["step"] for s in json.loads((cfg.run_dir / "colearn.json").read_text())["steps"]]
    assert steps == list(range(steps[0], 7)) and steps[0] >= 2   # the new coordinator's, from the checkpoint on
    assert load_checkpoint(cfg.run_dir / "checkpoints/last.pt")["step"] == 6


def test_coordinator_pushes_the_control_planes_request_within_a_step(ray_session, tmp_path):
    """PUT /runs/{id}/roles writes control/roles.json (schemas.rundir); the coordinator picks it up and the
    trainer's `PolicyWatch.poll()` sees the new version without ever blocking; polling costs microseconds."""
    import ray

    from pipeline.colearn import PolicyWatch, coordinator_name, get_or_create, lookup, NAMESPACE
    from schemas.rundir import RunDir

    data = make_data(tmp_path / "data", num_train=4, num_val=2)
    cfg = _cfg(data, tmp_path / "runs", "coord", "ray")
    cfg.run_dir.mkdir(parents=True)
    coordinator = get_or_create(cfg, "auto")
    try:
        assert get_or_create(cfg, "pin-a")._actor_id == coordinator._actor_id  # get_if_exists: the same actor
        assert lookup(cfg)._actor_id == coordinator._actor_id
        assert ray.get_actor(coordinator_name(cfg), namespace=NAMESPACE)._actor_id == coordinator._actor_id
        watch = PolicyWatch(coordinator)
        assert watch.poll() == {"version": 0, "policy": "auto", "stop": False}
        n, t0 = 2000, time.perf_counter()
        for _ in range(n):
            watch.poll()
        per_poll_ms = (time.perf_counter() - t0) * 1e3 / n
        assert per_poll_ms < 0.5, per_poll_ms

        RunDir(cfg.run_dir).request_roles("pin-b")
        t_put = time.perf_counter()
        while watch.poll()["policy"] != "pin-b":
            assert time.perf_counter() - t_put < 5, "the request did not reach the trainer"
            time.sleep(0.005)
        state = watch.poll()
        assert state["version"] == 1
        ray.get(coordinator.applied.remote(7, "pin-b"))  # rank 0 switched before step 8
        ray.get(coordinator.set_policy.remote("alternate:3"))
        while watch.poll()["policy"] != "alternate:3":
            time.sleep(0.005)
        ray.get(coordinator.request_stop.remote())
        while not watch.poll()["stop"]:
            time.sleep(0.005)
        (cfg.run_dir / "control" / "roles.json").write_text("{not json")  # a torn or foreign file is ignored
        time.sleep(0.2)
        summary = ray.get(coordinator.summary.remote())
        assert summary["requested"] == "alternate:3" and summary["policy"] == "pin-b"
        assert [(h["policy"], h["from_step"], h["source"]) for h in summary["history"]] == \
            [("auto", 1, "config"), ("pin-b", 8, "rest")]
    finally:
        ray.kill(coordinator)

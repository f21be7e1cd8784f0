"""The assignment store (`pipeline.assignment_store`) on a private 2-CPU local Ray: a LAD student fed from the store
trains exactly as in-process LAD does (same losses at every step, same weights), over 2 epochs, whether the store
starts empty, full, or cut; a store made for other labels is refused in one line before Ray starts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.tiny import make_data, make_teacher, tiny_config
from trainer.checkpoint import load_checkpoint

pytestmark = pytest.mark.e2e
SECTIONS = dict(train={"epochs": 2, "eval_every": 0, "checkpoint_every": 1000})
STEPS = 12  # 2 epochs of 24 images in batches of 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The in-process LAD run every stored run must equal."""
    from pipeline.local import train as local_train

    root = tmp_path_factory.mktemp("store")
    data = make_data(root / "data")
    teacher = make_teacher(tiny_config(data, root / "runs", mode="paa"), root / "teacher.pt")
    reference = tiny_config(data, root / "runs", mode="lad", teacher=teacher, **SECTIONS)
    reference.name = "reference"
    local_train(reference, progress=False)
    return root, data, teacher, reference


def steps(cfg) -> list[dict]:
    return [m for m in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


def stored_run(tiny, name: str, store: Path, assigners: int = 1):
    from pipeline.ray_driver import train as stream_train

    root, data, teacher, _ = tiny
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, **SECTIONS)
    cfg.name = name
    cfg.pipeline.engine = "ray"
    cfg.pipeline.assigners = assigners
    cfg.pipeline.assignment_store = str(store)
    threads = torch.get_num_threads()
    stream_train(cfg, progress=False)
    torch.set_num_threads(threads)
    return cfg


def assert_same_training(cfg, reference) -> None:
    a, b = steps(reference), steps(cfg)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in ("loss", "loss_cls", "loss_box", "loss_iou", "num_pos"):
            assert x[key] == y[key], (cfg.name, x["step"], key, x[key], y[key])
    ref, got = (load_checkpoint(c.run_dir / "checkpoints/last.pt")["models"]["a"] for c in (reference, cfg))
    for k, v in ref.items():
        assert torch.equal(v, got[k]), k


def teacher_actors() -> int:
    """Teacher-assigner actors this Ray has ever started (dead ones included), from Ray's state API."""
    from ray.util.state import list_actors

    return sum(1 for a in list_actors(limit=10_000, raise_on_missing_output=False)
               if "TeacherAssigner" in (a.class_name or ""))


def views_in(store: Path) -> int:
    import pyarrow as pa

    total = 0
    for part in (store / "parts").glob("*.arrow"):
        with pa.ipc.open_file(pa.memory_map(str(part))) as f:
            total += f.read_all().num_rows
    return total


def readable_views(store: Path) -> set:
    """The (image id, flip) keys of every part that reads whole (a cut part is skipped, as the store skips it)."""
    import pyarrow as pa

    keys = set()
    for part in (store / "parts").glob("*.arrow"):
        try:
            table = pa.ipc.open_file(pa.memory_map(str(part))).read_all()
        except (pa.ArrowInvalid, OSError):
            continue
        keys |= set(zip(table["image_id"].to_pylist(), table["flip"].to_pylist()))
    return keys


@pytest.fixture(scope="module")
def filled(ray_session, tiny, tmp_path_factory):
    """A run that starts with an empty store: epoch 0 asks the teacher for every image, epoch 1 only for the views
    (flips) not seen in epoch 0. Returns (its config, the store)."""
    store = tmp_path_factory.mktemp("filled") / "store"
    return stored_run(tiny, "store_first", store), store


def test_a_student_fed_from_an_empty_store_trains_exactly_like_in_process_lad(filled, tiny):
    first, store = filled
    assert_same_training(first, tiny[3])
    taught = [m["teacher_images"] for m in steps(first)]
    assert sum(taught[:6]) == 24                  # epoch 0: 24 images, all new, each with its other flip
    assert sum(taught[6:]) == 0                   # epoch 1: every view is in the store
    assert views_in(store) == 48                  # 24 images x 2 flips, each stored once
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["anchor_hash"] and len(manifest["teacher_sha256"]) == 64


def test_a_cut_store_is_read_where_it_can_be_and_the_rest_is_computed_again(filled, tiny, tmp_path, capfd):
    """The store of a run killed mid-write: one part cut in half (as a crash of a non-atomic copy leaves it), one
    missing. Its readable views are used, the others recomputed, and training is still exactly in-process LAD. With
    two assigners allowed, the pool is Ray Data's autoscaling one (1 to 2 actors) behind the run-ahead gate."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(filled[1], store)
    parts = sorted((store / "parts").glob("*.arrow"))
    assert len(parts) >= 3
    cut, gone = parts[0], parts[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    gone.unlink()
    capfd.readouterr()
    pools = teacher_actors()
    again = stored_run(tiny, "store_cut", store, assigners=2)
    assert 1 <= teacher_actors() - pools <= 2
    assert_same_training(again, tiny[3])
    taught = sum(m["teacher_images"] for m in steps(again))
    assert 0 < taught < 24                         # only the lost views went to the teacher
    assert len(readable_views(store)) == 48        # and are back in the store, with their other flips
    err = capfd.readouterr().err
    assert f"{cut}: unreadable part of the assignment store" in err


def test_the_teacher_pool_is_sized_to_the_views_the_store_lacks(tiny, tmp_path):
    from pipeline.assignment_store import AssignmentStore, Labels, epoch_misses, pool_sizes
    from pipeline.transforms import aug_params_for

    root, data, teacher, _ = tiny
    cfg = tiny_config(data, tmp_path, mode="lad", teacher=teacher, pipeline={"engine": "ray"}, **SECTIONS)
    cfg.pipeline.assignment_store = str(tmp_path / "store")
    side, ids, none = cfg.data.input_size, list(range(1, 9)), np.zeros(0, np.int32)
    store = AssignmentStore(cfg.pipeline.assignment_store)
    for i in ids[:6]:   # epoch 0's views of six of the eight images
        store.put((i, aug_params_for(i, 0, cfg.seed, cfg.data.flip_prob), side, side),
                  Labels(side, side, none, none, none, 0))
    store.flush()
    flips = [[aug_params_for(i, e, cfg.seed, cfg.data.flip_prob) for i in ids] for e in range(3)]
    misses = epoch_misses(cfg, ids, [0, 1, 2])
    assert misses[0] == 2                     # the two images not stored (their other flips are labelled with them)
    assert misses[1] == sum(f1 != f0 for f0, f1 in zip(*[f[:6] for f in flips[:2]]))  # stored images' other flip
    assert misses[2] == sum(f2 not in (f0, f1) for f0, f1, f2 in zip(*[f[:6] for f in flips]))  # seen once only
    assert pool_sizes(4, misses, len(ids)) == (1, 1, 4)     # a quarter missing at first: one of four actors
    assert pool_sizes(4, [8, 3], 8) == (1, 4, 4)            # an empty store: the whole pool at first
    assert pool_sizes(4, [0, 0, 0], 8) == (0, 0, 0)         # all stored: no teacher at all
    assert pool_sizes(4, None, 8) == (4, 4, 4)              # keep-ratio inputs: the configured pool, fixed


def test_a_store_records_the_teachers_memory_layout(tiny, tmp_path):
    """NHWC is the same arithmetic in another order, so its labels may differ in a tie: another store."""
    from pipeline.assignment_store import manifest_for

    root, data, teacher, _ = tiny
    nchw = tiny_config(data, tmp_path, mode="lad", teacher=teacher, train={"channels_last": False})
    nhwc = tiny_config(data, tmp_path, mode="lad", teacher=teacher)   # the default since the NHWC switch
    assert manifest_for(nchw, "h", "s")["teacher_precision"] == "fp32"   # stores made before match this
    assert manifest_for(nhwc, "h", "s")["teacher_precision"] == "fp32-nhwc"


def test_a_store_of_another_teacher_is_refused_in_one_line_before_ray(tiny, tmp_path):
    root, data, teacher, _ = tiny
    other = make_teacher(tiny_config(data, root / "runs", mode="paa"), tmp_path / "other.pt", seed=7)
    store = tmp_path / "store"
    store.mkdir()
    cfg = tiny_config(data, tmp_path / "runs", mode="lad", teacher=other, pipeline={"engine": "ray"}, **SECTIONS)
    cfg.pipeline.assignment_store = str(store)
    from pipeline.assignment_store import manifest_for
    from trainer.worker import StreamSpec
    import hashlib

    made_by = manifest_for(cfg, StreamSpec.of(cfg).anchor_hash, hashlib.sha256(teacher.read_bytes()).hexdigest())
    (store / "manifest.json").write_text(json.dumps(made_by))
    config = tmp_path / "lad.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir()
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", str(config), "--quiet"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]   # (the tiny teachers record no categories)
    assert out.returncode == 2 and len(errors) == 1 and all(x.startswith(("warning: ", "error: ")) for x in lines)
    assert f"pipeline.assignment_store {store}: made for other labels, not used" in errors[0]
    assert "another teacher (checkpoint sha256)" in errors[0]
    assert list(ray_tmp.iterdir()) == [] and not (cfg.run_dir / "checkpoints").exists()


def test_the_store_is_for_lad_on_the_ray_engine(tiny, tmp_path):
    from schemas.config import ConfigError

    root, data, teacher, _ = tiny
    for mode, engine in (("solad", "ray"), ("lad", "local")):
        with pytest.raises(ConfigError, match="pipeline.assignment_store keeps a frozen teacher's hard labels"):
            tiny_config(data, tmp_path, mode=mode, teacher=teacher,
                        pipeline={"engine": engine, "assignment_store": str(tmp_path / "s")})


def test_lad_assign_fills_every_view_and_then_runs_ask_the_teacher_nothing(ray_session, tiny, tmp_path):
    from pipeline.prefill import fill_store

    root, data, teacher, reference = tiny
    store = tmp_path / "filled"
    cfg = tiny_config(data, root / "runs", mode="lad", teacher=teacher, pipeline={"engine": "ray"}, **SECTIONS)
    cfg.pipeline.assignment_store = str(store)
    done = fill_store(cfg, progress=False)
    assert done["views"] == 48 and done["stored_before"] == 0 and done["computed"] == 48   # 24 images x 2 flips
    # each image asked once, its other flip labelled in the same forward: 6 batches of 4, a part each, merged
    assert done["parts_merged"] == 6 and len(list((store / "parts").glob("*.arrow"))) == 1
    assert views_in(store) == 48
    again = fill_store(cfg, progress=False)                     # resumable: nothing left to do
    assert again["stored_before"] == 48 and again["computed"] == 0 and again["parts_merged"] == 0
    pools = teacher_actors()
    run = stored_run(tiny, "store_prefilled", store)
    assert [m["teacher_images"] for m in steps(run)] == [0] * STEPS   # the teacher was not asked once
    assert teacher_actors() == pools   # nor loaded: read tasks brought the labels, no assigner actor was started
    assert_same_training(run, reference)


def test_lad_assign_refuses_keep_ratio_inputs_in_one_line(tiny, tmp_path):
    root, data, teacher, _ = tiny
    cfg = tiny_config(data, tmp_path / "runs", mode="lad", teacher=teacher, pipeline={"engine": "ray"},
                      input_size=[96, 64], **SECTIONS)
    config = tmp_path / "lad.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = subprocess.run([sys.executable, "-m", "services.cli", "assign", str(config), "--set",
                          f"pipeline.assignment_store={tmp_path / 's'}"], capture_output=True, text=True, timeout=120)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "keeps the aspect ratio" in lines[0], out.stderr

"""Categories travel with the model: a run's checkpoints record its categories, `lad eval` maps a file that
renumbers them, a teacher whose categories come in another order is reordered, and one with other names is
refused."""
import json

import pytest
import torch

from pipeline.evaluate_checkpoint import evaluate_checkpoint
from pipeline.local import train as local_train
from schemas.config import ConfigError
from tests.tiny import make_data, make_teacher, tiny_config
from trainer.checkpoint import CheckpointError, load_checkpoint, load_network, save_checkpoint
from trainer.network import check_start


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("categories")
    data = make_data(root / "data")
    cfg = tiny_config(data, root / "runs", mode="paa", train={"max_steps": 2},
                      inference={"score_thr": 0.0, "max_det": 50})
    local_train(cfg, progress=False)
    return root, data, cfg


def file_categories(path):
    cats = sorted(json.loads(path.read_text())["categories"], key=lambda c: c["id"])
    return [{"id": c["id"], "name": c["name"]} for c in cats]


def renumbered(src, dst):
    """The same file with the category ids reversed: the same names, in the opposite id order."""
    data = json.loads(src.read_text())
    ids = sorted(c["id"] for c in data["categories"])
    new = {old: 1000 - old for old in ids}
    for c in data["categories"]:
        c["id"] = new[c["id"]]
    for a in data["annotations"]:
        a["category_id"] = new[a["category_id"]]
    dst.write_text(json.dumps(data))
    return dst


def test_categories_round_trip_through_a_checkpoint(trained):
    root, data, cfg = trained
    want = file_categories(data / "train.json")
    assert json.loads((cfg.run_dir / "categories.json").read_text()) == want
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(cfg.run_dir / "checkpoints" / name)["categories"] == want


def test_evaluation_on_a_renumbered_file_maps_the_categories(trained, tmp_path):
    root, data, cfg = trained
    ckpt = str(cfg.run_dir / "checkpoints" / "last.pt")
    other = renumbered(data / "val.json", tmp_path / "val_renumbered.json")
    same = evaluate_checkpoint(ckpt, str(data / "val.json"), out=str(tmp_path / "a.json"), progress=False)["a"]
    mapped = evaluate_checkpoint(ckpt, str(other), image_root=str(data), out=str(tmp_path / "b.json"),
                                 progress=False)["a"]
    assert mapped == pytest.approx(same, abs=1e-9) and same["AR100"] > 0   # classes averaged in another order
    old = torch.load(ckpt, weights_only=True)
    del old["categories"]   # a checkpoint from before categories were kept: taken in the file's order
    save_checkpoint(tmp_path / "old.pt", {k: v for k, v in old.items() if k not in ("format", "version")})
    unmapped = evaluate_checkpoint(str(tmp_path / "old.pt"), str(other), image_root=str(data),
                                   out=str(tmp_path / "c.json"), progress=False)["a"]
    assert unmapped != pytest.approx(same, abs=1e-6)   # what the mapping prevents: the classes scored against the wrong categories


def test_training_scores_its_validation_file_by_category_name(trained, tmp_path):
    """A validation file that numbers the training categories otherwise is scored by name (as `lad eval` scores
    the same checkpoint on the training file's numbering); one with other names stops the run before it starts."""
    root, data, cfg = trained
    run = cfg.model_copy(deep=True)
    run.data.val = str(renumbered(data / "val.json", tmp_path / "val_renumbered.json"))
    run.data.val_image_root = str(data)
    run.output_dir = str(tmp_path / "runs")
    during = local_train(run, progress=False)["a"]
    after = evaluate_checkpoint(str(run.run_dir / "checkpoints" / "last.pt"), str(data / "val.json"),
                                out=str(tmp_path / "e.json"), progress=False)["a"]
    assert during == pytest.approx(after, abs=1e-9) and during["AR100"] > 0
    other = json.loads((data / "val.json").read_text())
    other["categories"][0]["name"] = "zebra"
    (tmp_path / "val_other.json").write_text(json.dumps(other))
    run.data.val, run.output_dir = str(tmp_path / "val_other.json"), str(tmp_path / "runs2")
    with pytest.raises(ConfigError) as refused:
        local_train(run, progress=False)
    assert "val_other.json" in str(refused.value) and "zebra" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "runs2").exists()   # refused before the run directory is made


def test_a_teacher_with_other_category_names_is_refused(trained, tmp_path):
    root, data, cfg = trained
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "last.pt", weights_only=True)
    ckpt["categories"][3]["name"] = "zebra"
    save_checkpoint(tmp_path / "zebra.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    lad = tiny_config(data, tmp_path / "runs", mode="lad", teacher=str(tmp_path / "zebra.pt"))
    with pytest.raises(CheckpointError, match=r"zebra\.pt \(network A\): its categories are not the file's.*zebra"):
        check_start(lad, file_categories(data / "train.json"))


def test_a_teacher_whose_categories_come_in_another_order_is_reordered(trained, tmp_path):
    root, data, cfg = trained
    teacher = make_teacher(cfg, tmp_path / "teacher.pt", depth=18)
    ckpt = torch.load(teacher, weights_only=True)
    cats = file_categories(data / "train.json")
    ckpt["categories"] = cats[::-1]   # trained on a file that numbers the same categories the other way round
    save_checkpoint(tmp_path / "reversed.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    student = tiny_config(data, tmp_path / "runs", mode="lad", teacher=str(tmp_path / "reversed.pt"))
    raw, _, _ = load_network(tmp_path / "reversed.pt", student, "a")
    matched, _, _ = load_network(tmp_path / "reversed.pt", student, "a", categories=cats)
    images = torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        a, b = raw.eval()(images).cls_logits, matched.eval()(images).cls_logits
    assert torch.equal(b, a.flip(-1))   # the student's class j is the teacher's class C-1-j, by name


def test_detections_are_a_coco_results_file_with_the_evaluated_files_ids(trained, tmp_path):
    """`lad eval --detections`: on a renumbered file the detections carry that file's ids; on a file without
    annotations (test-dev style) they are written and nothing is scored."""
    import subprocess
    import sys

    root, data, cfg = trained
    ckpt = str(cfg.run_dir / "checkpoints" / "last.pt")
    other = renumbered(data / "val.json", tmp_path / "val_renumbered.json")
    evaluate_checkpoint(ckpt, str(other), image_root=str(data), out=str(tmp_path / "e.json"),
                        detections=str(tmp_path / "dets.json"), progress=False)
    dets = json.loads((tmp_path / "dets.json").read_text())
    assert dets and {d["category_id"] for d in dets} <= {c["id"] for c in json.loads(other.read_text())["categories"]}
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"} and len(dets[0]["bbox"]) == 4
    test_dev = json.loads((data / "val.json").read_text())
    del test_dev["annotations"]
    (tmp_path / "test_dev.json").write_text(json.dumps(test_dev))
    out = subprocess.run([sys.executable, "-m", "services.cli", "eval", "--checkpoint", ckpt, "--data",
                          str(tmp_path / "test_dev.json"), "--image-root", str(data), "--detections",
                          str(tmp_path / "test_dev_dets.json"), "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "detections only" in out.stdout and "Average Precision" not in out.stdout
    assert len(json.loads((tmp_path / "test_dev_dets.json").read_text())) == len(dets)

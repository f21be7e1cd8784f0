"""Checkpoints: atomic writes, and a teacher that does not fit the student is refused with the difference named."""
import pytest
import torch

from schemas.config import config_from_dict
from trainer.checkpoint import CheckpointError, load_checkpoint, load_network, save_checkpoint
from trainer.model import build_model

SMALL = {"depth": 18, "fpn_channels": 16, "head_channels": 16, "head_convs": 1}


def _cfg(**model):
    return config_from_dict({"model": {**SMALL, **model}})


def _save(path, cfg):
    net = build_model(cfg.model)
    save_checkpoint(path, {"config": cfg.to_dict(), "models": {"a": net.state_dict()}, "step": 7})
    return net


def test_roundtrip_loads_strictly_with_weights_only(tmp_path):
    cfg = _cfg()
    net = _save(tmp_path / "t.pt", cfg)
    loaded, model_cfg, step = load_network(tmp_path / "t.pt", cfg)
    assert step == 7 and model_cfg.depth == 18
    for k, v in net.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_teacher_of_other_depth_and_width_is_fine(tmp_path):
    _save(tmp_path / "t.pt", _cfg(depth=34, fpn_channels=32, head_convs=2))
    _, model_cfg, _ = load_network(tmp_path / "t.pt", _cfg())
    assert model_cfg.depth == 34


@pytest.mark.parametrize("teacher,needle", [
    ({"num_classes": 5}, "num_classes: teacher 5, student 10"),
    ({"fpn_levels": [3, 4, 5]}, "FPN levels"),
    ({"octave_base_scale": 4.0}, "octave_base_scale"),
])
def test_incompatible_teacher_is_refused(tmp_path, teacher, needle):
    _save(tmp_path / "t.pt", _cfg(**teacher))
    with pytest.raises(CheckpointError, match=needle):
        load_network(tmp_path / "t.pt", _cfg())


def test_other_input_size_is_refused(tmp_path):
    t = config_from_dict({"model": SMALL, "data": {"input_size": 256}})
    _save(tmp_path / "t.pt", t)
    with pytest.raises(CheckpointError, match="input size: teacher 256, student 128"):
        load_network(tmp_path / "t.pt", _cfg())


def test_truncated_and_foreign_files_are_refused(tmp_path):
    _save(tmp_path / "t.pt", _cfg())
    data = (tmp_path / "t.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by `lad train`"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_missing_keys_are_named(tmp_path):
    cfg = _cfg()
    net = build_model(cfg.model)
    state = net.state_dict()
    state.pop("head.cls_logits.weight")
    save_checkpoint(tmp_path / "t.pt", {"config": cfg.to_dict(), "models": {"a": state}})
    with pytest.raises(CheckpointError, match="missing keys.*head.cls_logits.weight"):
        load_network(tmp_path / "t.pt", cfg)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    cfg = _cfg()
    _save(tmp_path / "t.pt", cfg)
    before = (tmp_path / "t.pt").read_bytes()

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "t.pt", {"config": cfg.to_dict(), "models": {"a": {}}, "x": Boom()})
    assert (tmp_path / "t.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]


def test_unexpected_keys_and_shapes_are_named(tmp_path):
    cfg = _cfg()
    state = build_model(cfg.model).state_dict()
    state["head.extra.weight"] = torch.zeros(3)
    state["head.cls_logits.bias"] = torch.zeros(99)
    save_checkpoint(tmp_path / "t.pt", {"config": cfg.to_dict(), "models": {"a": state}})
    with pytest.raises(CheckpointError, match=r"unexpected keys.*head.extra.weight.*shape mismatches.*"
                                              r"head.cls_logits.bias \(99,\)"):
        load_network(tmp_path / "t.pt", cfg)


def _colad(**b):
    return config_from_dict({"mode": "colad", "model": SMALL, "colearn": {"model_b": {**SMALL, **b}}})


def test_colad_side_from_a_checkpoint_is_the_configured_network(tmp_path):
    """A CoLAD network initialised from a checkpoint must be the network the run's config names (its own
    checkpoints and `lad eval` rebuild that one); from a CoLAD checkpoint each side takes its own network."""
    from trainer.checkpoint import load_colearn_side
    r34 = _cfg(depth=34)
    net = _save(tmp_path / "r34.pt", r34)
    loaded = load_colearn_side(tmp_path / "r34.pt", _colad(depth=34), "b")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    with pytest.raises(CheckpointError, match=r"r34.pt: its network A is not the configured network B: "
                                              r"colearn.model_b.depth: checkpoint 34, config 18"):
        load_colearn_side(tmp_path / "r34.pt", _colad(), "b")
    with pytest.raises(CheckpointError, match=r"model.depth: checkpoint 34, config 18"):
        load_colearn_side(tmp_path / "r34.pt", _colad(depth=34), "a")
    pair = _colad(depth=34)
    a, b = build_model(pair.model), build_model(pair.model_b)
    save_checkpoint(tmp_path / "pair.pt", {"config": pair.to_dict(), "models": {"a": a.state_dict(),
                                                                                   "b": b.state_dict()}})
    got_b = load_colearn_side(tmp_path / "pair.pt", pair, "b")
    assert all(torch.equal(v, got_b.state_dict()[k]) for k, v in b.state_dict().items())


def test_a_teachers_pretrained_backbone_file_is_not_needed_to_load_it(tmp_path):
    cfg = _cfg()
    net = build_model(cfg.model)  # trained elsewhere from a pretrained backbone file this machine lacks
    trained = config_from_dict({"model": {**SMALL, "pretrained": str(tmp_path / "gone.pth")}})
    save_checkpoint(tmp_path / "t.pt", {"config": trained.to_dict(), "models": {"a": net.state_dict()}})
    loaded, model_cfg, _ = load_network(tmp_path / "t.pt", cfg)  # gone.pth never existed on this machine
    assert model_cfg.pretrained.endswith("gone.pth")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())

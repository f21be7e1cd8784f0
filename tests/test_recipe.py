"""`train.recipe: official` and what it switches on: the official schedule, single-candidate GTs dropped,
unweighted GIoU for students another network assigns, the smoothed KD focal factor, and MMDetection's
`frozen_stages` / `norm_eval` for pretrained backbones."""
import math

import pytest
import torch

from schemas.config import OFFICIAL_ITERATIONS, config_from_dict
from trainer.assign import colad_merge, paa_select
from trainer.colad import RolePolicy, colad_assign
from trainer.engine import Engine
from trainer.losses import bernoulli_kd
from trainer.network import lr_factor, milestone_steps, warmup_steps

TINY = {"depth": 18, "fpn_levels": [3, 4], "fpn_channels": 32, "head_channels": 32, "head_convs": 1}


def _cfg(mode="paa", recipe="official", **extra):
    raw = {"mode": mode, "data": {"input_size": 64}, "model": dict(TINY), "train": {"recipe": recipe}}
    if mode in ("lad", "kd", "solad"):
        raw["teacher"] = {"checkpoint": "teacher.pt"}
    for key, value in extra.items():
        raw.setdefault(key, {}).update(value)
    return config_from_dict(raw, "test config")


@pytest.mark.parametrize("mode,weighted", [("paa", True), ("kd", True), ("lad", False), ("solad", False),
                                           ("colad", False)])
def test_official_recipe_resolves_to_the_official_numbers(mode, weighted):
    cfg = _cfg(mode)
    t = cfg.train
    assert t.milestones == [8 / 12, 11 / 12]            # schedule_1x.py: step=[8, 11] of max_epochs=12
    assert t.grad_clip is None                          # optimizer_config = dict(grad_clip=None)
    assert (t.warmup_steps, t.warmup_ratio) == (500, 0.001)
    assert t.warmup_max_fraction == 500 / 87_960 == 500 / OFFICIAL_ITERATIONS
    assert cfg.assign.single_candidate == "drop"        # "fix gmm need at least two sample": continue
    assert cfg.distill.focal_smoothing == 1e-6          # FocalKLLoss: ((t - p)^2 + 1e-6)^(gamma / 2)
    assert cfg.loss.box_iou_weighted is weighted        # PAAHead / PAA_KD_Head weight by IoU; LAD and CoLAD not
    assert (cfg.model.frozen_stages, cfg.model.norm_eval) == (-1, False)  # from scratch: nothing frozen


def test_a_pretrained_backbone_gets_frozen_stages_and_norm_eval_and_the_recipe_round_trips():
    cfg = _cfg("colad", model={"pretrained": "r18.pth"},
               colearn={"model_b": {**TINY, "depth": 34, "pretrained": "r34.pth"}})
    assert (cfg.model.frozen_stages, cfg.model.norm_eval) == (1, True)
    assert (cfg.model_b.frozen_stages, cfg.model_b.norm_eval) == (1, True)
    again = config_from_dict(cfg.to_dict(), "config.yaml")
    assert again == cfg


def test_explicit_fields_win_over_the_recipe_and_the_default_recipe_keeps_ours():
    cfg = _cfg("lad", train={"grad_clip": 10.0, "milestones": [0.5]}, loss={"box_iou_weighted": True})
    assert (cfg.train.grad_clip, cfg.train.milestones, cfg.loss.box_iou_weighted) == (10.0, [0.5], True)
    assert cfg.train.warmup_steps == 500
    ours = _cfg("lad", recipe="lad")
    assert (ours.train.milestones, ours.train.grad_clip, ours.train.warmup_steps) == ([0.75, 0.9], 35.0, 100)
    assert ours.train.warmup_max_fraction is None and ours.assign.single_candidate == "keep"
    assert ours.distill.focal_smoothing == 0 and ours.loss.box_iou_weighted is True


def test_the_official_schedule_on_a_short_and_a_full_run():
    cfg = _cfg("lad")
    assert warmup_steps(cfg, 450) == math.ceil(450 * 500 / 87_960) == 3  # the same share of a short run
    assert warmup_steps(cfg, 87_960) == 500 and warmup_steps(cfg, 200_000) == 500
    epoch = 7330
    assert milestone_steps(cfg, 12 * epoch) == [8 * epoch, 11 * epoch]   # epochs 8 and 11, exactly
    total = 12 * epoch
    assert lr_factor(0, cfg, total) == pytest.approx(0.001)
    assert lr_factor(250, cfg, total) == pytest.approx(0.001 + 0.999 * 0.5)
    assert lr_factor(8 * epoch - 1, cfg, total) == 1.0
    assert lr_factor(8 * epoch, cfg, total) == pytest.approx(0.1)
    assert lr_factor(11 * epoch, cfg, total) == pytest.approx(0.01)
    ours = _cfg("lad", recipe="lad")
    assert milestone_steps(ours, 450) == [338, 405] and warmup_steps(ours, 450) == 100


def _two_gts():
    """One level of 20 anchors: GT 0 has a single candidate (anchor 3), GT 1 has six (10..15)."""
    cand = torch.full((20,), -1, dtype=torch.long)
    cand[3] = 0
    cand[10:16] = 1
    losses = torch.zeros(20)
    losses[3] = 0.2
    losses[10:16] = torch.tensor([0.1, 0.15, 0.2, 2.0, 2.2, 2.5])
    return losses, cand


@pytest.mark.parametrize("gmm", ["torch", "sklearn"])
def test_selection_drops_single_candidate_gts_under_the_official_recipe(gmm):
    losses, cand = _two_gts()
    kept, _ = paa_select(losses, cand, [20], gmm=gmm)
    dropped, _ = paa_select(losses, cand, [20], gmm=gmm, keep_single=False)
    assert kept[3] and not dropped[3]
    assert torch.equal(kept[10:16], dropped[10:16]) and dropped[10:16].any()  # GT 1 alike both ways


def test_colad_merge_then_selection_drops_single_candidate_gts():
    losses, cand = _two_gts()
    other = losses.flip(0).clone()
    other[cand < 0] = 0
    gt_labels = [torch.tensor([2, 5])]
    merged, _ = colad_merge(losses, other, cand, [20])
    for recipe, keep in (("official", False), ("lad", True)):
        cfg = _cfg("colad", recipe=recipe, model={"num_classes": 10})
        labels, choice = colad_assign(cfg, [losses], [other], [cand], [20], gt_labels, RolePolicy.parse("auto"), 0)
        assert torch.equal(choice.merged[0], merged)
        assert bool(labels.pos[0, 3]) is keep
        assert labels.pos[0, 10:16].any()


def test_smoothed_kd_focal_factor_is_the_official_formula():
    g = torch.Generator().manual_seed(0)
    logits, t = torch.randn(200, generator=g) * 3, torch.rand(200, generator=g)
    p = torch.sigmoid(logits)
    kl = t * torch.log(t / p) + (1 - t) * torch.log((1 - t) / (1 - p))
    official = kl * ((t - p) ** 2 + 1e-6) ** (0.5 * 0.5)
    assert torch.allclose(bernoulli_kd(logits, t, 0.5, smoothing=1e-6), official, rtol=1e-4, atol=1e-7)
    ours = bernoulli_kd(logits, t, 0.5)
    assert torch.allclose(ours, kl * (t - p).abs() ** 0.5, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ours, official, rtol=1e-4, atol=1e-7)  # the smoothing is not a no-op
    same = bernoulli_kd(torch.zeros(3), torch.full((3,), 0.5), 0.5, smoothing=1e-6)
    assert torch.all(same.abs() < 1e-6)  # equal inputs: (about) no loss, and no NaN


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    return images, [torch.tensor([[4., 6., 30., 34.], [30., 28., 60., 62.]]), torch.tensor([[10., 10., 22., 20.]])], \
        [torch.tensor([1, 7]), torch.tensor([3])]


def test_frozen_stages_take_no_gradient_and_norm_eval_keeps_bn_statistics():
    cfg = _cfg("paa", recipe="lad", model={"frozen_stages": 1, "norm_eval": True}, train={"warmup_steps": 0})
    engine = Engine(cfg)
    body = engine.model.backbone.body
    frozen = {n: p.detach().clone() for n, p in body.named_parameters() if n.split(".")[0] in ("conv1", "bn1", "layer1")}
    trained = {n: p.detach().clone() for n, p in body.named_parameters() if n.startswith("layer2")}
    stats = {n: b.clone() for n, b in body.named_buffers() if "running_" in n}
    engine.step(*_batch())
    engine.step(*_batch())
    assert frozen and all(torch.equal(p, dict(body.named_parameters())[n]) for n, p in frozen.items())
    assert all(not dict(body.named_parameters())[n].requires_grad for n in frozen)
    assert any(not torch.equal(p, dict(body.named_parameters())[n]) for n, p in trained.items())
    assert all(torch.equal(b, dict(body.named_buffers())[n]) for n, b in stats.items())  # norm_eval
    optimised = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(dict(body.named_parameters())[n]) in optimised for n in frozen)  # no optimizer state
    assert len(engine.optimizer.state) == len(optimised)


def test_without_norm_eval_bn_statistics_move_and_frozen_stages_alone_keep_theirs():
    cfg = _cfg("paa", recipe="lad", model={"frozen_stages": 0}, train={"warmup_steps": 0})
    engine = Engine(cfg)
    body = engine.model.backbone.body
    stem, later = body.bn1.running_mean.clone(), body.layer1[0].bn1.running_mean.clone()
    engine.step(*_batch())
    assert torch.equal(stem, body.bn1.running_mean)            # a frozen stage stays in eval mode
    assert not torch.equal(later, body.layer1[0].bn1.running_mean)
    assert engine.model.training and not body.bn1.training and body.layer1[0].bn1.training


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_the_coco_config_with_the_official_recipe_validates_and_resolves():
    from schemas.config import load_config

    cfg = load_config(REPO / "configs/lad_coco_official.yaml")
    assert cfg.train.recipe == "official" and cfg.train.milestones == [8 / 12, 11 / 12]
    assert (cfg.model.frozen_stages, cfg.model.norm_eval, cfg.loss.box_iou_weighted) == (1, True, False)
    assert cfg.data.val_root.endswith("val2017") and cfg.data.image_root.endswith("train2017")


def test_validation_images_under_their_own_root(tmp_path):
    """COCO keeps train2017/ and val2017/ apart: `data.val_image_root` reads the validation file's images there."""
    import shutil

    from pipeline.local import load_datasets
    from pipeline.errors import DatasetError
    from tests.tiny import make_data, tiny_config

    data = make_data(tmp_path / "d", num_train=4, num_val=2)
    shutil.move(str(data / "images" / "val"), str(tmp_path / "valroot"))
    cfg = tiny_config(data, tmp_path / "runs", mode="paa")
    with pytest.raises(DatasetError, match="val.json.*not found"):
        load_datasets(cfg)
    (tmp_path / "vr" / "images").mkdir(parents=True)
    shutil.move(str(tmp_path / "valroot"), str(tmp_path / "vr" / "images" / "val"))
    cfg.data.val_image_root = str(tmp_path / "vr")
    both = load_datasets(cfg)
    assert len(both.val.records) == 2 and len(both.train.records) == 4
    assert all(r.path.startswith(str(tmp_path / "vr")) for r in both.val.records)


def test_explicit_values_under_the_official_recipe_are_named_in_a_warning():
    from schemas.config import recipe_deviations

    spelled_out = _cfg("lad", recipe="lad").to_dict()  # e.g. a run's config.yaml, every field written
    spelled_out["train"]["recipe"] = "official"
    cfg = config_from_dict(spelled_out, "config.yaml")
    found = recipe_deviations(cfg)
    assert "train.grad_clip=35.0 (official None)" in found and any(d.startswith("train.milestones=") for d in found)
    assert recipe_deviations(_cfg("lad")) == [] and recipe_deviations(_cfg("lad", recipe="lad")) == []


def test_frozen_stages_beyond_the_built_backbone_are_refused():
    from schemas.config import ConfigError

    with pytest.raises(ConfigError, match="backbone stops at layer3"):
        _cfg("paa", recipe="lad", model={"fpn_levels": [2, 3, 4], "frozen_stages": 4})
    assert _cfg("paa", recipe="lad", model={"fpn_levels": [3, 4, 5, 6, 7], "frozen_stages": 4}).model.frozen_stages == 4

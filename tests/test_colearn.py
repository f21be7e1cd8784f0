"""Co-learning without Ray: the split step (two `SideEngine`s meeting in `merge_sparse`, the coordinator's code)
is bit-for-bit `Engine._colad_step`; checkpoints convert between the two forms; role statistics; the
coordinator's bookkeeping (policy changes take effect from the next step, per-step freezing in split).

GroupNorm networks (`model.norm=gn`) as in tests/test_engine.py."""
import pytest
import torch

from schemas.config import ConfigError, config_from_dict
from trainer.colad import RolePolicy, SideEngine, merge_sparse, merge_states, side_metrics, side_state, to_sparse
from trainer.engine import Engine
from trainer.worker import sparse_to_labels

TINY = {"depth": 18, "norm": "gn", "fpn_levels": [3, 4], "fpn_channels": 32, "head_channels": 32, "head_convs": 1}


def _cfg(**extra):
    raw = {"mode": "colad", "data": {"input_size": 64}, "model": TINY,
           "train": {"warmup_steps": 0, "lr": 0.02, "grad_clip": 3.0}}
    for k, v in extra.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return config_from_dict(raw)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (3, 3, 64, 64), generator=g, dtype=torch.uint8)
    boxes = [torch.tensor([[4., 6., 30., 34.], [30., 28., 60., 62.]]), torch.tensor([[10., 10., 22., 20.]]),
             torch.tensor([[0., 0., 63., 40.]])]
    labels = [torch.tensor([1, 7]), torch.tensor([3]), torch.tensor([2])]
    return images, boxes, labels


def split_step(cfg, a: SideEngine, b: SideEngine, policy: RolePolicy, batch, ids):
    """One split step in-process: what the two worker groups and the coordinator do, minus Ray."""
    images, boxes, labels = batch
    sa, sb = a.score(images, boxes, labels), b.score(images, boxes, labels)
    res = merge_sparse(cfg, to_sparse(sa, ids, boxes, labels), to_sparse(sb, ids, boxes, labels), policy,
                       a.step_count)
    pos, gt, ign = zip(*res["assignment"])
    common = sparse_to_labels(list(pos), list(gt), list(ign), labels, sa.anchors.shape[0], cfg.model.num_classes)
    la, lb = a.loss(sa, common, boxes), b.loss(sb, common, boxes)
    ta, tb = sum(la.values()), sum(lb.values())
    na, nb = a.backward(ta), b.backward(tb)
    a.apply(na, nb)
    b.apply(na, nb)
    m = side_metrics("a", la, sa) | side_metrics("b", lb, sb)
    m.update(loss=float(ta.detach() + tb.detach()), num_pos=res["num_pos"], teacher_ratio=res["teacher_ratio"])
    return m, common


@pytest.mark.parametrize("policies", [["auto"] * 4, ["pin-b", "pin-b", "auto", "pin-a"], ["alternate:2"] * 4])
def test_split_step_is_the_inline_colad_step(policies):
    cfg = _cfg()
    eng = Engine(cfg)
    a, b = SideEngine(cfg, "a"), SideEngine(cfg, "b")
    for s, name in enumerate(policies):
        batch = _batch(s)
        eng.set_policy(name)
        r = eng.step(*batch)
        m, labels = split_step(cfg, a, b, RolePolicy(name), batch, [10 * s + i for i in range(3)])
        assert torch.equal(r.labels.labels, labels.labels) and torch.equal(r.labels.gt_index, labels.gt_index)
        for key in ("loss", "loss_a", "loss_b", "loss_cls_a", "loss_box_b", "loss_iou_a", "num_pos", "teacher_ratio",
                    "cand_loss_mean_a", "cand_loss_std_b"):
            assert r.metrics[key] == m[key], (s, key, r.metrics[key], m[key])
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, a.model.state_dict()[k]), k
    for k, v in eng.model_b.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert eng.optimizer.param_groups[0]["lr"] == a.optimizer.param_groups[0]["lr"]


def test_clipping_is_joint_over_both_networks():
    """With a tiny clip the coefficient depends on both networks' gradients: clipping each side alone would
    differ, and the split step still equals the inline one (test above uses grad_clip 3; here 0.01)."""
    cfg = _cfg(train={"grad_clip": 0.01})
    eng, a, b = Engine(cfg), SideEngine(cfg, "a"), SideEngine(cfg, "b")
    batch = _batch(1)
    eng.step(*batch)
    split_step(cfg, a, b, RolePolicy("auto"), batch, [1, 2, 3])
    for k, v in eng.model_b.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


def test_checkpoint_states_convert_both_ways():
    cfg = _cfg(colearn={"model_b": {**TINY, "depth": 34}})
    eng, a, b = Engine(cfg), SideEngine(cfg, "a"), SideEngine(cfg, "b")
    for s in range(2):
        eng.step(*_batch(s))
        split_step(cfg, a, b, RolePolicy("auto"), _batch(s), [1, 2, 3])
    merged = merge_states(a.state(), b.state())
    ref = eng.state()
    assert merged["step"] == ref["step"] == 2
    assert merged["optimizer"]["param_groups"][0]["params"] == ref["optimizer"]["param_groups"][0]["params"]
    assert set(merged["optimizer"]["state"]) == set(ref["optimizer"]["state"])
    for k, v in ref["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], merged["optimizer"]["state"][k]["momentum_buffer"]), k
    # an inline/in-process checkpoint resumes a split side, and the other way round
    eng2 = Engine(cfg)
    eng2.load_state({**merged, "policy": "auto"})
    b2 = SideEngine(cfg, "b")
    b2.load_state(side_state({**ref, "config": cfg.to_dict()}, "b", len(list(b2.model.parameters()))))
    r1, r2 = eng.step(*_batch(5)), eng2.step(*_batch(5))
    assert r1.metrics["loss"] == r2.metrics["loss"]
    split_b = SideEngine(cfg, "a")
    split_b.load_state(side_state(ref, "a", len(list(split_b.model.parameters()))))
    assert split_b.step_count == 2


def test_each_split_side_keeps_its_loss_scale_through_a_checkpoint():
    # fp16's loss scaler exists on CUDA only; a CPU GradScaler holds the same state, which is what is checked here
    cfg = _cfg()
    a, b = SideEngine(cfg, "a"), SideEngine(cfg, "b")
    a.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    b.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2048.0)
    merged = merge_states(a.state(), b.state())
    assert merged["scaler"]["scale"] == 1024.0 and merged["scaler_b"]["scale"] == 2048.0
    for side, scale in (("a", 1024.0), ("b", 2048.0)):
        resumed = SideEngine(cfg, side)
        resumed.precision.scaler = torch.amp.GradScaler("cpu")
        resumed.load_state(side_state(merged, side, len(list(resumed.model.parameters()))))
        assert resumed.precision.scaler.get_scale() == scale, side
    # an in-process checkpoint has one scaler: both sides resume from it
    one = {k: v for k, v in merged.items() if k != "scaler_b"}
    assert side_state(one, "b", len(list(b.model.parameters())))["scaler"]["scale"] == 1024.0


def test_role_counts_by_level_and_size():
    eng = Engine(_cfg(colearn={"policy": "pin-b"}))
    m = eng.step(*_batch()).metrics
    assert m["teacher_ratio"] == 1.0 and m["teacher_ratio_by_level"] == [1.0, 1.0]
    # GT areas 26*28=728 (small), 30*34=1020 (small), 12*10 (small), 63*40=2520 (medium): no large object
    by_size = m["teacher_ratio_by_size"]
    assert by_size["small"] == 1.0 and by_size["medium"] == 1.0 and by_size["large"] != by_size["large"]  # NaN


def test_split_needs_matching_anchors_and_ray():
    for key, value in (("fpn_levels", [3, 4, 5]), ("num_classes", 3), ("octave_base_scale", 4)):
        with pytest.raises(ConfigError, match=rf"colearn.model_b.{key} is .* but model.{key} is"):
            _cfg(colearn={"model_b": {**TINY, key: value}})  # refused for every engine, before anything starts
    with pytest.raises(ConfigError, match="pipeline.engine"):
        _cfg(colearn={"mode": "split"})


def test_role_book_follows_the_control_planes_file(tmp_path):
    """The coordinator's state without Ray: roles.json requests (as PUT writes them) bump the version once each,
    a torn file is ignored, the history records the step a policy took effect from, statistics add up."""
    from pipeline.colearn import RoleBook
    from schemas.policy import RolePolicy
    from schemas.rundir import RunDir

    files = RunDir(tmp_path)
    book = RoleBook("auto", RunDir(tmp_path), start_step=10, source="checkpoint")
    assert not book.poll_file()  # no request yet
    files.request_roles("pin-b")
    assert book.poll_file() and book.control() == {"version": 1, "policy": "pin-b", "stop": False}
    assert not book.poll_file()  # unchanged file: nothing new
    files.roles_path.write_text('{"policy": "pin-')  # torn write of a foreign writer
    assert not book.poll_file() and book.policy == "pin-b"
    book.applied(12, "pin-b")
    files.request_roles("alternate:4")
    assert book.poll_file() and book.version == 2
    assert book.request_stop() and book.control()["stop"] and book.version == 3
    assert [(h["policy"], h["from_step"], h["source"]) for h in book.history] == [("auto", 11, "checkpoint"),
                                                                                   ("pin-b", 13, "rest")]
    counts = {"taught_level": [1, 0], "defined_level": [2, 1], "taught_size": [1, 0, 0], "defined_size": [2, 1, 0]}
    book.record(11, 0, "auto", counts)
    book.record(12, 0, "auto", counts)
    summary = book.summary()
    assert summary["totals"]["teacher_ratio"] == 2 / 6 and summary["totals"]["by_level"] == [0.5, 0.0]
    assert summary["totals"]["by_size"] == {"small": 0.5, "medium": 0.0, "large": None}
    assert summary["policy"] == "pin-b" and summary["requested"] == "alternate:4"
    for name in ("auto", "pin-a", "pin-b", "alternate:7"):
        assert RolePolicy.from_code(RolePolicy.parse(name).code).name == name


def test_an_fp16_overflow_on_one_split_side_skips_both_sides_step():
    """Engine's one scaler skips both networks' step when either overflows; split sides exchange gradient norms
    for the joint clip, and an overflowed side's norms are not finite: the other side must skip too (and back off
    its scale), not step on gradients clipped by an infinite norm. CPU GradScalers stand in for CUDA's."""
    cfg = _cfg(train={"grad_clip": 35.0})
    a, b = SideEngine(cfg, "a"), SideEngine(cfg, "b")
    a.precision.scaler = torch.amp.GradScaler("cpu", init_scale=3e38)   # its scaled gradients overflow
    b.precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    images, boxes, labels = _batch(0)
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    na, nb = (side.backward(side.score(images, boxes, labels).out.cls_logits.sigmoid().sum()) for side in (a, b))
    assert not torch.isfinite(na).all() and torch.isfinite(nb).all()
    a.apply(na, nb)
    b.apply(na, nb)
    assert all(torch.equal(v, before[k]) for k, v in b.model.state_dict().items())   # skipped, and finite
    assert b.precision.scaler.get_scale() == 512.0 and b.step_count == a.step_count == 1


def test_two_role_requests_within_one_timestamp_are_both_seen(tmp_path):
    """An mtime can be a second coarse (always on object storage): a second PUT within it must still reach the
    coordinator and the in-process trainer; a JSON file that is not an object is ignored, not fatal."""
    import os

    from pipeline.colearn import RoleBook
    from schemas.rundir import RunDir

    files, trainer = RunDir(tmp_path), RunDir(tmp_path)
    book = RoleBook("auto", RunDir(tmp_path))
    files.request_roles("pin-a")
    stamp = os.stat(files.roles_path).st_mtime
    assert book.poll_file() and trainer.new_roles_request()["policy"] == "pin-a"
    files.request_roles("alternate:3")
    os.utime(files.roles_path, (stamp, stamp))
    assert book.poll_file() and book.policy == "alternate:3"
    assert trainer.new_roles_request()["policy"] == "alternate:3" and trainer.new_roles_request() is None
    files.roles_path.write_text('"pin-b"')
    assert not book.poll_file() and book.policy == "alternate:3"

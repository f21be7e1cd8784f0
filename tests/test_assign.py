"""Label assignment: anchors, box coding, IoU candidates, PAA's GMM selection (torch vs scikit-learn), CoLAD."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from trainer import gmm as gmm_module
from trainer.anchors import feature_sizes_for, make_anchors
from trainer.assign import (Assignment, candidate_losses, colad_merge, colad_merge_with_pairs, paa_assign, paa_select, paa_select_batch,
                            preassign)
from trainer.box_coder import decode, encode
from trainer.gmm import fit_predict_1d

STRIDES = [8, 16, 32, 64, 128]
NUM_CLASSES = 20


@pytest.fixture(autouse=True)
def _eager_single_thread(monkeypatch):
    """Tests check the arithmetic, not the compiler; one thread keeps small ops fast on a busy 2-core machine."""
    monkeypatch.setenv("LAD_GMM_COMPILE", "0")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- helpers

def _random_boxes(gen: torch.Generator, count: int, height: int, width: int, min_side=6.0, max_side=300.0):
    side = torch.exp(torch.empty(count).uniform_(math.log(min_side), math.log(max_side), generator=gen))
    aspect = torch.exp(torch.empty(count).uniform_(-1.0, 1.0, generator=gen))
    wh = torch.stack((side * aspect.sqrt(), side / aspect.sqrt()), 1)
    wh = torch.minimum(wh, torch.tensor([width - 1.0, height - 1.0]))
    top_left = torch.rand(count, 2, generator=gen) * (torch.tensor([width, height]) - wh)
    return torch.cat((top_left, top_left + wh), 1)


def _aligned_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0).prod(1)
    return inter / ((a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter)


def _simulated_image(gen: torch.Generator, anchors: torch.Tensor, height: int, width: int):
    """GTs and candidate losses of a half-trained detector: good anchors get low losses, others spread higher."""
    count = int(torch.randint(1, 9, (1,), generator=gen))
    gt_boxes = _random_boxes(gen, count, height, width)
    gt_labels = torch.randint(0, NUM_CLASSES, (count,), generator=gen)
    cand_gt = preassign(anchors, gt_boxes)
    idx = torch.nonzero(cand_gt >= 0).squeeze(1)
    gt = cand_gt[idx]
    iou = _aligned_iou(anchors[idx], gt_boxes[gt])
    quality = (iou * (0.5 + 0.9 * torch.rand(count, generator=gen))[gt]).clamp(0, 1)
    logits = torch.full((len(anchors), NUM_CLASSES), -4.6)
    deltas = torch.zeros(len(anchors), 4)
    logits[idx, gt_labels[gt]] = -4.0 + 7.0 * quality + 0.8 * torch.randn(len(idx), generator=gen)
    deltas[idx] = (encode(anchors[idx], gt_boxes[gt]) * (1 - quality)[:, None] * 0.8
                   + torch.randn(len(idx), 4, generator=gen) * (0.6 - 0.4 * quality)[:, None])
    return gt_boxes, gt_labels, logits, deltas, cand_gt


def _random_loss_sets(gen: torch.Generator, num_gt: int, levels=(400, 100, 25, 9, 4)):
    """Synthetic (pos_losses, cand_gt) with disjoint random candidates per GT and level, varied distributions."""
    total = sum(levels)
    cand_gt = torch.full((total,), -1, dtype=torch.long)
    losses = torch.zeros(total)
    offset = 0
    for size in levels:
        perm = torch.randperm(size, generator=gen) + offset
        start = 0
        for gt in range(num_gt):
            take = int(torch.randint(0, min(20, size // num_gt) + 1, (1,), generator=gen))
            cand_gt[perm[start:start + take]] = gt
            start += take
        offset += size
    for gt in range(num_gt):
        mine = torch.nonzero(cand_gt == gt).squeeze(1)
        if mine.numel() == 0:
            cand_gt[torch.nonzero(cand_gt < 0)[0]] = gt
            mine = torch.nonzero(cand_gt == gt).squeeze(1)
        n = mine.numel()
        kind = int(torch.randint(0, 4, (1,), generator=gen))
        if kind == 0:
            values = torch.rand(n, generator=gen) * 3
        elif kind == 1:
            values = -torch.log(torch.rand(n, generator=gen).clamp_min(1e-7))
        elif kind == 2:
            low = int(torch.randint(1, n + 1, (1,), generator=gen))
            values = torch.cat((0.5 + 0.1 * torch.randn(low, generator=gen),
                                0.8 + 2.2 * torch.rand(n - low, generator=gen)))[torch.randperm(n, generator=gen)]
        else:
            values = (1.5 + 0.5 * torch.randn(n, generator=gen)).abs()
        losses[mine] = values.abs()
    return losses, cand_gt, list(levels)


def _same_positives_per_gt(result_a, result_b, cand_gts):
    same = total = 0
    for (pos_a, _), (pos_b, _), cand in zip(result_a, result_b, cand_gts):
        for gt in range(int(cand.max()) + 1):
            mine = cand == gt
            same += bool(torch.equal(pos_a & mine, pos_b & mine))
            total += 1
    return same, total


# ----------------------------------------------------------------------------------------------- anchors

def test_anchor_layout_and_indices():
    sizes, strides = [(2, 3), (1, 2)], [8, 16]
    anchors, per_level = make_anchors(sizes, strides)
    assert per_level == [6, 2] and anchors.shape == (8, 4)
    for level, ((height, width), stride) in enumerate(zip(sizes, strides)):
        offset = sum(per_level[:level])
        for y in range(height):
            for x in range(width):
                expected = [x * stride - 4 * stride, y * stride - 4 * stride, x * stride + 4 * stride,
                            y * stride + 4 * stride]
                assert anchors[offset + y * width + x].tolist() == expected


def test_feature_sizes_match_resnet_fpn():
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    backbone = _resnet_fpn_extractor(resnet18(), 5, returned_layers=[1, 2, 3, 4],
                                     extra_blocks=LastLevelP6P7(256, 256)).eval()
    for side in (128, 256, 200):
        with torch.no_grad():
            shapes = [tuple(f.shape[-2:]) for f in backbone(torch.zeros(1, 3, side, side)).values()]
        assert feature_sizes_for(side, [4, 8, 16, 32, 64, 128]) == shapes
    assert feature_sizes_for((800, 1333), STRIDES) == [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]


def test_box_coder_round_trip_and_leading_shapes():
    gen = torch.Generator().manual_seed(0)
    anchors = _random_boxes(gen, 50, 400, 600)
    gt = _random_boxes(gen, 50, 400, 600)
    assert torch.allclose(decode(anchors, encode(anchors, gt)), gt, atol=1e-3)
    deltas = torch.randn(3, 50, 4, generator=gen)
    batched = decode(anchors, deltas)
    assert batched.shape == (3, 50, 4)
    assert torch.allclose(batched[1], decode(anchors, deltas[1]))


# ----------------------------------------------------------------------------------------------- preassign

def _max_iou_assigner_reference(anchors, gt_boxes, thr):
    """MaxIoUAssigner(pos=neg=thr, min_pos_iou=0, gt_max_assign_all=True), written plainly (GT claims only IoU > 0)."""
    iou = box_iou(gt_boxes, anchors)
    result = [-1] * len(anchors)
    for a in range(len(anchors)):
        column = iou[:, a].tolist()
        best = max(column)
        if best >= thr:
            result[a] = column.index(best)  # first GT with the best IoU
    for g in range(len(gt_boxes)):
        row = iou[g]
        best = float(row.max())
        if best > 0:
            for a in torch.nonzero(row == best).squeeze(1).tolist():
                result[a] = g  # later GTs override
    return torch.tensor(result)


def test_preassign_matches_max_iou_assigner():
    gen = torch.Generator().manual_seed(1)
    anchors, _ = make_anchors(feature_sizes_for((96, 128), [8, 16, 32]), [8, 16, 32])
    for trial in range(6):
        gt = _random_boxes(gen, 6, 96, 128, min_side=3.0, max_side=90.0)
        if trial % 2:
            gt = torch.cat((gt, gt[:2]))  # duplicates: identical IoUs, the later GT must win
        assert torch.equal(preassign(anchors, gt), _max_iou_assigner_reference(anchors, gt, 0.1))
    assert torch.equal(preassign(anchors, torch.zeros(0, 4)), torch.full((len(anchors),), -1))
    duplicate = torch.tensor([[30.0, 30.0, 70.0, 60.0]] * 2)
    cand = preassign(anchors, duplicate)
    iou = box_iou(duplicate[:1], anchors)[0]
    best = iou == iou.max()
    assert bool((cand[best] == 1).all())  # the later GT takes the shared best anchors...
    assert bool((cand[~best & (iou >= 0.1)] == 0).all())  # ...the first keeps the other IoU >= 0.1 anchors


def test_tiny_gt_gets_candidates_and_a_positive():
    anchors, per_level = make_anchors(feature_sizes_for((128, 128), STRIDES), STRIDES)
    tiny = torch.tensor([[61.0, 61.0, 64.0, 64.0]])  # 3x3 px, far below any anchor (64 px and up)
    cand = preassign(anchors, tiny)
    assert int((cand == 0).sum()) >= 1
    assert float(box_iou(tiny, anchors).max()) < 0.1
    losses = torch.rand(len(anchors), generator=torch.Generator().manual_seed(2)) * (cand >= 0)
    for gmm in ("torch", "sklearn"):
        pos, ignore = paa_select(losses, cand, per_level, gmm=gmm)
        assert pos.any() and not ignore.any() and bool((cand[pos] == 0).all())


# ----------------------------------------------------------------------------------------------- selection

def test_torch_agrees_with_sklearn_on_random_loss_sets():
    gen = torch.Generator().manual_seed(3)
    losses, cands = [], []
    for _ in range(120):
        loss, cand, levels = _random_loss_sets(gen, int(torch.randint(1, 9, (1,), generator=gen)))
        losses.append(loss)
        cands.append(cand)
    fast = paa_select_batch(losses, cands, levels, gmm="torch")
    ref = paa_select_batch(losses, cands, levels, gmm="sklearn")
    same, total = _same_positives_per_gt(fast, ref, cands)
    assert total > 450 and same / total >= 0.995, (same, total)


def test_torch_agrees_with_sklearn_on_realistic_losses():
    gen = torch.Generator().manual_seed(4)
    height, width = 320, 480
    anchors, levels = make_anchors(feature_sizes_for((height, width), STRIDES), STRIDES)
    losses, cands = [], []
    for _ in range(40):
        gt_boxes, gt_labels, logits, deltas, cand = _simulated_image(gen, anchors, height, width)
        losses.append(candidate_losses(anchors, logits, deltas, gt_boxes, gt_labels, cand))
        cands.append(cand)
    fast = paa_select_batch(losses, cands, levels, gmm="torch")
    ref = paa_select_batch(losses, cands, levels, gmm="sklearn")
    same, total = _same_positives_per_gt(fast, ref, cands)
    assert total > 120 and same / total >= 0.995, (same, total)
    # a real network's losses: most GTs keep a handful of positives, not all of their candidates
    counts = [int(pos.sum()) for pos, _ in fast]
    assert sum(counts) < sum(int((c >= 0).sum()) for c in cands) / 4


def test_batch_equals_per_image():
    gen = torch.Generator().manual_seed(5)
    losses, cands = [], []
    for _ in range(6):
        loss, cand, levels = _random_loss_sets(gen, int(torch.randint(1, 6, (1,), generator=gen)))
        losses.append(loss)
        cands.append(cand)
    losses.append(torch.zeros_like(losses[0]))  # an image without GTs inside the batch
    cands.append(torch.full_like(cands[0], -1))
    batched = paa_select_batch(losses, cands, levels)
    for (pos, ign), loss, cand in zip(batched, losses, cands):
        single_pos, single_ign = paa_select(loss, cand, levels)
        assert torch.equal(pos, single_pos) and torch.equal(ign, single_ign)
        assert not pos[cand < 0].any()
    assert not batched[-1][0].any()


def _sklearn_scheme_c(values: np.ndarray) -> list[int]:
    """PAA's scheme (c) computed directly with scikit-learn on sorted losses: indices of the positives."""
    from sklearn.mixture import GaussianMixture

    x = values.astype(np.float32).reshape(-1, 1)
    fitted = GaussianMixture(2, weights_init=np.array([0.5, 0.5]), precisions_init=np.ones((2, 1)),
                             means_init=np.array([x.min(), x.max()]).reshape(2, 1), covariance_type="diag").fit(x)
    foreground = np.nonzero(fitted.predict(x) == 0)[0]
    return foreground[: int(np.argmax(fitted.score_samples(x)[foreground])) + 1].tolist()


def test_positives_follow_scheme_c():
    """Top-k per level, then the low-loss component's members in ascending loss up to its best-scoring one;
    every other candidate is background."""
    levels = [20, 5]
    cand = torch.full((25,), -1)
    cand[:12] = 0
    losses = torch.zeros(25)
    losses[:12] = torch.tensor([2.0, 0.31, 0.30, 3.5, 0.33, 0.32, 1.5, 4.0, 0.35, 2.5, 3.0, 0.34])
    kept = torch.argsort(losses[:12])[:9]  # the level's 9 lowest, ascending
    expected = kept[_sklearn_scheme_c(losses[kept].numpy())].sort().values
    assert 1 <= len(expected) < 9
    for gmm in ("torch", "sklearn"):
        pos, ignore = paa_select(losses, cand, levels, topk=9, gmm=gmm)
        assert torch.equal(torch.nonzero(pos).squeeze(1), expected) and not ignore.any()


def test_low_loss_outlier_won_by_wide_component_is_not_positive():
    cluster = [1.0 + 0.001 * i for i in range(15)]
    values = torch.tensor([0.0] + cluster + [3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    assert _sklearn_scheme_c(values.numpy()) == list(range(1, 9))  # the outlier at 0.0 is the wide component's
    cand = torch.zeros(len(values), dtype=torch.long)
    for gmm in ("torch", "sklearn"):
        pos, _ = paa_select(values, cand, [len(values)], topk=30, gmm=gmm)
        assert torch.nonzero(pos).squeeze(1).tolist() == list(range(1, 9))


def test_single_candidate_kept_and_zero_gt():
    levels = [10, 4]
    cand = torch.full((14,), -1)
    cand[3] = 0
    cand[[5, 6, 11]] = 1
    losses = torch.zeros(14)
    losses[[3, 5, 6, 11]] = torch.tensor([2.0, 0.5, 0.6, 3.0])
    for gmm in ("torch", "sklearn"):
        pos, _ = paa_select(losses, cand, levels, gmm=gmm)
        assert pos[3] and (pos & (cand == 1)).any()
        empty_pos, empty_ign = paa_select(torch.zeros(14), torch.full((14,), -1), levels, gmm=gmm)
        assert not empty_pos.any() and not empty_ign.any()


@pytest.mark.parametrize("value", [0.0, 1.0, 1.2345, 5.0, 9.231368, 123.4])
def test_identical_losses_are_deterministic(value):
    """Identical losses: both components stay identical, every candidate is low-loss with the same score, so
    exactly the first (lowest anchor index) is positive, in both paths. Near-identical losses (spread far below
    sqrt(reg_covar)): the two components nearly coincide and rounding decides `predict`, in scikit-learn as here,
    so only determinism and sanity are required (the paths may differ, and a GT may get no positive)."""
    levels = [30, 10]
    cand = torch.full((40,), -1)
    cand[:18] = 0
    cand[30:36] = 1
    losses = torch.where(cand >= 0, torch.tensor(value), torch.tensor(0.0))
    for gmm in ("torch", "sklearn"):
        pos, _ = paa_select(losses, cand, levels, gmm=gmm)
        assert torch.nonzero(pos).squeeze(1).tolist() == [0, 30]
    near = losses.clone()
    near[:18] += torch.arange(18) * 1e-7 * max(value, 1.0)
    near[30:36] *= 1 + torch.tensor([0.0, 1e-7, -1e-7, 2e-7, 0.0, -2e-7])
    for gmm in ("torch", "sklearn"):
        first, ignore = paa_select(near, cand, levels, gmm=gmm)
        assert torch.equal(first, paa_select(near, cand, levels, gmm=gmm)[0])
        assert not first[cand < 0].any() and not ignore.any()
    component, score = fit_predict_1d(torch.full((2, 12), value), torch.ones(2, 12, dtype=torch.bool))
    assert torch.isfinite(score).all() and not component.any()


def test_ill_defined_covariance_does_not_crash_reference():
    """scikit-learn raises on this set (a component collapses on 9.23, whose float32 square rounds down)."""
    values = torch.tensor([0.2776389, 0.42198414, 0.59892476, 0.6051894, 1.1276422, 9.231368])
    from sklearn.mixture import GaussianMixture

    x = values.numpy().reshape(-1, 1)
    with pytest.raises(ValueError):
        GaussianMixture(2, weights_init=np.array([0.5, 0.5]), means_init=np.array([x.min(), x.max()]).reshape(2, 1),
                        precisions_init=np.ones((2, 1)), covariance_type="diag").fit(x)
    cand = torch.zeros(6, dtype=torch.long)
    ref, _ = paa_select(values, cand, [6], gmm="sklearn")
    fast, _ = paa_select(values, cand, [6], gmm="torch")
    assert torch.equal(ref, fast) and ref.any()


def test_gmm_frozen_rows_do_not_move():
    """Rows that converged keep their parameters however often the host checks (and whatever else iterates)."""
    gen = torch.Generator().manual_seed(6)
    losses = torch.rand(64, 30, generator=gen) * 3
    valid = torch.rand(64, 30, generator=gen) < 0.7
    reference = fit_predict_1d(losses, valid, check_every=1)
    for every in (3, 8, 100):
        component, score = fit_predict_1d(losses, valid, check_every=every)
        assert torch.equal(component[valid], reference[0][valid])
        assert torch.allclose(score[valid], reference[1][valid], rtol=0, atol=1e-12)
    alone = fit_predict_1d(losses[5:6], valid[5:6])
    assert torch.equal(alone[0][valid[5:6]], reference[0][5:6][valid[5:6]])


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(gmm_module, "_compiled_em_steps", broken)
    monkeypatch.setattr(gmm_module, "_compile_failed", False)
    losses = torch.rand(8, 10, generator=torch.Generator().manual_seed(7))
    valid = torch.ones(8, 10, dtype=torch.bool)
    compiled = fit_predict_1d(losses, valid, compile_em=True)
    eager = fit_predict_1d(losses, valid, compile_em=False)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])
    assert gmm_module._compile_failed


# ----------------------------------------------------------------------------------------------- paa_assign

def test_paa_assign_consistency():
    gen = torch.Generator().manual_seed(8)
    height, width = 256, 320
    anchors, levels = make_anchors(feature_sizes_for((height, width), STRIDES), STRIDES)
    gt_boxes, gt_labels, logits, deltas, _ = _simulated_image(gen, anchors, height, width)
    result = paa_assign(anchors, levels, logits, deltas, gt_boxes, gt_labels)
    assert isinstance(result, Assignment)
    pos = result.pos_mask
    assert pos.any()
    assert torch.equal(result.gt_index >= 0, pos)
    assert torch.equal(result.gt_index[pos], result.cand_gt[pos])
    assert torch.equal(result.labels[pos], gt_labels[result.gt_index[pos]])
    assert bool((result.labels[~pos] == NUM_CLASSES).all())
    assert not result.ignore_mask.any() and bool((result.label_weights == 1).all())
    assert bool((result.pos_losses[result.cand_gt < 0] == 0).all())
    # the candidate loss, computed by hand for a few candidates
    idx = torch.nonzero(result.cand_gt >= 0).squeeze(1)[:5]
    gt = result.cand_gt[idx]
    target = torch.nn.functional.one_hot(gt_labels[gt], NUM_CLASSES).float()
    expected = (sigmoid_focal_loss(logits[idx], target, alpha=0.25, gamma=2.0, reduction="none").sum(1)
                + 1.3 * generalized_box_iou_loss(decode(anchors[idx], deltas[idx]), gt_boxes[gt], reduction="none"))
    assert torch.allclose(result.pos_losses[idx], expected, atol=1e-5)
    ref = paa_assign(anchors, levels, logits, deltas, gt_boxes, gt_labels, gmm="sklearn")
    assert torch.equal(ref.pos_mask, pos)
    empty = paa_assign(anchors, levels, logits, deltas, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert not empty.pos_mask.any() and bool((empty.labels == NUM_CLASSES).all())


# ----------------------------------------------------------------------------------------------- CoLAD

def test_colad_merge_hand_made():
    levels = [6, 4, 2]
    cand = torch.full((12,), -1)
    a = torch.zeros(12)
    b = torch.zeros(12)

    def put(indices, gt, la, lb):
        cand[indices] = gt
        a[indices] = torch.tensor(la)
        b[indices] = torch.tensor(lb)

    put([0, 1, 2], 0, [1.0, 2.0, 3.0], [2.0, 4.0, 6.0])  # GT0 L0: equal std/mean (0.5 each) -> tie to B
    put([6, 7], 0, [1.0, 1.5], [1.0, 3.0])  # GT0 L1: B spreads more -> B
    put([10], 0, [1.0], [1.0])  # GT0 L2: one candidate, equal means -> A
    put([3, 4], 1, [1.0, 3.0], [1.0, 1.5])  # GT1 L0: A spreads more -> A
    put([11], 1, [2.0], [1.0])  # GT1 L2: one candidate, B lower -> B; GT1 has nothing on L1
    merged, b_teacher = colad_merge(a, b, cand, levels)  # the contract's two results
    assert b_teacher.tolist() == [[True, True, False], [False, False, True]]
    merged2, b_teacher2, defined = colad_merge_with_pairs(a, b, cand, levels)
    assert torch.equal(merged2, merged) and torch.equal(b_teacher2, b_teacher)
    assert defined.tolist() == [[True, True, True], [True, False, True]]
    expected = a.clone()
    expected[[0, 1, 2, 6, 7, 11]] = b[[0, 1, 2, 6, 7, 11]]
    assert torch.equal(merged, expected)
    _, b_teacher3, defined3 = colad_merge_with_pairs(a, b, cand, levels, num_gt=3)
    assert b_teacher3.shape == (3, 3) and not defined3[2].any() and not b_teacher3[2].any()


def test_colad_merge_matches_plain_loop():
    gen = torch.Generator().manual_seed(9)
    for _ in range(5):
        loss_a, cand, levels = _random_loss_sets(gen, 5)
        loss_b = loss_a * (0.5 + torch.rand(loss_a.shape, generator=gen)) + 0.1
        merged, b_teacher, defined = colad_merge_with_pairs(loss_a, loss_b, cand, levels)
        level = torch.bucketize(torch.arange(len(cand)), torch.tensor(np.cumsum(levels)), right=True)
        expected = loss_a.clone()
        for gt in range(5):
            for lvl in range(len(levels)):
                mine = (cand == gt) & (level == lvl)
                assert bool(defined[gt, lvl]) == bool(mine.any())
                if not mine.any():
                    continue
                sa, sb = loss_a[mine], loss_b[mine]
                if mine.sum() > 1:
                    use_b = bool(sb.std() / sb.mean() >= sa.std() / sa.mean())
                else:
                    use_b = bool(sb.mean() < sa.mean())
                assert bool(b_teacher[gt, lvl]) == use_b
                if use_b:
                    expected[mine] = sb
        assert torch.equal(merged, expected)

"""Losses: the soft-label KD against a direct float64 formula, PAA's detection loss on a hand-made case, and the
focal loss by index against torchvision's dense one."""
import torch
from torchvision.ops import box_iou, sigmoid_focal_loss

from trainer.box_coder import encode
from trainer.losses import (BatchLabels, SoftTargets, aligned_iou, bernoulli_kd, detection_loss, focal_loss_sum,
                            soft_label_kd, soft_targets)


def test_kd_is_zero_with_zero_gradient_when_student_equals_teacher():
    logits = torch.randn(2, 50, 10, dtype=torch.float64, requires_grad=True)
    loss = bernoulli_kd(logits, torch.sigmoid(logits.detach()), 0.5).sum()
    loss.backward()
    assert abs(loss.item()) < 1e-12
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() < 1e-6


def test_kd_matches_direct_float64_formula():
    torch.manual_seed(0)
    s = torch.randn(1000, dtype=torch.float64) * 3
    t_logit = torch.randn(1000, dtype=torch.float64) * 3
    t, p = torch.sigmoid(t_logit), torch.sigmoid(s)
    direct = (t * torch.log(t / p) + (1 - t) * torch.log((1 - t) / (1 - p))) * (t - p).abs() ** 0.5
    ours = bernoulli_kd(s.float(), t.float(), 0.5).double()
    assert torch.allclose(ours, direct, rtol=1e-4, atol=1e-6)


def test_soft_label_kd_terms_and_normalisation():
    torch.manual_seed(0)
    anchors = torch.tensor([[0., 0., 10., 10.], [5., 5., 15., 15.]])
    cls = torch.randn(1, 2, 3)
    deltas = torch.zeros(1, 2, 4)
    iou = torch.zeros(1, 2)
    targets = SoftTargets(torch.sigmoid(cls), torch.tensor([0]), torch.tensor([1]), torch.zeros(1, 4),
                          torch.tensor([0.5]), torch.tensor([0.8]))
    out = soft_label_kd(cls, deltas, iou, targets, anchors, cls_weight=1, iou_weight=1, box_weight=1)
    assert out["kd_cls"].abs() < 1e-9          # student class outputs equal the teacher's
    assert out["kd_iou"].abs() < 1e-9          # sigmoid(0) == 0.5
    assert out["kd_box"].abs() < 1e-6          # both zero deltas: both boxes are the anchor
    targets.deltas = encode(anchors[1:], torch.tensor([[5., 5., 25., 25.]]))  # GIoU 0.25 -> loss 0.75, x0.8, /1
    out = soft_label_kd(cls, deltas, iou, targets, anchors, cls_weight=1, iou_weight=1, box_weight=2)
    assert torch.isclose(out["kd_box"], torch.tensor(2 * 0.75 * 0.8 / 1.0))


def test_detection_loss_perfect_box_and_ignore():
    anchors = torch.tensor([[0., 0., 10., 10.], [20., 20., 30., 30.], [40., 40., 50., 50.]])
    gt = [torch.tensor([[0., 0., 10., 10.]])]
    labels = BatchLabels(torch.tensor([[1, 2, 2]]), torch.tensor([[0, -1, -1]]), torch.tensor([[False, False, True]]))
    cls = torch.full((1, 3, 2), -20.0)
    cls[0, 0, 1] = 20.0
    cls[0, 2, 0] = 20.0  # a confident false positive on an ignored anchor costs nothing
    out = detection_loss(cls, torch.zeros(1, 3, 4), torch.full((1, 3), 20.0), anchors, labels, gt)
    assert out["loss_cls"] < 1e-6 and out["loss_box"].abs() < 1e-6 and out["loss_iou"] < 1e-6
    labels.ignore[0, 2] = False
    assert detection_loss(cls, torch.zeros(1, 3, 4), torch.full((1, 3), 20.0), anchors, labels, gt)["loss_cls"] > 1


def test_aligned_iou():
    a = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.]])
    b = torch.tensor([[0., 0., 10., 10.], [5., 0., 15., 10.]])
    assert torch.allclose(aligned_iou(a, b), torch.tensor([1.0, 1 / 3]))


def test_soft_targets_select_teacher_boxes_overlapping_a_gt_by_more_than_min_iou():
    """Zero deltas decode to the anchors themselves: the selected anchors are exactly those whose box overlaps
    some GT of its own image by more than min_iou, each weighted by its largest IoU; images without GT give none."""
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(40, 2, generator=gen) * 48
    anchors = torch.cat([xy, xy + 8 + torch.rand(40, 2, generator=gen) * 16], 1)
    gts = [torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 30.0, 60.0, 50.0]]), torch.zeros(0, 4),
           torch.tensor([[10.0, 0.0, 40.0, 30.0]])]
    cls, iou = torch.randn(3, 40, 10, generator=gen), torch.randn(3, 40, generator=gen)
    t = soft_targets(cls, torch.zeros(3, 40, 4), iou, anchors, gts, min_iou=0.3)
    expected = [(b, a, float(box_iou(anchors[a:a + 1], gt).max())) for b, gt in enumerate(gts) if len(gt)
                for a in range(40) if box_iou(anchors[a:a + 1], gt).max() > 0.3]
    assert len(expected) > 3 and 1 not in t.batch_idx.tolist()
    assert list(zip(t.batch_idx.tolist(), t.anchor_idx.tolist())) == [(b, a) for b, a, _ in expected]
    assert torch.allclose(t.weight, torch.tensor([w for _, _, w in expected]))
    assert torch.equal(t.deltas, torch.zeros(len(expected), 4))
    assert torch.allclose(t.iou_prob, torch.sigmoid(iou[t.batch_idx, t.anchor_idx]))
    assert torch.allclose(t.cls_prob, torch.sigmoid(cls))


def test_focal_loss_by_index_equals_torchvisions_dense_focal_loss():
    g = torch.Generator().manual_seed(4)
    B, A, C = 2, 300, 7
    logits = (torch.randn(B, A, C, generator=g) * 3).requires_grad_(True)
    labels = torch.randint(0, C + 1, (B, A), generator=g)          # C: background
    ignore = torch.rand(B, A, generator=g) < 0.1
    target = torch.zeros(B, A, C).scatter_(-1, labels.clamp(max=C - 1)[..., None], (labels < C)[..., None].float())
    dense = torch.where(ignore[..., None], 0.0, sigmoid_focal_loss(logits, target, 0.25, 2.0, "none")).sum()
    by_index = focal_loss_sum(logits, labels, ignore)
    g_dense, = torch.autograd.grad(dense, logits)
    g_index, = torch.autograd.grad(by_index, logits)
    assert torch.allclose(by_index, dense, rtol=1e-5) and float(dense) > 1
    assert torch.allclose(g_index, g_dense, atol=1e-6)
    assert float(g_index[ignore].abs().max()) == 0.0                # ignored anchors get no gradient

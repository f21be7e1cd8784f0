"""The compact soft labels (trainer.soft_codec) through the Arrow schema: the tolerance holds on every entry, the
KD loss stays within 1 % of dense for a teacher that is sure of itself, and the bytes are a small part of dense."""
import numpy as np
import pytest
import torch

from schemas.assignment import AssignmentRow, anchor_hash, decode_batch, encode_batch
from trainer.losses import SoftTargets, soft_label_kd
from trainer.soft_codec import decode_soft, encode_soft

LEVELS = [32 * 32, 16 * 16, 8 * 8]
A, C, B = sum(LEVELS), 10, 3
HASH = anchor_hash([4, 8, 16], 8.0, 128, C)


def confident_teacher(seed: int) -> SoftTargets:
    """Like a trained focal-loss teacher: background logits = level/class term + smooth objectness + noise, and
    a few objects whose class is likely on their anchors."""
    g = torch.Generator().manual_seed(seed)
    level = torch.cat([torch.full((n,), i) for i, n in enumerate(LEVELS)])
    base = torch.randn(B, len(LEVELS), C, generator=g) * 0.5 - 6.5
    objectness = torch.cat([torch.nn.functional.interpolate(torch.randn(B, 1, 4, 4, generator=g),
                                                            size=(int(n ** 0.5),) * 2, mode="bilinear").flatten(1)
                            for n in LEVELS], 1)
    logits = base[:, level, :] + objectness[..., None] + 0.6 * torch.randn(B, A, C, generator=g)
    for b in range(B):
        for _ in range(4):
            anchors = torch.randint(0, A, (60,), generator=g)
            logits[b, anchors, int(torch.randint(0, C, (1,), generator=g))] = torch.randn(60, generator=g) * 2
    k = 40
    b_idx = torch.arange(B).repeat_interleave(k)
    a_idx = torch.cat([torch.randperm(A, generator=g)[:k].sort().values for _ in range(B)])
    return SoftTargets(torch.sigmoid(logits), b_idx, a_idx, torch.randn(B * k, 4, generator=g) * 0.5,
                       torch.rand(B * k, generator=g), torch.rand(B * k, generator=g) * 0.9 + 0.1)


def through_the_stream(targets: SoftTargets, tolerance: float) -> tuple[SoftTargets, int]:
    rows = [AssignmentRow(image_id=i, height=128, width=128, gt_boxes=np.zeros((0, 4), np.float32),
                          gt_labels=np.zeros(0, np.int32), pos_anchor=np.zeros(0, np.int32),
                          pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32), **soft)
            for i, soft in enumerate(encode_soft(targets, LEVELS, tolerance))]
    batch = encode_batch(rows, HASH, A, C, soft=True)
    soft_bytes = sum(batch.column(n).nbytes for n in batch.schema.names if n.startswith(("soft_", "kd_")))
    return decode_soft(decode_batch(batch, HASH), LEVELS, C), soft_bytes


@pytest.mark.parametrize("tolerance", [0.0, 0.003, 0.01, 0.05])
def test_every_probability_is_within_the_tolerance(tolerance):
    targets = confident_teacher(0)
    got, _ = through_the_stream(targets, tolerance)
    err = (got.cls_prob - targets.cls_prob).abs()
    fp16 = targets.cls_prob * 2 ** -11 + 2 ** -24
    assert (err <= torch.clamp(fp16, min=tolerance)).all()
    assert torch.equal(got.batch_idx, targets.batch_idx) and torch.equal(got.anchor_idx, targets.anchor_idx)
    for name in ("deltas", "iou_prob", "weight"):
        assert torch.equal(getattr(got, name), getattr(targets, name).half().float()), name


def test_kd_loss_within_one_percent_at_a_few_percent_of_dense():
    targets = confident_teacher(1)
    got, soft_bytes = through_the_stream(targets, 0.01)
    assert soft_bytes < 0.1 * B * A * C * 4          # under a tenth of dense fp32
    g = torch.Generator().manual_seed(2)
    anchors = torch.rand(A, 2, generator=g).repeat(1, 2) * 100 + torch.tensor([0.0, 0.0, 16.0, 16.0])
    student_cls = torch.randn(B, A, C, generator=g) - 4.6
    deltas, iou = torch.randn(B, A, 4, generator=g) * 0.1, torch.randn(B, A, generator=g)
    kw = dict(cls_weight=10.0, iou_weight=10.0, box_weight=1.3, gamma=0.5)
    dense = soft_label_kd(student_cls.detach(), deltas, iou, targets, anchors, **kw)
    streamed = soft_label_kd(student_cls.detach(), deltas, iou, got, anchors, **kw)
    for term in ("kd_cls", "kd_iou", "kd_box"):
        assert abs(float(streamed[term] - dense[term])) <= 0.01 * abs(float(dense[term])), term
    model_only, _ = through_the_stream(targets, 0.99)   # nothing sent as it is: the corrections are what count
    rough = soft_label_kd(student_cls, deltas, iou, model_only, anchors, **kw)["kd_cls"]
    assert abs(float(rough - dense["kd_cls"])) > 0.1 * float(dense["kd_cls"])


def test_tolerance_zero_sends_every_entry():
    targets = confident_teacher(3)
    encoded = encode_soft(targets, LEVELS, 0.0)
    assert all(e["soft_index"].size == A * C for e in encoded)
    assert all(e["soft_offset"].dtype == np.int8 and e["soft_offset"].size == A for e in encoded)


def test_rows_that_do_not_fit_the_levels_are_refused():
    row = AssignmentRow(image_id=7, height=1, width=1, gt_boxes=np.zeros((0, 4), np.float32),
                        gt_labels=np.zeros(0, np.int32), pos_anchor=np.zeros(0, np.int32),
                        pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32),
                        **encode_soft(confident_teacher(4), LEVELS, 0.01)[0])
    with pytest.raises(ValueError, match="image 7: soft_base has 30 values for 2 levels x 10 classes"):
        decode_soft([row], LEVELS[:2], C)

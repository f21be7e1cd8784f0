"""The compact soft labels (trainer.soft_codec) through the Arrow schema: the tolerance holds on every entry, the
KD loss stays within 1 % of dense for a teacher that is sure of itself, and the bytes are a small part of dense."""
import numpy as np
import pytest
import torch

from schemas.assignment import PROB_STEP, AssignmentRow, anchor_hash, decode_batch, encode_batch
from trainer.anchors import feature_sizes_for, make_anchors
from trainer.losses import SoftTargets, soft_label_kd, soft_targets
from trainer.soft_codec import decode_soft, encode_soft

STRIDES = [4, 8, 16]
ANCHORS, LEVELS = make_anchors(feature_sizes_for(128, STRIDES), STRIDES, 8.0)
A, C, B = sum(LEVELS), 10, 3
HASH = anchor_hash(STRIDES, 8.0, 128, C)


def gt_boxes(seed: int) -> list[torch.Tensor]:
    """Two or three boxes of 12-32 px per 128-px image."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        n = int(torch.randint(2, 4, (1,), generator=g))
        xy, wh = torch.rand(n, 2, generator=g) * 96, torch.rand(n, 2, generator=g) * 20 + 12
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def confident_teacher(seed: int) -> SoftTargets:
    """Like a trained focal-loss teacher: background logits = level/class term + smooth objectness + noise, and
    a few objects whose class is likely on their anchors. Its box entries are chosen, as the engine chooses
    them, where its boxes overlap the GT boxes of `gt_boxes(seed)`."""
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
    deltas, iou = torch.randn(B, A, 4, generator=g) * 0.5, torch.randn(B, A, generator=g)
    return soft_targets(logits, deltas, iou, ANCHORS, gt_boxes(seed), min_iou=0.1)


def through_the_stream(targets: SoftTargets, tolerance: float, seed: int) -> tuple[SoftTargets, int]:
    """Encode `confident_teacher(seed)`'s targets into a batch, and decode them as a student would."""
    rows = [AssignmentRow(image_id=i, height=128, width=128, gt_boxes=gt.numpy(),
                          gt_labels=np.zeros(len(gt), np.int32), pos_anchor=np.zeros(0, np.int32),
                          pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32), **soft)
            for i, (soft, gt) in enumerate(zip(encode_soft(targets, LEVELS, tolerance), gt_boxes(seed)))]
    batch = encode_batch(rows, HASH, A, C, soft=True)
    soft_bytes = sum(batch.column(n).nbytes for n in batch.schema.names if n.startswith(("soft_", "kd_")))
    return decode_soft(decode_batch(batch, HASH), ANCHORS, LEVELS, C), soft_bytes


@pytest.mark.parametrize("tolerance", [0.0, 0.001, 0.003, 0.01, 0.05])
def test_every_probability_is_within_the_tolerance(tolerance):
    targets = confident_teacher(0)
    assert 20 < targets.batch_idx.numel() < B * A      # some box entries, not all
    got, _ = through_the_stream(targets, tolerance, 0)
    err = (got.cls_prob - targets.cls_prob).abs()
    eight_bit = tolerance >= PROB_STEP                 # below that, what is sent goes as fp16
    fp16 = targets.cls_prob * 2 ** -11 + 2 ** -24
    assert (err <= (tolerance + 1e-6 if eight_bit else torch.clamp(fp16, min=tolerance))).all()
    assert torch.equal(got.batch_idx, targets.batch_idx) and torch.equal(got.anchor_idx, targets.anchor_idx)
    assert torch.equal(got.deltas, targets.deltas.half().float())
    if eight_bit:
        assert float((got.iou_prob - targets.iou_prob).abs().max()) <= PROB_STEP / 2 + 1e-6
    else:
        assert torch.equal(got.iou_prob, targets.iou_prob.half().float())
    # the weight is the student's own measure of the teacher's (fp16) boxes against its GT boxes
    assert float((got.weight - targets.weight).abs().max()) < 5e-3 and float(got.weight.min()) > 0.09


def test_kd_loss_within_one_percent_at_a_few_percent_of_dense():
    targets = confident_teacher(1)
    got, soft_bytes = through_the_stream(targets, 0.01, 1)
    assert soft_bytes < 0.1 * B * A * C * 4          # under a tenth of dense fp32
    g = torch.Generator().manual_seed(2)
    anchors = ANCHORS
    student_cls = torch.randn(B, A, C, generator=g) - 4.6
    deltas, iou = torch.randn(B, A, 4, generator=g) * 0.1, torch.randn(B, A, generator=g)
    kw = dict(cls_weight=10.0, iou_weight=10.0, box_weight=1.3, gamma=0.5)
    dense = soft_label_kd(student_cls.detach(), deltas, iou, targets, anchors, **kw)
    streamed = soft_label_kd(student_cls.detach(), deltas, iou, got, anchors, **kw)
    for term in ("kd_cls", "kd_iou", "kd_box"):
        assert abs(float(streamed[term] - dense[term])) <= 0.01 * abs(float(dense[term])), term
    model_only, _ = through_the_stream(targets, 0.99, 1)   # nothing sent as it is: the corrections are what count
    rough = soft_label_kd(student_cls, deltas, iou, model_only, anchors, **kw)["kd_cls"]
    assert abs(float(rough - dense["kd_cls"])) > 0.1 * float(dense["kd_cls"])


def test_tolerance_zero_sends_every_entry():
    targets = confident_teacher(3)
    encoded = encode_soft(targets, LEVELS, 0.0)
    assert all(e["soft_index"].size == A * C and e["soft_prob"].dtype == np.float16 for e in encoded)
    assert all(e["soft_offset"].dtype == np.int8 and e["soft_offset"].size == A for e in encoded)


def test_rows_that_do_not_fit_the_levels_are_refused():
    row = AssignmentRow(image_id=7, height=1, width=1, gt_boxes=np.zeros((0, 4), np.float32),
                        gt_labels=np.zeros(0, np.int32), pos_anchor=np.zeros(0, np.int32),
                        pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32),
                        **encode_soft(confident_teacher(4), LEVELS, 0.01)[0])
    with pytest.raises(ValueError, match="image 7: soft_base has 30 values for 2 levels x 10 classes"):
        decode_soft([row], ANCHORS, LEVELS[:2], C)

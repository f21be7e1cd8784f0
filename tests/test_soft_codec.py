"""The soft labels as a picture (trainer.soft_codec) through the Arrow schema: lossless at quality 100 up to the
8-bit step, the KD loss within 1 % of dense at the default quality for a teacher that is sure of itself, the bytes
a small part of dense, and pictures that do not fit the batch refused by name."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from schemas.assignment import PROB_STEP, AssignmentRow, anchor_hash, decode_batch, encode_batch
from trainer.anchors import feature_sizes_for, make_anchors
from trainer.losses import SoftTargets, soft_label_kd, soft_targets
from trainer.soft_codec import MAX_STEP_ERROR, decode_soft, encode_soft, mosaic_layout

STRIDES = [4, 8, 16]
SIZES = feature_sizes_for(128, STRIDES)
ANCHORS, LEVELS = make_anchors(SIZES, STRIDES, 8.0)
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


def through_the_stream(targets: SoftTargets, quality: int, seed: int) -> tuple[SoftTargets, int]:
    """Encode `confident_teacher(seed)`'s targets into a batch, and decode them as a student would."""
    rows = [AssignmentRow(image_id=i, height=128, width=128, gt_boxes=gt.numpy(),
                          gt_labels=np.zeros(len(gt), np.int32), pos_anchor=np.zeros(0, np.int32),
                          pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32), **soft)
            for i, (soft, gt) in enumerate(zip(encode_soft(targets, SIZES, quality), gt_boxes(seed)))]
    batch = encode_batch(rows, HASH, A, C, soft=True)
    soft_bytes = sum(batch.column(n).nbytes for n in batch.schema.names if n.startswith(("soft_", "kd_")))
    return decode_soft(decode_batch(batch, HASH), ANCHORS, SIZES, C), soft_bytes


@pytest.mark.parametrize("sizes,classes", [(((16, 16), (8, 8), (4, 4)), 10), (((100, 136), (50, 68), (25, 34),
                                            (13, 17), (7, 9)), 20), (((5, 3),), 1), (((2, 40), (1, 20)), 3),
                                           (((100, 136), (50, 68)), 7)])   # 7: no divisor fits, a gap to fill
def test_the_mosaic_holds_every_entry_once(sizes, classes):
    source, target = mosaic_layout(sizes, classes)
    entries = sum(h * w for h, w in sizes) * classes
    assert target.size == entries and np.unique(target).size == entries     # a pixel of its own for each entry
    assert np.array_equal(source.reshape(-1)[target], np.arange(entries))   # each entry read where it was drawn
    assert np.array_equal(np.unique(source), np.arange(entries))            # gaps repeat entries, nothing else
    if classes > 3:
        assert 0.5 < source.shape[0] / source.shape[1] < 2                  # about square
    if classes == 7:
        assert source.shape == (3 * 150, 3 * 136)                          # 3 x 3 blocks, two of them gap
    # class 0's block: its finest map on top, the next level beneath it on the left, class 1's block to the right
    (h0, w0), (h1, w1) = sizes[0], (sizes[1] if len(sizes) > 1 else (0, 0))
    assert np.array_equal(source[:h0, :w0], np.arange(h0 * w0).reshape(h0, w0) * classes)
    assert np.array_equal(source[h0:h0 + h1, :w1], (h0 * w0 + np.arange(h1 * w1)).reshape(h1, w1) * classes)
    if classes > 1 and source.shape[1] >= 2 * max(w0, sum(w for _, w in sizes[1:])):
        assert source[0, max(w0, sum(w for _, w in sizes[1:]))] == 1


def test_quality_100_is_lossless_up_to_the_8_bit_step():
    targets = confident_teacher(0)
    assert 20 < targets.batch_idx.numel() < B * A      # some box entries, not all
    got, _ = through_the_stream(targets, 100, 0)
    assert float((got.cls_prob - targets.cls_prob).abs().max()) <= MAX_STEP_ERROR + 1e-6
    assert torch.equal(got.batch_idx, targets.batch_idx) and torch.equal(got.anchor_idx, targets.anchor_idx)
    assert torch.equal(got.deltas, targets.deltas.half().float())
    assert float((got.iou_prob - targets.iou_prob).abs().max()) <= PROB_STEP / 2 + 1e-6
    # the weight is the student's own measure of the teacher's (fp16) boxes against its GT boxes
    assert float((got.weight - targets.weight).abs().max()) < 5e-3 and float(got.weight.min()) > 0.09


def kd_losses(targets: SoftTargets) -> dict:
    g = torch.Generator().manual_seed(2)
    student_cls = torch.randn(B, A, C, generator=g) - 4.6
    deltas, iou = torch.randn(B, A, 4, generator=g) * 0.1, torch.randn(B, A, generator=g)
    kw = dict(cls_weight=10.0, iou_weight=10.0, box_weight=1.3, gamma=0.5)
    return soft_label_kd(student_cls, deltas, iou, targets, ANCHORS, **kw)


def test_kd_loss_within_one_percent_under_a_tenth_of_dense():
    targets = confident_teacher(1)
    dense = kd_losses(targets)
    got, soft_bytes = through_the_stream(targets, 85, 1)
    assert soft_bytes < 0.1 * B * A * C * 4          # under a tenth of dense fp32
    streamed = kd_losses(got)
    for term in ("kd_cls", "kd_iou", "kd_box"):
        assert abs(float(streamed[term] - dense[term])) <= 0.01 * abs(float(dense[term])), term
    rough, rough_bytes = through_the_stream(targets, 40, 1)   # a lower quality: fewer bytes, and it shows
    assert rough_bytes < soft_bytes
    assert abs(float(kd_losses(rough)["kd_cls"] - dense["kd_cls"])) > 0.01 * float(dense["kd_cls"])


def test_pictures_that_do_not_fit_the_batch_are_refused():
    encoded = encode_soft(confident_teacher(4), SIZES, 85)[0]
    row = AssignmentRow(image_id=7, height=1, width=1, gt_boxes=np.zeros((0, 4), np.float32),
                        gt_labels=np.zeros(0, np.int32), pos_anchor=np.zeros(0, np.int32),
                        pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32), **encoded)
    shape = mosaic_layout(tuple(SIZES), C)[0].shape
    with pytest.raises(ValueError, match=rf"image 7: soft_image is a {shape[1]}x{shape[0]} L image, expected a "):
        decode_soft([row], ANCHORS, SIZES, 5)   # (other levels or canvases are refused before, by the anchor hash)
    row.soft_image = encoded["soft_image"][: len(encoded["soft_image"]) // 2]
    with pytest.raises(ValueError, match="image 7: soft_image is not a readable AVIF picture"):
        decode_soft([row], ANCHORS, SIZES, C)
    png = io.BytesIO()   # the right size, but not what the stream sends
    Image.fromarray(np.zeros(shape, np.uint8), "L").save(png, format="PNG")
    row.soft_image = png.getvalue()
    with pytest.raises(ValueError, match="image 7: soft_image is not a readable AVIF picture"):
        decode_soft([row], ANCHORS, SIZES, C)


def test_an_empty_batch_round_trips():
    empty = SoftTargets(torch.zeros(0, A, C), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0))
    assert encode_soft(empty, SIZES, 85) == []
    got = decode_soft([], ANCHORS, SIZES, C)
    assert got.cls_prob.shape == (0, A, C) and got.batch_idx.numel() == 0


def test_soft_labels_for_other_levels_are_refused_when_encoding():
    with pytest.raises(ValueError, match=f"soft labels for {A} anchors, but the levels"):
        encode_soft(confident_teacher(5), SIZES[:2], 85)

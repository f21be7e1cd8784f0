"""How big is the assignment stream, and what does encoding/decoding it cost?

For a digits-sized and a COCO-sized image: the assignment payload (everything but the image) against the image
bytes, encode/decode/IPC time per image, and the soft labels as a picture (`trainer.soft_codec`) at several
qualities against dense fp32.

Teacher probabilities are synthetic: background logits ~ N(--bg-logit-mean, --bg-logit-std) independently per
entry (a trained focal-loss teacher leaves most anchor/class pairs around 1e-3; independent noise is the worst
case for any codec of these maps, which are smooth in real teachers), and around every GT a cluster of candidate
anchors whose GT-class logit ~ N(0, 2). The soft-label sizes and picture times depend on that assumption
(bench/soft_labels.py measures real teachers); the hard payload and its timings do not.

    python bench/payload.py [--out bench/results/payload.json]
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from schemas.assignment import (  # noqa: E402
    AssignmentRow, anchor_hash, column_bytes, decode_batch, encode_batch, payload_bytes,
)
from trainer.anchors import feature_sizes_for, make_anchors  # noqa: E402
from trainer.losses import SoftTargets  # noqa: E402
from trainer.soft_codec import decode_soft, encode_soft  # noqa: E402

QUALITIES = [100, 90, 85, 75]
SOFT_COLS = ("soft_image",)
KD_COLS = ("kd_anchor", "kd_delta", "kd_iou_prob")


def level_sizes(strides, height, width):
    """One anchor per feature-map location (PAA), levels of ceil(size / stride)."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def num_anchors(strides, height, width):
    return sum(h * w for h, w in level_sizes(strides, height, width))


def cases():
    digits_a = num_anchors([4, 8, 16], 128, 128)
    coco_a = num_anchors([8, 16, 32, 64, 128], 800, 1333)
    base_digits = dict(h=128, w=128, strides=[4, 8, 16], classes=10, gts=4, pos=40, batch=16)
    base_coco = dict(h=800, w=1333, strides=[8, 16, 32, 64, 128], classes=80, gts=10, pos=150, batch=2)
    return [
        dict(name="digits", anchors=digits_a, levels=level_sizes([4, 8, 16], 128, 128), **base_digits),
        dict(name="coco", anchors=coco_a, levels=level_sizes([8, 16, 32, 64, 128], 800, 1333), **base_coco),
    ]


def teacher_probs(rng, a, c, pos_anchor, pos_gt, labels, mean, std):
    logits = rng.normal(mean, std, (a, c)).astype(np.float32)
    near = np.clip(pos_anchor[:, None] + np.arange(-2, 3)[None, :], 0, a - 1)  # the positives' neighbourhood
    logits[near.reshape(-1), np.repeat(labels[pos_gt], 5)] = rng.normal(0.0, 2.0, near.size)
    return 1.0 / (1.0 + np.exp(-logits))


def make_row(rng, case, i):
    a, g, p = case["anchors"], case["gts"], case["pos"]
    xy = rng.random((g, 2), dtype=np.float32) * [case["w"] * 0.8, case["h"] * 0.8]
    wh = (rng.random((g, 2), dtype=np.float32) * 0.2 + 0.05) * [case["w"], case["h"]]
    return AssignmentRow(
        image_id=i, height=case["h"], width=case["w"],
        gt_boxes=np.concatenate([xy, xy + wh], 1).astype(np.float32),
        gt_labels=rng.integers(0, case["classes"], g).astype(np.int32),
        pos_anchor=np.sort(rng.choice(a, p, replace=False)).astype(np.int32),
        pos_gt=rng.integers(0, g, p).astype(np.int32), ignore_anchor=np.zeros(0, np.int32),
        image=rng.integers(0, 256, (case["h"], case["w"], 3), dtype=np.uint8),
        scale=1.0, flip=bool(i % 2), teacher_version=7, assign_ms=3.5)


def soft_targets(rng, probs, pos_anchor):
    """One image's `SoftTargets` as the teacher makes them; kd entries ~5 per positive (IoU > min_iou)."""
    k = 5 * len(pos_anchor)
    anchor = torch.from_numpy(np.sort(rng.choice(probs.shape[0], k, replace=False)))
    return SoftTargets(torch.from_numpy(probs)[None], torch.zeros(k, dtype=torch.long), anchor,
                       torch.from_numpy(rng.normal(0, 1, (k, 4)).astype(np.float32)),
                       torch.from_numpy(rng.random(k, dtype=np.float32)),
                       torch.from_numpy(rng.random(k, dtype=np.float32)))


def timed(fn, repeat):
    """Median wall ms of `repeat` calls, and the last result."""
    fn()  # warm up: first-touch page faults and allocator growth are not the steady state
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), out


def ipc_round_trip(batch):
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
    data = sink.getvalue()
    return len(data), pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def measure(case, qualities, repeat, mean, std, seed):
    rng = np.random.default_rng(seed)
    n, a, c = case["batch"], case["anchors"], case["classes"]
    h = anchor_hash(case["strides"], 8.0, max(case["h"], case["w"]), c)
    rows = [make_row(rng, case, i) for i in range(n)]
    img_bytes = case["h"] * case["w"] * 3
    out = dict(case, image_bytes=img_bytes, dense_fp32_bytes=a * c * 4)

    def enc_dec(rs, soft):
        enc_ms, batch = timed(lambda: encode_batch(rs, h, a, c, soft), repeat)
        dec_ms, _ = timed(lambda: decode_batch(batch, h), repeat)
        ipc_ms, (ipc_bytes, _) = timed(lambda: ipc_round_trip(batch), repeat)
        return batch, dict(encode_ms=enc_ms / n, decode_ms=dec_ms / n, ipc_ms=ipc_ms / n, ipc_bytes=ipc_bytes / n)

    batch, t = enc_dec(rows, False)
    out["hard"] = dict(payload_bytes=payload_bytes(batch) / n, **t)
    out["hard"]["payload_pct_of_image"] = 100 * out["hard"]["payload_bytes"] / img_bytes
    no_img = [AssignmentRow(**{**r.__dict__, "image": None}) for r in rows]
    out["hard"]["encode_ms_by_reference"] = timed(lambda: encode_batch(no_img, h, a, c, False), repeat)[0] / n

    targets = [soft_targets(rng, teacher_probs(rng, a, c, r.pos_anchor, r.pos_gt, r.gt_labels, mean, std),
                            r.pos_anchor) for r in rows]
    out["soft"] = []
    anchors = make_anchors(feature_sizes_for((case["h"], case["w"]), case["strides"]), case["strides"])[0]
    for quality in qualities:
        enc_soft_ms, _ = timed(lambda: encode_soft(targets[0], case["levels"], quality), max(1, repeat // 2))
        srows = [AssignmentRow(**{**r.__dict__, **encode_soft(t, case["levels"], quality)[0]})
                 for r, t in zip(rows, targets)]
        batch, t = enc_dec(srows, True)
        cb = column_bytes(batch)
        soft_b = sum(cb[k] for k in SOFT_COLS) / n
        dec_soft_ms, got = timed(lambda: decode_soft(srows[:1], anchors, case["levels"], c), max(1, repeat // 2))
        out["soft"].append(dict(
            quality=quality, max_abs_error=float((got.cls_prob - targets[0].cls_prob).abs().max()),
            soft_bytes=soft_b, soft_pct_of_dense_fp32=100 * soft_b / (a * c * 4),
            kd_bytes=sum(cb[k] for k in KD_COLS) / n,
            payload_bytes=payload_bytes(batch) / n, payload_pct_of_image=100 * payload_bytes(batch) / n / img_bytes,
            encode_soft_ms=enc_soft_ms, decode_soft_ms=dec_soft_ms, **t))
    return out


def kb(x):
    return f"{x / 1024:,.1f}K" if x < 1 << 20 else f"{x / (1 << 20):,.2f}M"


def print_table(results):
    print("\nHard assignment (modes paa/lad/colad), per image")
    print(f"{'case':<15}{'A':>8}{'image':>10}{'payload':>10}{'% image':>9}{'enc ms':>9}{'enc ms ref':>11}"
          f"{'dec ms':>8}{'ipc ms':>8}")
    for r in results:
        hd = r["hard"]
        print(f"{r['name']:<15}{r['anchors']:>8}{kb(r['image_bytes']):>10}{kb(hd['payload_bytes']):>10}"
              f"{hd['payload_pct_of_image']:>8.2f}%{hd['encode_ms']:>9.3f}{hd['encode_ms_by_reference']:>11.3f}"
              f"{hd['decode_ms']:>8.3f}{hd['ipc_ms']:>8.3f}")
    print("\nSoft labels (modes kd/solad), per image")
    print(f"{'case':<15}{'quality':>8}{'max err':>9}{'soft':>10}{'% dense32':>10}{'kd':>8}{'% image':>9}"
          f"{'draw ms':>8}{'enc ms':>8}{'dec ms':>8}{'read ms':>8}")
    for r in results:
        for s in r["soft"]:
            print(f"{r['name']:<15}{s['quality']:>8}{s['max_abs_error']:>9.4f}"
                  f"{kb(s['soft_bytes']):>10}{s['soft_pct_of_dense_fp32']:>9.2f}%{kb(s['kd_bytes']):>8}"
                  f"{s['payload_pct_of_image']:>8.1f}%{s['encode_soft_ms']:>8.2f}{s['encode_ms']:>8.2f}"
                  f"{s['decode_ms']:>8.3f}{s['decode_soft_ms']:>8.2f}")
        print(f"{'':<15}{'dense fp32':>15}{kb(r['dense_fp32_bytes']):>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/payload.json", help="JSON results file")
    ap.add_argument("--repeat", type=int, default=11, help="timing repetitions (median)")
    ap.add_argument("--qualities", type=int, nargs="+", default=QUALITIES,
                    help="soft-label picture qualities (pipeline.soft_label_quality)")
    ap.add_argument("--bg-logit-mean", type=float, default=-7.0, help="teacher background logit mean")
    ap.add_argument("--bg-logit-std", type=float, default=1.5, help="teacher background logit std")
    ap.add_argument("--cases", nargs="+", help="subset of case names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    chosen = [c for c in cases() if not args.cases or c["name"] in args.cases]
    results = [measure(c, args.qualities, args.repeat, args.bg_logit_mean, args.bg_logit_std, args.seed)
               for c in chosen]
    print_table(results)
    doc = dict(bench="payload", python=platform.python_version(), pyarrow=pa.__version__, numpy=np.__version__,
               machine=platform.machine(), cpus=os.cpu_count(), repeat=args.repeat,
               bg_logit=[args.bg_logit_mean, args.bg_logit_std], cases=results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""How big is the assignment stream, and what does encoding/decoding it cost?

For a digits-sized and a COCO-sized image: the assignment payload (everything but the image) against the image
bytes, encode/decode/IPC time per image, and the sparse soft labels at several floors against dense fp32.

Teacher probabilities are synthetic: background logits ~ N(--bg-logit-mean, --bg-logit-std) (a trained
focal-loss teacher leaves most anchor/class pairs around 1e-3), and around every GT a cluster of candidate
anchors whose GT-class logit ~ N(0, 2). The soft-label sizes depend on that assumption; the hard payload and
the timings do not.

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
from schemas.assignment import (  # noqa: E402
    AssignmentRow, anchor_hash, column_bytes, decode_batch, densify_soft, encode_batch, payload_bytes,
    sparsify_soft,
)

FLOORS = [0.0, 0.001, 0.01, 0.05]
SOFT_COLS = ("soft_anchor", "soft_class", "soft_prob")
KD_COLS = ("kd_anchor", "kd_box", "kd_iou_prob", "kd_weight")


def num_anchors(strides, height, width):
    """One anchor per feature-map location (PAA), levels of ceil(size / stride)."""
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in strides)


def cases():
    digits_a = num_anchors([4, 8, 16], 128, 128)
    coco_a = num_anchors([8, 16, 32, 64, 128], 800, 1333)
    base_digits = dict(h=128, w=128, strides=[4, 8, 16], classes=10, gts=4, pos=40, batch=16)
    base_coco = dict(h=800, w=1333, strides=[8, 16, 32, 64, 128], classes=80, gts=10, pos=150, batch=2)
    return [
        dict(name="digits", anchors=digits_a, **base_digits),
        dict(name="digits A=5440", anchors=5440, **base_digits),
        dict(name="coco", anchors=coco_a, **base_coco),
        dict(name="coco A=120k", anchors=120_000, **base_coco),
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


def add_soft(rng, row, probs, floor):
    """Soft labels as the assigner sends them; kd entries ~5 per positive (teacher box IoU > min_iou)."""
    row.soft_anchor, row.soft_class, row.soft_prob = sparsify_soft(probs, floor)
    k = 5 * len(row.pos_anchor)
    row.kd_anchor = np.sort(rng.choice(probs.shape[0], k, replace=False)).astype(np.int32)
    row.kd_box = rng.random((k, 4), dtype=np.float32) * 100
    row.kd_iou_prob = rng.random(k, dtype=np.float32)
    row.kd_weight = rng.random(k, dtype=np.float32)
    return row


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


def measure(case, floors, repeat, mean, std, seed):
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

    probs = [teacher_probs(rng, a, c, r.pos_anchor, r.pos_gt, r.gt_labels, mean, std) for r in rows]
    out["soft"] = []
    for floor in floors:
        sp_ms, _ = timed(lambda: sparsify_soft(probs[0], floor), max(1, repeat // 2))
        srows = [add_soft(rng, AssignmentRow(**r.__dict__), p, floor) for r, p in zip(rows, probs)]
        batch, t = enc_dec(srows, True)
        cb = column_bytes(batch)
        soft_b = sum(cb[k] for k in SOFT_COLS) / n
        r0 = srows[0]
        de_ms, _ = timed(lambda: densify_soft(r0.soft_anchor, r0.soft_class, r0.soft_prob, a, c), max(1, repeat // 2))
        out["soft"].append(dict(
            floor=floor, entries=int(np.mean([len(r.soft_anchor) for r in srows])),
            kept_pct=100 * np.mean([len(r.soft_anchor) for r in srows]) / (a * c),
            soft_bytes=soft_b, soft_pct_of_dense_fp32=100 * soft_b / (a * c * 4),
            kd_bytes=sum(cb[k] for k in KD_COLS) / n,
            payload_bytes=payload_bytes(batch) / n, payload_pct_of_image=100 * payload_bytes(batch) / n / img_bytes,
            sparsify_ms=sp_ms, densify_ms=de_ms, **t))
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
    print(f"{'case':<15}{'floor':>7}{'kept %':>8}{'soft':>10}{'% dense32':>10}{'kd':>8}{'% image':>9}"
          f"{'sparsify':>9}{'enc ms':>8}{'dec ms':>8}{'densify':>8}")
    for r in results:
        for s in r["soft"]:
            print(f"{r['name']:<15}{s['floor']:>7g}{s['kept_pct']:>7.2f}%{kb(s['soft_bytes']):>10}"
                  f"{s['soft_pct_of_dense_fp32']:>9.2f}%{kb(s['kd_bytes']):>8}{s['payload_pct_of_image']:>8.1f}%"
                  f"{s['sparsify_ms']:>9.2f}{s['encode_ms']:>8.2f}{s['decode_ms']:>8.3f}{s['densify_ms']:>8.2f}")
        print(f"{'':<15}{'dense fp32':>15}{kb(r['dense_fp32_bytes']):>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/payload.json", help="JSON results file")
    ap.add_argument("--repeat", type=int, default=11, help="timing repetitions (median)")
    ap.add_argument("--floors", type=float, nargs="+", default=FLOORS, help="soft-label floors")
    ap.add_argument("--bg-logit-mean", type=float, default=-7.0, help="teacher background logit mean")
    ap.add_argument("--bg-logit-std", type=float, default=1.5, help="teacher background logit std")
    ap.add_argument("--cases", nargs="+", help="subset of case names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    chosen = [c for c in cases() if not args.cases or c["name"] in args.cases]
    results = [measure(c, args.floors, args.repeat, args.bg_logit_mean, args.bg_logit_std, args.seed)
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

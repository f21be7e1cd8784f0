"""What KD's soft labels cost in the stream, and how far the student's KD loss moves, with real teachers.

For a teacher checkpoint (or an untrained one) on a batch of a dataset, per `pipeline.soft_label_quality`:
bytes per image of the soft columns (encoded, then decoded, through the Arrow schema) against the image's
encoded file, and the KD loss terms and the kd_cls gradient on the student's class logits against the dense
teacher, for an untrained student and (--student) a trained one. Beside them, the schema-3 form it replaced
(entries >= 0.01 at 8 bytes each, a per-class fill elsewhere, 28-byte box entries), computed here. The forms
between (schemas 4-5: a logit model plus corrections) and the studies that led to the picture are in
docs/results.md with the commit that ran them.

    # COCO's layout: FPN P3-P7 networks, (1333, 800) keep-ratio inputs, landscape images of 1067x800 (what a
    # 640x480 photo becomes), digits at the size the networks were trained on
    lad data digits --out data/digits_big --digit-size 16 64
    lad train configs/paa_digits.yaml --set name=teacher_p37 --set model.depth=34 \\
        --set 'model.fpn_levels=[3,4,5,6,7]' --set data.train=... --set train.epochs=10
    lad train configs/paa_digits.yaml --set name=student_p37 --set 'model.fpn_levels=[3,4,5,6,7]' ... epochs=5
    lad data digits --out data/coco_digits --shapes 1067x800,800x1067 --digit-size 16 64 --min-digits 6 \\
        --max-digits 12 --num-train 16 --num-val 4
    python bench/soft_labels.py --data data/coco_digits --input-size 1333,800 \\
        --teacher runs/teacher_p37/checkpoints/best.pt --student runs/student_p37/checkpoints/best.pt
    python bench/soft_labels.py ... --teacher untrained --out bench/results/soft_labels_untrained.json

The networks are fully convolutional, so a teacher trained at 128 px runs on a larger canvas; its objects keep
the size it learned when the digits do. The batch takes images of the first image's orientation only, as an
aspect-ratio-grouped sampler would (a landscape and a portrait image pad each other to a square). Bytes are set
against the image's file, the same image as a JPEG (quality 90), and COCO's mean JPEG (train2017, ~163 KB).
Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from pipeline.coco import load_coco  # noqa: E402
from pipeline.dataset import DetectionDataset  # noqa: E402
from schemas.assignment import AssignmentRow, column_bytes, decode_batch, encode_batch  # noqa: E402
from schemas.config import config_from_dict  # noqa: E402
from tests.tiny import make_teacher, tiny_config  # noqa: E402
from trainer.checkpoint import load_checkpoint, load_network  # noqa: E402
from trainer.engine import Engine  # noqa: E402
from trainer.losses import SoftTargets, soft_label_kd  # noqa: E402
from trainer.soft_codec import decode_soft, encode_soft  # noqa: E402
from trainer.worker import StreamSpec  # noqa: E402

SOFT_COLS = ("soft_image",)
KD_COLS = ("kd_anchor", "kd_delta", "kd_iou_prob")
COCO_MEAN_JPEG = 163_000   # train2017: 19.3 GB of JPEGs in 118,287 files


def jpeg_bytes(path, quality: int = 90) -> int:
    """The size of an image (a path or an open file) re-encoded as a JPEG, the format COCO's photos come in."""
    from PIL import Image
    sink = io.BytesIO()
    Image.open(path).convert("RGB").save(sink, format="JPEG", quality=quality)
    return sink.tell()


def network_from(path: str, device: str):
    """A checkpoint's network A under the configuration it was trained with (any input size runs)."""
    cfg = config_from_dict(load_checkpoint(path)["config"], path)
    net, _, _ = load_network(path, cfg, "a", device)
    return net.eval().requires_grad_(False)


def schema3(probs: Tensor, floor: float = 0.01) -> tuple[Tensor, float]:
    """What schema 3 sent: entries >= floor (8 bytes each), elsewhere the per-image per-class mean of the rest."""
    below = probs < floor
    fill = torch.where(below, probs, 0.0).sum(1) / below.sum(1).clamp(min=1)
    approx = torch.where(below, fill.half().float()[:, None, :], probs.half().float())
    return approx, float((~below).sum()) * 8 / probs.shape[0] + probs.shape[2] * 2


def kd_terms(student, targets: SoftTargets, anchors, kw) -> tuple[dict, Tensor]:
    losses = soft_label_kd(student.cls_logits, student.box_deltas, student.iou_logits, targets, anchors, **kw)
    grad, = torch.autograd.grad(losses["kd_cls"], student.cls_logits, retain_graph=True)
    return {k: float(v) for k, v in losses.items()}, grad


def compare(students, targets, dense, anchors, kw) -> dict:
    out = {}
    for name, (student, ref_losses, ref_grad) in students.items():
        losses, grad = kd_terms(student, targets, anchors, kw)
        total, ref_total = sum(losses.values()), sum(ref_losses.values())
        out[name] = {f"{k}_rel_error": (losses[k] - ref_losses[k]) / ref_losses[k] if ref_losses[k] else 0.0
                     for k in losses}
        out[name]["kd_total_rel_error"] = (total - ref_total) / ref_total
        out[name]["kd_cls_grad_rel_error"] = float((grad - ref_grad).norm() / ref_grad.norm())
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    size = [int(v) for v in args.input_size.split(",")]
    size = size[0] if len(size) == 1 else size
    root = Path(tempfile.mkdtemp(prefix="lad_bench_soft_"))
    teacher_path = args.teacher
    trained = args.student or (None if args.teacher == "untrained" else args.teacher)
    model = (load_checkpoint(trained)["config"]["model"] if trained else
             {"depth": 18, "fpn_levels": [2, 3, 4], "fpn_channels": 64, "head_convs": 2, "head_channels": 64})
    model = {k: model[k] for k in ("depth", "fpn_levels", "fpn_channels", "head_convs", "head_channels")}
    if args.teacher == "untrained":
        paa = tiny_config(args.data, root, mode="paa", input_size=size, model=model)
        teacher_path = str(make_teacher(paa, root / "teacher.pt", depth=34))
    cfg = tiny_config(args.data, root, mode="kd", teacher=teacher_path, input_size=size, model=model,
                      distill={"cls_weight": 10.0, "iou_weight": 10.0, "box_weight": 1.3, "min_iou": 0.1,
                               "gamma": 0.5})
    coco = load_coco(cfg.data.train)
    ds = DetectionDataset(coco, cfg.data.input_size, train=False, seed=0, flip_prob=0.0)
    landscape = [r.width >= r.height for r in coco.records]
    wanted = False if args.portrait else landscape[0]
    chosen = [i for i, wide in enumerate(landscape) if wide == wanted][:args.images]
    batch = ds.collate([ds[i] for i in chosen])
    n = batch["images"].shape[0]
    files = [os.path.getsize(coco.records[i].path) for i in chosen]
    jpegs = [jpeg_bytes(coco.records[i].path) for i in chosen]
    engine = Engine(cfg, "cpu", 10, load_teacher=False)
    teacher = network_from(teacher_path, "cpu")
    with torch.no_grad():
        tout = teacher(batch["images"])
    anchors, level_counts = engine.anchors(tout.level_sizes)
    dense = engine.soft_targets(tout, anchors, batch["boxes"])
    d = cfg.distill
    kw = dict(cls_weight=d.cls_weight, iou_weight=d.iou_weight, box_weight=d.box_weight, gamma=d.gamma)
    nets = {"untrained student": engine.model}
    if args.student:
        nets["trained student"] = network_from(args.student, "cpu")
    students = {}
    for name, net in nets.items():
        out = net(batch["images"])
        out.cls_logits.requires_grad_(True)
        students[name] = (out, *kd_terms(out, dense, anchors, kw))
    spec = StreamSpec.of(cfg)
    hard = dict(pos_anchor=np.zeros(0, np.int32), pos_gt=np.zeros(0, np.int32), ignore_anchor=np.zeros(0, np.int32))
    # the student weighs the box entries against its own GT boxes
    rows_base = [AssignmentRow(image_id=i, height=1, width=1, gt_boxes=gt.numpy(),
                               gt_labels=np.zeros(len(gt), np.int32), **hard) for i, gt in enumerate(batch["boxes"])]
    num_anchors, num_classes = int(sum(level_counts)), cfg.model.num_classes
    result = {"canvas": list(batch["images"].shape[2:]), "anchors": num_anchors, "classes": num_classes,
              "fpn_levels": model["fpn_levels"], "images": n, "image_file_bytes": float(np.mean(files)),
              "image_jpeg_q90_bytes": float(np.mean(jpegs)), "dense_fp32_bytes": num_anchors * num_classes * 4,
              "kd_entries_per_image": dense.batch_idx.numel() / n,
              "dense": {k: v[1] for k, v in students.items()}, "qualities": []}
    for quality in args.qualities:
        t0 = time.perf_counter()
        encoded = encode_soft(dense, tout.level_sizes, quality)
        enc_ms = (time.perf_counter() - t0) * 1e3 / n
        rows = [AssignmentRow(**{**r.__dict__, **e}) for r, e in zip(rows_base, encoded)]
        table = encode_batch(rows, spec.anchor_hash, num_anchors, num_classes, True)
        cb = column_bytes(table)
        t0 = time.perf_counter()
        got = decode_soft(decode_batch(table, spec.anchor_hash), anchors, tout.level_sizes, num_classes)
        dec_ms = (time.perf_counter() - t0) * 1e3 / n
        soft_b, kd_b = sum(cb[k] for k in SOFT_COLS) / n, sum(cb[k] for k in KD_COLS) / n
        err = (got.cls_prob - dense.cls_prob).abs()
        entry = {"quality": quality, "max_abs_error": float(err.max()), "mean_abs_error": float(err.mean()),
                 "soft_bytes_per_image": soft_b, "kd_bytes_per_image": kd_b,
                 "pct_of_image_file": 100 * (soft_b + kd_b) / result["image_file_bytes"],
                 "pct_of_image_jpeg": 100 * (soft_b + kd_b) / result["image_jpeg_q90_bytes"],
                 "pct_of_coco_mean_jpeg": 100 * (soft_b + kd_b) / COCO_MEAN_JPEG,
                 "encode_ms_per_image": enc_ms, "decode_ms_per_image": dec_ms,
                 "loss": compare(students, got, dense, anchors, kw)}
        result["qualities"].append(entry)
    approx, cls_bytes = schema3(dense.cls_prob)
    old = SoftTargets(approx, dense.batch_idx, dense.anchor_idx, dense.deltas, dense.iou_prob, dense.weight)
    old_b = cls_bytes + 28 * result["kd_entries_per_image"]
    result["schema3_floor_0.01"] = {"bytes_per_image": old_b, "pct_of_image_file": 100 * old_b / result["image_file_bytes"],
                                    "loss": compare(students, old, dense, anchors, kw)}
    return result


def print_table(res: dict) -> None:
    print(f"\ncanvas {res['canvas']}, FPN levels {res['fpn_levels']}, {res['anchors']} anchors x {res['classes']} "
          f"classes, {res['images']} images, image file {res['image_file_bytes'] / 1024:.1f} KB (as JPEG q90 "
          f"{res['image_jpeg_q90_bytes'] / 1024:.1f} KB), {res['kd_entries_per_image']:.0f} KD box entries/image")
    names = list(res["dense"])
    head = "".join(f"{'kd_cls ' + n.split()[0]:>20}{'grad':>8}{'kd total':>10}" for n in names)
    print(f"{'scheme':<22}{'KB/image':>9}{'% file':>8}{'% JPEG':>8}{'% COCO*':>8}{'max err':>9}{head}")

    def row(label, kb, pct, jpeg, coco, err, loss):
        cells = "".join(f"{loss[n]['kd_cls_rel_error']:>+19.2%} {loss[n]['kd_cls_grad_rel_error']:>7.1%}"
                        f"{loss[n]['kd_total_rel_error']:>+10.2%}" for n in names)
        print(f"{label:<22}{kb:>9.1f}{pct:>7.1f}%{jpeg:>7.1f}%{coco:>7.1f}%{err:>9}{cells}")

    for t in res["qualities"]:
        b = t["soft_bytes_per_image"] + t["kd_bytes_per_image"]
        row(f"quality {t['quality']}", b / 1024, t["pct_of_image_file"], t["pct_of_image_jpeg"],
            t["pct_of_coco_mean_jpeg"], f"{t['max_abs_error']:.4f}", t["loss"])
    old = res["schema3_floor_0.01"]
    b = old["bytes_per_image"]
    row("schema 3 (floor 0.01)", b / 1024, old["pct_of_image_file"], 100 * b / res["image_jpeg_q90_bytes"],
        100 * b / COCO_MEAN_JPEG, "", old["loss"])
    print("* against COCO's mean JPEG (train2017, ~163 KB)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a digits dataset directory (train.json)")
    p.add_argument("--input-size", default="640,480", help="data.input_size: N, or LONG,SHORT (keep ratio)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint, or 'untrained'")
    p.add_argument("--student", default=None, help="a trained student checkpoint (its model settings are used)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--portrait", action="store_true", help="a batch of portrait images (default: of the first "
                   "image's orientation)")
    p.add_argument("--qualities", type=int, nargs="+", default=[100, 90, 85, 80, 75],
                   help="pipeline.soft_label_quality values to measure")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/soft_labels.json")
    args = p.parse_args(argv)
    res = run(args)
    print_table(res)
    doc = {"args": vars(args), "machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "python": platform.python_version(), **res}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

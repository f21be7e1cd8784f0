"""The `lad` command: make the built-in dataset, pretrain a backbone, train, evaluate, serve, and the README's demo."""
from __future__ import annotations

import argparse
import json
import os
import sys

from pipeline.errors import DatasetError
from pipeline.run import USER_ERRORS, add_train_arguments, main_train, report_unexpected
from schemas.config import ConfigError


def cmd_data(args: argparse.Namespace) -> int:
    from pipeline.digits import make_digits
    try:
        info = make_digits(args.out, image_size=args.image_size, shapes=args.shapes, num_train=args.num_train,
                           num_val=args.num_val, digits_per_image=(args.min_digits, args.max_digits),
                           digit_size=tuple(args.digit_size), seed=args.seed,
                           progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1, default=str))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluate_checkpoint import evaluate_checkpoint
    try:
        results = evaluate_checkpoint(args.checkpoint, args.data, image_root=args.image_root,
                                      networks=args.network, out=args.out, device=args.device,
                                      progress=not args.quiet, detections=args.detections)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pipeline.validate import format_table
    for name, stats in results.items():
        if stats:
            print(f"\nnetwork {name.upper()} on {args.data}:\n{format_table(stats)}")
        else:
            print(f"network {name.upper()}: detections only ({args.data} has no annotations to score them against)")
    if args.detections:
        print(f"detections (COCO results format, {args.data}'s category ids): {args.detections}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.predict import predict_images
    try:
        summary = predict_images(args.checkpoint, args.inputs, args.out, score_thr=args.score_thr,
                                 network=args.network, device=args.device, batch_size=args.batch_size,
                                 progress=not args.quiet, warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = f" ({summary['skipped']} skipped)" if summary["skipped"] else ""
    print(f"{summary['detections']} detections on {summary['images']} images{skipped} -> "
          f"{summary['out']}/detections.json and one drawn .jpg per image")
    return 0 if summary["images"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_checkpoint
    try:
        done = export_checkpoint(args.checkpoint, args.out, args.format, args.network)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.format}: {done['path']} (checked against PyTorch: max abs difference {done['max_abs_diff']:.1e}); "
          f"anchors, categories and inference settings: {done['sidecar']}; docs/export.md shows inference")
    return 0


def cmd_assign(args: argparse.Namespace) -> int:
    from pipeline.prefill import fill_store
    from schemas.config import load_config
    try:
        done = fill_store(load_config(args.config, args.overrides), progress=not args.quiet, verbose=args.verbose)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    merged = f"; {done['parts_merged']} parts merged into one" if done["parts_merged"] else ""
    print(f"{done['store']}: {done['views']} views; {done['stored_before']} were stored, the teacher assigned "
          f"{done['computed']}{merged}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pipeline.pretrain import pretrain
    try:
        info = pretrain(args.train, args.val, args.out, depth=args.depth, epochs=args.epochs,
                        batch_size=args.batch_size, lr=args.lr, window=args.window,
                        background_ratio=args.background_ratio, seed=args.seed, device=args.device,
                        threads=args.threads, num_workers=args.workers, progress=not args.quiet)
    except USER_ERRORS as e:
        line = str(e).strip()
        if line.startswith("Caught "):  # from a DataLoader worker: torch's "Original Traceback" ends in "...Error: line"
            line = line.splitlines()[-1].split("Error: ", 1)[-1]
        print(f"error: {line}", file=sys.stderr)
        return 2
    acc = info["val_accuracy"]
    scored = f", val accuracy {acc:.3f} over {len(info['classes'])} classes" if acc is not None else ""
    print(f"ResNet-{args.depth} backbone: {info['weights']} ({info['wall_s']:.0f} s{scored}); "
          f"use it as model.pretrained={info['weights']}; how it was made: {info['weights']}.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo import demo
    try:
        return demo(quick=args.quick or os.environ.get("CI", "").lower() in ("1", "true"), out=args.out,
                    progress=not args.quiet)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from services.server import main
    return main(args)


def _shapes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in part.lower().split("x", 1)) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH[,WxH...], e.g. 640x480,480x640, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lad", description="Label Assignment Distillation: train PAA detectors with "
                                "LAD, soft-label KD, SoLAD and CoLAD on COCO-format data.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("data", help="make the built-in dataset")
    dsub = d.add_subparsers(dest="dataset", required=True, metavar="DATASET")
    dg = dsub.add_parser("digits", help="COCO-format detection data from scikit-learn's handwritten digits",
                         description="Several real 8x8 digit scans per image, scaled and tinted on textured "
                         "backgrounds; writes DIR/train.json, DIR/val.json and DIR/images/.")
    dg.add_argument("--out", required=True, help="output directory")
    dg.add_argument("--image-size", type=int, default=128, help="square image side in pixels (default 128)")
    dg.add_argument("--shapes", type=_shapes, default=None, metavar="WxH[,WxH...]",
                    help="image shapes instead of squares, taken in turn, e.g. 640x480,480x640 for COCO-like photos")
    dg.add_argument("--digit-size", type=int, nargs=2, default=(14, 44), metavar=("MIN", "MAX"),
                    help="range of a digit's side in pixels (default 14 44; scale it with the images)")
    dg.add_argument("--num-train", type=int, default=1200, help="training images (default 1200)")
    dg.add_argument("--num-val", type=int, default=200, help="validation images (default 200)")
    dg.add_argument("--min-digits", type=int, default=2, help="fewest digits per image (default 2)")
    dg.add_argument("--max-digits", type=int, default=5, help="most digits per image (default 5)")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--quiet", action="store_true")
    dg.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a run from a YAML config (local Ray / in-process)",
                       description="Train one run; writes runs/<name>/ (config.yaml, metrics.jsonl, eval.json, "
                       "checkpoints/). Resumes from checkpoints/last.pt when present.")
    add_train_arguments(t)
    t.set_defaults(func=main_train)

    e = sub.add_parser("eval", help="evaluate a checkpoint with COCO mAP",
                       description="Runs inference on a COCO file and prints the 12-line COCO table; writes JSON.")
    e.add_argument("--checkpoint", required=True, help="a checkpoint written by `lad train`")
    e.add_argument("--data", required=True, help="COCO instances JSON to evaluate on")
    e.add_argument("--image-root", default=None, help="directory image file_names are relative to")
    e.add_argument("--network", choices=["a", "b", "both"], default="both",
                   help="CoLAD checkpoints hold two networks (default: every network in the checkpoint)")
    e.add_argument("--out", default=None, help="JSON output (default: next to the checkpoint)")
    e.add_argument("--detections", default=None, metavar="FILE",
                   help="also write the detections as a COCO results file (for test-dev servers and other tools); "
                        "with both networks, network B's go to FILE with .b before its suffix. A file without "
                        "annotations gives detections only")
    e.add_argument("--device", default="auto")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="run a trained detector on your images; COCO results and drawn images",
                        description="Detects objects in image files and folders (searched recursively) with a "
                        "checkpoint. Writes DIR/detections.json (COCO results, the checkpoint's category ids and "
                        "names), DIR/images.json (the inputs as a COCO image file) and DIR/<name>.jpg with the "
                        "boxes drawn. Files that are not readable images are reported and skipped.")
    pr.add_argument("--checkpoint", required=True, help="a checkpoint written by `lad train`")
    pr.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders of images")
    pr.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    pr.add_argument("--score-thr", type=float, default=None,
                    help="keep detections scoring at least this (default: the checkpoint's inference.score_thr)")
    pr.add_argument("--network", choices=["a", "b"], default="a", help="of a CoLAD checkpoint (default: a)")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--device", default="auto", help="auto (a GPU when present) | cpu | cuda | cuda:N")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="export a checkpoint's network to ONNX or TorchScript",
                       description="Writes the network (images in, raw head outputs out; any batch and input size "
                       "that is a multiple of 32) and FILE.json with what inference needs around it (anchors, "
                       "categories, thresholds). Checked against PyTorch before it is kept. docs/export.md.")
    x.add_argument("--checkpoint", required=True, help="a checkpoint written by `lad train`")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--out", required=True, metavar="FILE", help="e.g. model.onnx or model.pt")
    x.add_argument("--network", choices=["a", "b"], default="a", help="of a CoLAD checkpoint (default: a)")
    x.set_defaults(func=cmd_export)

    a = sub.add_parser("assign", help="fill a LAD run's assignment store ahead of time (teacher labels, on Ray)",
                       description="Runs the frozen teacher of a LAD config on every training image in every view "
                       "the recipe makes (unflipped and flipped) and keeps the labels in pipeline.assignment_store. "
                       "Views already stored are skipped, so it resumes; runs with this teacher then train "
                       "without asking it. Uses pipeline.assigners actors on the config's Ray (a local one by "
                       "default). docs/pipeline.md.")
    a.add_argument("config", help="a LAD run config with pipeline.assignment_store set (or --set it)")
    a.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set pipeline.assignment_store=s3://bucket/labels")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    a.add_argument("--verbose", action="store_true", help="Ray's own output on the console too")
    a.set_defaults(func=cmd_assign)

    pt = sub.add_parser("pretrain", help="train a ResNet backbone on object crops of a COCO dataset "
                        "(a model.pretrained file)",
                        description="The stand-in for ImageNet weights where none can be had, or where your images "
                        "are far from ImageNet's: a ResNet classifier learns the categories of TRAIN's boxes and "
                        "background from windows cut around each object (at the image's own scale) and away from "
                        "all objects. Saves the backbone (torchvision's state dict, no classifier) to FILE for "
                        "model.pretrained, and FILE.json with the accuracy per epoch. Each epoch's end is kept in "
                        "FILE.resume: the same command run again after an interruption goes on from there. "
                        "docs/pretraining.md.")
    pt.add_argument("--train", required=True, help="COCO instances JSON whose boxes give the crops")
    pt.add_argument("--val", default=None, help="a COCO file of the same categories to measure accuracy on")
    pt.add_argument("--out", required=True, metavar="FILE", help="the weights file to write (e.g. weights/r18.pth)")
    pt.add_argument("--depth", type=int, choices=[18, 34, 50, 101], default=18, help="ResNet depth (default 18)")
    pt.add_argument("--epochs", type=int, default=6, help="passes over every object (default 6)")
    pt.add_argument("--batch-size", type=int, default=128, help="crops per step (default 128)")
    pt.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate, cosine to zero (default 0.1)")
    pt.add_argument("--window", type=int, default=48,
                    help="crop side in pixels at the image's scale; larger objects are scaled down to fit (default 48)")
    pt.add_argument("--background-ratio", type=float, default=0.5,
                    help="background windows per object window (default 0.5)")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--device", default="auto", help="auto (a GPU when present) | cpu | cuda | cuda:N")
    pt.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    pt.add_argument("--workers", type=int, default=0, help="DataLoader processes cutting crops (default 0: in the "
                    "training process; give a GPU a few)")
    pt.add_argument("--quiet", action="store_true", help="no progress bar")
    pt.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("serve", help="start the control plane (FastAPI)")
    try:
        from services.server import add_arguments
        add_arguments(s)
    except ImportError:
        pass
    s.set_defaults(func=cmd_serve)

    m = sub.add_parser("demo", help="the README's main job: dataset, a teacher, a baseline, a LAD student",
                       description="Makes the built-in dataset, trains a PAA R34 teacher, then on the same data and "
                       "schedule a PAA R18 baseline and an R18 LAD student through the pipeline on a local Ray; "
                       "prints one COCO table of the three and plots their AP curves.")
    m.add_argument("--quick", action="store_true", help="a shorter run (default when CI=true)")
    m.add_argument("--out", default="runs/demo", help="where the demo's dataset and runs go")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # not the user's input: a bug, or the environment (a full disk, a lost cluster)
        print(report_unexpected(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

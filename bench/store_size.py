"""The assignment store's size per view at COCO scale: `lad assign` (pipeline.prefill.fill_store, on one local Ray)
fills a store for digits images of COCO's shape and object count, on COCO's anchor layout, and the store's bytes are
divided by its views.

    images    640x480 digits (COCO's most common shape), 4-11 objects each (mean 7.5; COCO: 7.3), 16-240 px
    anchors   input 800 (square: `lad assign`'s views), FPN P3-P7, one anchor per location: 13,343 per view
    teacher   an untrained ResNet-18 (the positives' count follows PAA's top-k per level and GMM split, not the
              teacher's quality; the bench says how many positives and ignored anchors a view has)

Prints bytes per view (after `lad assign` merges the parts), positives and ignored anchors per view, and writes
JSON (--out).

    python bench/store_size.py                      # 48 images, 96 views
    python bench/store_size.py --images 16 --input-size 1333
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.tiny import make_teacher, tiny_config  # noqa: E402

NETWORK = ["model.fpn_levels=[3,4,5,6,7]", "model.fpn_channels=64", "model.head_channels=64", "model.head_convs=2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--input-size", type=int, default=800)
    p.add_argument("--out", default="bench/results/store_size.json")
    args = p.parse_args()

    import pyarrow as pa
    import ray
    import torch

    from pipeline.digits import make_digits
    from pipeline.prefill import fill_store
    from pipeline.ray_env import init_local

    work = Path(tempfile.mkdtemp(prefix="lad-store-size-"))
    make_digits(str(work / "data"), shapes=[(640, 480)], num_train=args.images, num_val=4, digits_per_image=(4, 11),
                digit_size=(16, 240), progress=False)
    cfg = tiny_config(work / "data", work / "runs", mode="paa", input_size=args.input_size, overrides=NETWORK,
                      train={"batch_size": 4, "threads": None}, pipeline={"engine": "ray", "cpus_per_assigner": 1.0})
    teacher = make_teacher(cfg, work / "teacher.pt")
    cfg = tiny_config(work / "data", work / "runs", mode="lad", teacher=teacher, input_size=args.input_size,
                      overrides=NETWORK, train={"batch_size": 4, "threads": None},
                      pipeline={"engine": "ray", "cpus_per_assigner": 1.0})
    cfg.pipeline.assignment_store = str(work / "store")
    init_local(num_cpus=os.cpu_count(), object_store_memory=512 * 1024 * 1024, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        done = fill_store(cfg, progress=False)
        fill_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    parts = list((work / "store" / "parts").glob("*.arrow"))
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(x))).read_all() for x in parts)
    size = sum(x.stat().st_size for x in parts)
    gts = [len(a["annotations"]) for a in [json.loads((work / "data" / "train.json").read_text())]][0]
    pos = [len(x) for x in table["pos_anchor"].to_pylist()]
    ign = [len(x) for x in table["ignore_anchor"].to_pylist()]
    result = {"views": table.num_rows, "parts": len(parts), "store_bytes": size,
              "bytes_per_view": round(size / table.num_rows, 1), "objects_per_image": round(gts / args.images, 2),
              "positives_per_view": round(statistics.mean(pos), 1), "ignored_per_view": round(statistics.mean(ign), 1),
              "fill_s": round(fill_s, 1), "computed": done["computed"]}
    out = {"command": "python bench/store_size.py " + " ".join(sys.argv[1:]), "args": vars(args),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
           "ray": ray.__version__, "result": result}
    print(f"{result['views']} views of {args.images} images ({result['objects_per_image']} objects each), input "
          f"{args.input_size}: {result['bytes_per_view']} bytes per view; {result['positives_per_view']} positives "
          f"and {result['ignored_per_view']} ignored anchors per view; filled in {result['fill_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

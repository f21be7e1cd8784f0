"""What batches by orientation save: the padded pixels (and so anchors) per image of a keep-ratio run, with
`data.group_by_orientation` on and off, planned by the run's own `plan_epoch` and padded by the pipeline's own
`canvas_shape`.

    python bench/orientation.py                     # 5,000 photos of 640x480 or 480x640, 3 landscape to 1 portrait

Prints a line per batch size and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from pipeline.loop import epoch_budgets, plan_epoch  # noqa: E402
from pipeline.transforms import aug_params, canvas_shape  # noqa: E402
from schemas.config import config_from_dict  # noqa: E402


def padded_pixels_per_image(sizes, input_size, batch_size: int, group: bool, seed: int) -> float:
    """The mean padded canvas area per image over one epoch's batches."""
    cfg = config_from_dict({"name": "orientation", "seed": seed, "train": {"batch_size": batch_size},
                            "data": {"input_size": input_size, "group_by_orientation": group}}, "bench")
    ids, wide = list(range(len(sizes))), [w >= h for w, h in sizes]
    (epoch, steps, _), *_ = epoch_budgets(cfg, ids, 0, [], 10 ** 9, 1)
    area = 0
    for step in plan_epoch(cfg, ids, epoch, [], steps, 1, wide):
        for batch in step:
            params = [aug_params(*sizes[i], input_size, False) for i in batch]
            h, w = canvas_shape([(p.resized_h, p.resized_w) for p in params], input_size)
            area += h * w * len(batch)
    return area / len(sizes)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--landscape", type=float, default=0.75, help="share of landscape images")
    p.add_argument("--input-size", default="1333,800")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 16])
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", default="bench/results/orientation.json")
    args = p.parse_args(argv)
    input_size = [int(v) for v in args.input_size.split(",")]
    rng = np.random.default_rng(args.seed)
    sizes = [(640, 480) if w else (480, 640) for w in rng.random(args.images) < args.landscape]
    rows = []
    for bs in args.batch_sizes:
        grouped, mixed = (padded_pixels_per_image(sizes, input_size, bs, g, args.seed) for g in (True, False))
        rows.append({"batch_size": bs, "grouped_px": grouped, "ungrouped_px": mixed, "ratio": grouped / mixed})
        print(f"batch {bs:>3}: {grouped / 1e6:.3f} Mpx per image grouped, {mixed / 1e6:.3f} ungrouped "
              f"= {grouped / mixed:.2f}x")
    write_results(args.out, {"args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

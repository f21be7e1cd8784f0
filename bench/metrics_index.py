"""What the control plane's metrics index saves on a long run: GET /runs/{id}/roles and /metrics (the run page asks
both every 2 s) read through `services.metrics_index` against the whole-file read they replaced, side by side.

    python bench/metrics_index.py                   # a 90,000-step co-learning metrics.jsonl (12 COCO epochs)

Prints the times and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from schemas.rundir import RunDir  # noqa: E402
from services.metrics_index import MetricsIndex  # noqa: E402


def colad_line(step: int) -> dict:
    """A metrics line of the size a co-learning step logs (losses of both networks, timings, role ratios)."""
    return {"step": step, "epoch": step // 7330, "loss": 1.0, "loss_a": 0.5, "loss_b": 0.5, "lr": 0.01, "num_pos": 100,
            "policy": "auto", "teacher_ratio": 0.4, "teacher_ratio_by_level": [0.1, 0.2, 0.3, 0.4, 0.5],
            "teacher_ratio_by_size": {"small": 0.1, "medium": 0.2, "large": 0.3}, "step_ms": 100.0,
            **{f"metric_{i}": 1.2345 for i in range(30)}}


def timed(fn, repeat: int) -> float:
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=90_000)
    p.add_argument("--appended", type=int, default=20, help="lines logged between two polls of the run page")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="bench/results/metrics_index.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run = RunDir(tmp)
        with open(run.metrics_path, "w") as f:
            f.writelines(json.dumps(colad_line(s)) + "\n" for s in range(1, args.steps + 1))
        size = run.metrics_path.local.stat().st_size
        whole = timed(lambda: run.metrics_page(args.steps - args.appended, 1000), args.repeat)
        whole_roles = timed(lambda: sum(1 for m in run.iter_metrics() if "teacher_ratio" in m), args.repeat)
        index = MetricsIndex(run)
        first = timed(index.refresh, 1)
        step = args.steps

        polled = 0.0
        for _ in range(args.repeat):   # the trainer logs a few lines, then the page polls: only the poll is timed
            for _ in range(args.appended):
                step += 1
                run.log(colad_line(step))
            run.flush()
            polled += timed(lambda: (index.refresh(), index.page(step - args.appended, 1000)), 1) / args.repeat
    result = {"metrics_mb": size / 1e6, "whole_read_page_s": whole, "whole_read_roles_s": whole_roles,
              "index_first_s": first, "index_poll_s": polled, "ratio": (whole + whole_roles) / polled}
    print(f"metrics.jsonl {size / 1e6:.1f} MB, {args.steps} steps: whole read {whole:.3f} s a page, "
          f"{whole_roles:.3f} s the roles; index: {first:.3f} s once, then {polled * 1e3:.2f} ms a poll "
          f"({args.appended} new lines, refresh and page) = {result['ratio']:.0f}x less per poll of both")
    write_results(args.out, {"args": vars(args), "results": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())

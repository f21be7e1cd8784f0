"""Does `torch.compile` pay for the PAA head? Eager against compiled, forward + backward, interleaved.

The head (4 GN convs per branch on 5 levels of 256 channels) is most of a COCO-sized step's FLOPs, so it is
where a compiler could win. This times it alone at issue 20's preset shapes (512x512, batch 2, R50-FPN P3-P7 x
256, 80 classes; features from the backbone once, untrained, fp32), and the compile time it must pay back.

    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_head.py       # mode "default"
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python bench/compile_head.py --mode max-autotune-no-cudagraphs
    python bench/compile_head.py --device cuda --threads 0

Inductor caches what it compiled (in /tmp by default), so a second run reports seconds instead of the compile
time a new run pays; a fresh TORCHINDUCTOR_CACHE_DIR measures the cold compile.

Prints one line and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from schemas.config import config_from_dict  # noqa: E402
from trainer.network import build_network  # noqa: E402


def head_step(head, features) -> None:
    out = head(features)
    loss = out.cls_logits.sigmoid().mean() + out.box_deltas.abs().mean() + out.iou_logits.mean()
    loss.backward()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="default", help="torch.compile mode")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each: one eager and one compiled step)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (0: leave as is)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="bench/results/compile_head.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = config_from_dict({"name": "compile", "data": {"input_size": args.size}, "model": {
        "depth": 50, "fpn_levels": [3, 4, 5, 6, 7], "fpn_channels": 256, "head_convs": 4, "head_channels": 256,
        "num_classes": 80, "frozen_stages": 1, "norm_eval": True}}, "bench")
    net = build_network(cfg).to(device).train()
    with torch.no_grad():
        features = [f.detach() for f in net.features(torch.rand(args.batch, 3, args.size, args.size, device=device))]
    head = net.head
    compiled = torch.compile(head, mode=None if args.mode == "default" else args.mode)
    compile_ms = timed(lambda: head_step(compiled, features), device)   # compiles, then runs once
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds + 1):                                    # the first round warms up
        for name, module in (("eager", head), ("compiled", compiled)):
            times[name].append(timed(lambda: head_step(module, features), device))
            head.zero_grad(set_to_none=True)
    eager, comp = statistics.median(times["eager"][1:]), statistics.median(times["compiled"][1:])
    saved = eager - comp
    result = {"mode": args.mode, "compile_and_first_step_s": compile_ms / 1e3, "eager_ms": eager,
              "compiled_ms": comp, "compiled_over_eager": comp / eager,
              "steps_to_pay_back": (compile_ms - comp) / saved if saved > 0 else None,
              "size": args.size, "batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}
    back = f"pays back after {result['steps_to_pay_back']:.0f} steps" if saved > 0 else "never pays back"
    print(f"head fwd+bwd: eager {eager:.0f} ms, compiled ({args.mode}) {comp:.0f} ms = {comp / eager:.2f}x; "
          f"compile {compile_ms / 1e3:.0f} s, {back}")
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

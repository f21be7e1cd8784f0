"""What the dense focal loss costs, and what the index-based one (`trainer.losses.focal_loss_sum`) saves.

The dense form (what `detection_loss` did before) builds a [B, A, C] float target with a 1 at each positive's
class for torchvision's `sigmoid_focal_loss`. The index-based form needs no target: every entry pays the negative
term (1 - alpha) * p^gamma * softplus(x), and each positive anchor swaps it for alpha * (1 - p)^gamma *
softplus(-x) at its class. This times both, forward + backward, interleaved, at issue 20's preset shapes
(512x512, P3-P7: 5,456 anchors, 80 classes, batch 2) and at COCO's (800x1333: 22,400 anchors), checks they agree,
and prints the dense loss's time beside a measured PAA step time you pass in (--step-ms, from bench/steps.py).

    python bench/focal_loss.py --step-ms 2311

Writes JSON (--out).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torchvision.ops import sigmoid_focal_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import write_results  # noqa: E402
from trainer.losses import focal_loss_sum  # noqa: E402

ALPHA, GAMMA = 0.25, 2.0


def dense_focal(logits, labels, ignore):
    """As `detection_loss` computes it: a scattered float target and torchvision's focal loss."""
    num_classes = logits.shape[-1]
    is_pos = labels < num_classes
    target = torch.zeros_like(logits).scatter_(-1, labels.clamp(max=num_classes - 1)[..., None],
                                               is_pos[..., None].to(logits.dtype))
    focal = sigmoid_focal_loss(logits, target, alpha=ALPHA, gamma=GAMMA, reduction="none")
    return torch.where(ignore[..., None], 0.0, focal).sum()


def indexed_focal(logits, labels, ignore):
    return focal_loss_sum(logits, labels, ignore, ALPHA, GAMMA)


def case(batch, anchors, classes, positives, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, anchors, classes, generator=g) - 4.0).requires_grad_(True)
    labels = torch.full((batch, anchors), classes, dtype=torch.long)
    idx = torch.randint(0, anchors, (batch, positives), generator=g)
    labels.scatter_(1, idx, torch.randint(0, classes, (batch, positives), generator=g))
    ignore = torch.rand(batch, anchors, generator=g) < 0.02
    return logits, labels, ignore


def fwd_bwd_ms(fn, logits, labels, ignore) -> float:
    t = time.perf_counter()
    fn(logits, labels, ignore).backward()
    ms = (time.perf_counter() - t) * 1e3
    logits.grad = None
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=float, default=None, help="a measured PAA step at the preset, for the share")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/focal_loss.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {"preset 512x512, batch 2": (2, 5456, 80, 300), "COCO 800x1333, batch 2": (2, 22400, 80, 600)}
    results = {}
    for name, shape in cases.items():
        logits, labels, ignore = case(*shape)
        a, b = dense_focal(logits, labels, ignore), indexed_focal(logits, labels, ignore)
        ga, = torch.autograd.grad(a, logits)
        gb, = torch.autograd.grad(b, logits)
        times = {"dense": [], "indexed": []}
        for _ in range(args.rounds + 1):
            for key, fn in (("dense", dense_focal), ("indexed", indexed_focal)):
                times[key].append(fwd_bwd_ms(fn, logits, labels, ignore))
        dense, indexed = (statistics.median(times[k][1:]) for k in ("dense", "indexed"))
        results[name] = {"entries": shape[0] * shape[1] * shape[2], "dense_ms": dense, "indexed_ms": indexed,
                         "indexed_over_dense": indexed / dense, "loss_rel_diff": float((b - a).abs() / a.detach()),
                         "grad_max_abs_diff": float((gb - ga).abs().max())}
        share = f", {100 * dense / args.step_ms:.1f} % of a {args.step_ms:.0f} ms step" if args.step_ms and \
            name.startswith("preset") else ""
        print(f"{name}: dense {dense:.1f} ms, indexed {indexed:.1f} ms ({indexed / dense:.2f}x){share}; "
              f"loss diff {results[name]['loss_rel_diff']:.1e}, grad diff {results[name]['grad_max_abs_diff']:.1e}")
    doc = {"args": vars(args), "torch": torch.__version__, "machine": platform.machine(),
           "python": platform.python_version(), "results": results}
    write_results(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())

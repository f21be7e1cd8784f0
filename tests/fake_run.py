"""A stand-in for `python -m pipeline.run CONFIG` that honours the same run-directory contract, fast and
without torch, so the control plane's tests exercise real processes and files.

Steps: `train.max_steps` (default 5), each sleeping $LAD_FAKE_STEP_S seconds (default 0.05). A run named
`fail*` fails at step 2 with a one-line stderr message; `ignore-term*` ignores SIGTERM (tests the SIGKILL
escalation). Colad runs report `policy` and `teacher_ratio` and follow control/roles.json.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from schemas.files import atomic_write_json


def main(argv: list[str]) -> int:
    cfg = yaml.safe_load(Path(argv[0]).read_text())
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    total = (cfg.get("train") or {}).get("max_steps") or 5
    step_s = float(os.environ.get("LAD_FAKE_STEP_S", "0.05"))
    colad = cfg.get("mode") == "colad"
    policy = (cfg.get("colearn") or {}).get("policy", "auto")
    stop = {"requested": False}
    if cfg["name"].startswith("ignore-term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("requested", True))

    def progress(state: str, step: int, error=None) -> None:
        atomic_write_json(run_dir / "progress.json", {"state": state, "step": step, "total_steps": total, "epoch": 0,
                                                "error": error, "pid": os.getpid()})

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    progress("running", 0)
    for step in range(1, total + 1):
        time.sleep(step_s)
        if cfg["name"].startswith("fail") and step == 2:
            progress("failed", step, "loss is NaN at step 2")
            print("error: loss is NaN at step 2", file=sys.stderr)
            return 1
        roles = run_dir / "control" / "roles.json"
        if colad and roles.exists():
            policy = json.loads(roles.read_text())["policy"]
        record = {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 0.01, "step_ms": step_s * 1000}
        if colad:
            record.update(policy=policy, teacher_ratio=0.5)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"fake")
        if stop["requested"]:
            progress("stopped", step)
            return 0
        progress("running", step)
    atomic_write_json(run_dir / "eval.json", [{"epoch": 0, "step": total, "stats": {"AP": 0.5, "AP50": 0.7}}])
    progress("succeeded", total)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

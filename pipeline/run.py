"""Run one training run from a config file: `python -m pipeline.run CONFIG [--set key=value ...]`.

This is what `lad train` calls and what `ray job submit` runs on a cluster. `pipeline.engine` in the config picks
in-process training (`local`) or the Ray assigner-pool pipeline (`ray`).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import DatasetError, RunLost
from schemas.config import ConfigError, RunConfig, load_config
from schemas.rundir import RunDirBusy
from trainer.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, FileNotFoundError, RunDirBusy)


def run(cfg: RunConfig, progress: bool = True, resume: bool = True) -> dict:
    """Train `cfg` with its engine; returns the last evaluation ({network: stats}) or {}."""
    if cfg.pipeline.engine == "ray":  # the assignment stream, or co-learning's coordinator and worker groups
        from pipeline.ray_driver import train as ray_train
        return ray_train(cfg, progress=progress, resume=resume)
    from pipeline.local import train
    return train(cfg, progress=progress, resume=resume)


def print_summary(cfg: RunConfig, result: dict) -> None:
    from pipeline.validate import format_table
    for name, stats in result.items():
        label = f" (network {name.upper()})" if len(result) > 1 else ""
        print(f"\nCOCO bbox evaluation of {cfg.run_dir}{label}:\n{format_table(stats)}")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by its dotted path, e.g. --set train.max_steps=50 (repeatable)")
    p.add_argument("--no-resume", action="store_true", help="start over even if the run directory has last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main_train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, progress=not args.quiet, resume=not args.no_resume)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunLost as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_summary(cfg, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    return main_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

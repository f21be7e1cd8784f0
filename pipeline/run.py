"""Run one training run from a config file: `python -m pipeline.run CONFIG [--set key=value ...]`.

This is what `lad train` calls and what `ray job submit` runs on a cluster. `pipeline.engine` in the config picks
in-process training (`local`) or the Ray assigner-pool pipeline (`ray`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.assignment_store import StoreMismatch
from pipeline.errors import DatasetError, RunLost
from schemas.config import ConfigError, RunConfig, load_config
from schemas.rundir import RunDirBusy
from trainer.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, DatasetError, CheckpointError, FileNotFoundError, RunDirBusy, StoreMismatch)


def run(cfg: RunConfig, progress: bool = True, resume: bool = True, verbose: bool = False) -> dict:
    """Train `cfg` with its engine; returns the last evaluation ({network: stats}) or {}. `verbose`: Ray's own
    output on the console too (engine ray)."""
    if cfg.pipeline.engine == "ray":  # the assignment stream, or co-learning's coordinator and worker groups
        from pipeline.ray_driver import train as ray_train
        return ray_train(cfg, progress=progress, resume=resume, verbose=verbose)
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
    p.add_argument("--no-resume", action="store_true",
                   help="start over even if the run directory has last.pt (its last.pt, best.pt, metrics and "
                        "evaluations are dropped)")
    p.add_argument("--quiet", action="store_true", help="no progress bar: only warnings, errors and the result")
    p.add_argument("--verbose", action="store_true",
                   help="engine ray: Ray's own output too (workers, Ray Train, Ray Data), with the workers' step "
                        "lines instead of the bar; otherwise it stays in Ray's log files")


def main_train(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        result = run(cfg, progress=not args.quiet, resume=not args.no_resume, verbose=args.verbose)
    except (*USER_ERRORS, RunLost) as e:  # one line; a lost run (exit 1) resumes when run again
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, RunLost) else 2
    print_summary(cfg, result)
    return 0


def error_log_dir() -> Path:
    """Where an unexpected error's traceback goes: $LAD_ERROR_DIR, else $XDG_CACHE_HOME/lad/errors (~/.cache)."""
    if os.environ.get("LAD_ERROR_DIR"):
        return Path(os.environ["LAD_ERROR_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lad" / "errors"


def report_unexpected(error: BaseException) -> str:
    """One line for the console; the whole traceback in a file it names (or inline if no file can be written)."""
    import time
    import traceback

    first = (str(error).strip().splitlines() or [""])[0][:600]
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        path = error_log_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"lad {' '.join(sys.argv[1:])}\n{text}")
        where = f"traceback in {path}"
    except OSError as e:  # e.g. the disk that failed the run is the one the log would go to
        where = f"traceback could not be saved ({e.strerror}): {text.strip().splitlines()[-1]}"
    return f"error: {type(error).__name__}: {first} ({where})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(p)
    try:
        return main_train(p.parse_args(argv))
    except Exception as e:  # the control plane's runs and Ray jobs start here: their log's last line is the error
        print(report_unexpected(e), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

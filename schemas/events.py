"""TensorBoard event files of a run (`<run>/tensorboard/`), written beside `metrics.jsonl` by whichever process
logs the run's metrics (`schemas.rundir.RunDir.log` / `add_eval`): `tensorboard --logdir runs` shows every run.

Scalars, grouped by tag prefix: `loss/` (detection, KD and co-learning losses), `train/` (lr, positives),
`speed/` (images/s, step and data-wait ms), `colad/` (teacher ratio overall, per level, per object size) and
`eval/` (COCO stats of network A; `eval_b/` of B). A process's first event is a session start at its first step,
so TensorBoard drops the events a resumed run had written after its checkpoint, as `metrics.jsonl` does. No torch:
tensorboard's own file writer and protos.
"""
from __future__ import annotations

import itertools
import math
import numbers
import os
import sys
import time
from typing import Any, Optional

from schemas.storage import Location

_COUNT = itertools.count()

SKIP = {"step", "epoch", "pid", "time", "rank"}
SIZES = ("small", "medium", "large")


def tag_of(key: str) -> str:
    if key.startswith(("loss", "kd_")):
        return f"loss/{key}"
    if key.startswith("teacher_ratio") or key.startswith(("cand_loss", "taught", "defined")):
        return f"colad/{key}"
    if key.endswith(("_ms", "_per_s")) or key in ("backlog", "peak_backlog") or key.startswith("object_store"):
        return f"speed/{key}"
    return f"train/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of a metrics record: numbers (not bools) by their tag, lists per level (`_P0`, `_P1`...),
    teacher ratios by object size by size; NaN and text left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIP or isinstance(value, bool):
            continue
        if isinstance(value, numbers.Real):
            out[tag_of(key)] = float(value)
        elif isinstance(value, list) and key.endswith("by_level"):
            out.update({f"{tag_of(key)}/level{i}": float(v) for i, v in enumerate(value)
                        if isinstance(v, numbers.Real) and not isinstance(v, bool)})
        elif isinstance(value, dict) and key.endswith("by_size"):
            out.update({f"{tag_of(key)}/{s}": float(value[s]) for s in SIZES if isinstance(value.get(s), numbers.Real)})
    return {k: v for k, v in out.items() if math.isfinite(v)}


class EventLog:
    """One process's TensorBoard event file in `<run>/tensorboard/`, opened on first use. Events are a view of
    metrics.jsonl and eval.json, never the record: a failure to write them (tensorboard missing, a full disk) is
    one warning, and the run goes on without them."""

    def __init__(self, where: Location):
        """`where`: the run's `tensorboard/`. On object storage the file is written in a local folder of this
        process and uploaded whole by `upload` (an event file cannot be appended to there)."""
        self.where = where
        self.dir = None if where.remote else where.local  # remote: a local folder made at the first event
        self._writer = None
        self._broken = False

    def reset(self) -> None:
        """After a rewind (a resume in the same process): the next event starts a new session, so TensorBoard
        drops what was written after the checkpoint."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:
                pass
        self._writer = None

    def upload(self) -> None:
        """On object storage: copy this process's event files to the run's `tensorboard/` (whole objects)."""
        if not self.where.remote or self._broken or self.dir is None or not self.dir.is_dir():
            return
        try:
            for path in sorted(self.dir.iterdir()):
                (self.where / path.name).write_bytes(path.read_bytes())
        except OSError as e:
            self._off(e)

    def _off(self, e: Exception) -> None:
        self._broken = True
        print(f"warning: {self.where}: TensorBoard events are off for this process ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:200] if str(e) else 'no message'}); metrics.jsonl is complete",
              file=sys.stderr)

    def _write(self, step: int, values: dict[str, float]) -> None:
        if self._broken:
            return
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.event_file_writer import EventFileWriter

            if self._writer is None:
                if self.dir is None:
                    self.dir = self.where.cache() / f"{os.getpid()}-{next(_COUNT)}"
                self.dir.mkdir(parents=True, exist_ok=True)
                self._writer = EventFileWriter(str(self.dir), flush_secs=10)
                start = event_pb2.Event(wall_time=time.time(), step=step,
                                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
                self._writer.add_event(start)  # TensorBoard purges this run's older events at steps >= `step`
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=t, simple_value=v)
                                                 for t, v in values.items()])
            self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
            self._writer.flush()  # a logged step is rare enough, and a worker's process may end without closing
        except Exception as e:  # ImportError, OSError, a protobuf clash: the metrics files are the record
            self._off(e)

    def metrics(self, record: dict[str, Any]) -> None:
        if isinstance(record.get("step"), int) and record.get("event") is None:
            values = scalars(record)
            if values:
                self._write(record["step"], values)

    def evaluation(self, record: dict[str, Any]) -> None:
        stats: Optional[dict] = record.get("stats")
        if not isinstance(stats, dict) or not isinstance(record.get("step"), int):
            return
        prefix = "eval" if record.get("network", "a") == "a" else f"eval_{record['network']}"
        values = {f"{prefix}/{k}": float(v) for k, v in stats.items()
                  if isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0}
        if values:
            self._write(record["step"], values)

"""Test instrumentation, handed to a run explicitly (`observers=`; a production run has none): what each rank
trained at each step and what each assigner actor assigned, with the pid of the process that did it, so a test can
check exactly-once and kill that process from outside. Objects of this class travel to the Ray workers pickled."""
import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Optional


def digest(labels) -> str:
    """A short hash of an assignment (labels, GT index, ignores)."""
    h = hashlib.sha1()
    for t in (labels.labels, labels.gt_index, labels.ignore):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Tracer:
    """`trace.[TAG.]rankR.jsonl` per rank ({"step", "epoch", "rank", "pid", "ids", "labels"}; a resumed run first
    drops the steps it takes again) and `assigned.jsonl` ({"time", "pid", "epoch", "ids"}). `step_sleep_s` makes a
    slow student and `assign_sleep_s` a slow assigner (after it has written its line, before it returns the batch),
    so a test can act on them mid-run; `fail_at_step` ({"step", "rank", "tag"}) raises before that step."""

    def __init__(self, trace_dir, step_sleep_s: float = 0.0, assign_sleep_s: float = 0.0,
                 fail_at_step: Optional[dict] = None):
        self.dir = str(trace_dir)
        self.step_sleep_s, self.assign_sleep_s = step_sleep_s, assign_sleep_s
        self.fail_at_step = dict(fail_at_step or {})
        self._opened: set = set()

    def before_step(self, step: int, rank: int, tag: str) -> None:
        f = self.fail_at_step
        if f.get("step") == step and f.get("rank", 0) == rank and f.get("tag", tag) == tag:
            raise RuntimeError(f"injected failure before step {step} (test)")

    def after_step(self, step: int, epoch: int, rank: int, tag: str, image_ids: list, labels) -> None:
        path = Path(self.dir) / f"trace.{tag + '.' if tag else ''}rank{rank}.jsonl"
        if path not in self._opened:  # this process's first step: forget steps logged after the resumed checkpoint
            self._opened.add(path)
            if path.exists():
                kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < step]
                path.write_text("".join(ln + "\n" for ln in kept))
        if image_ids:
            record = {"step": step, "epoch": epoch, "rank": rank, "pid": os.getpid(), "ids": list(image_ids)}
            if labels is not None:
                record["labels"] = digest(labels)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def assigned(self, epoch: int, ids: list) -> None:
        with open(Path(self.dir) / "assigned.jsonl", "a") as f:
            f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "epoch": epoch, "ids": ids}) + "\n")
        if self.assign_sleep_s:
            time.sleep(self.assign_sleep_s)


class KillFromOutside:
    """While the `with` block runs, watch a trace (one JSON object a line, with "pid") and, once `ready(records)`
    holds, SIGKILL the process that wrote the last record, from the test's own process: the way the world kills a
    worker, with no hook in the code under test. `killed` lists the pid."""

    def __init__(self, trace, ready: Callable[[list], bool], timeout_s: float = 600,
                 target: Optional[Callable[[], list[int]]] = None):
        """`target`: the pids to kill instead of the last record's writer (e.g. `pids_of("ray::ColearnCoordinator")`)."""
        self.trace, self.ready, self.timeout_s, self.target = Path(trace), ready, timeout_s, target
        self.killed: list[int] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "KillFromOutside":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        deadline = time.time() + self.timeout_s
        while time.time() < deadline and not self._done.is_set():
            records = [json.loads(x) for x in (self.trace.read_text().splitlines() if self.trace.exists() else [])]
            if records and self.ready(records):
                for pid in self.target() if self.target else [records[-1]["pid"]]:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
                return
            time.sleep(0.02)


def pids_of(title: str) -> list[int]:
    """Processes whose command line starts with `title`: Ray names an actor's process `ray::ClassName`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            if cmdline.startswith(title):
                pids.append(int(entry.name))
    return pids

"""The Ray driver's progress bar. The steps run in Ray Train workers, whose output stays in Ray's log files (unless
`--verbose`); the driver follows the run directory instead (progress.json, the last metrics line, eval.json) from a
thread, and shows the same bar as the in-process engine: steps, loss and lr, each evaluation, and a recovery."""
from __future__ import annotations

import contextlib
import sys
import threading

from tqdm import tqdm

from schemas.rundir import REMOTE_FLUSH_S, RunDir


class FollowBar:
    """A tqdm bar on stderr, refreshed every `every` seconds from a thread until `close()`."""

    def __init__(self, run: RunDir, total: int, initial: int, desc: str, every: float = 0.5):
        self.run, self.total, self.desc = run, total, desc
        self.every = max(every, REMOTE_FLUSH_S / 2) if run.remote else every  # each look is requests to a store
        self._evals = len(run.evals())
        self._done = threading.Event()
        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self._thread = threading.Thread(target=self._follow, name="lad-progress", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # the final state; never in the way of the driver's own clean-up
            self.tick()
        self.bar.close()

    def write(self, line: str) -> None:
        """A console line that does not break the bar."""
        self.bar.write(line, file=sys.stderr)

    def _follow(self) -> None:
        while not self._done.wait(self.every):
            with contextlib.suppress(Exception):  # a half-written file, a closed bar at exit: the next tick reads again
                self.tick()

    def tick(self) -> None:
        progress = self.run.progress() or {}
        step = progress.get("step")
        if isinstance(step, int) and step != self.bar.n:
            self.bar.n = min(step, self.total)
        recovery = progress.get("recovery") if progress.get("state") == "recovering" else None
        self.bar.set_description(f"{self.desc} (recovering {recovery['attempt']}/{recovery['max']})" if recovery
                                 else self.desc, refresh=False)
        metrics = self.run.latest_metrics() or {}
        if isinstance(metrics.get("loss"), (int, float)) and isinstance(metrics.get("lr"), (int, float)):
            self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}", refresh=False)
        evals = self.run.evals()
        for e in evals[self._evals:]:
            s = {k: v if isinstance(v, (int, float)) else float("nan") for k, v in (e.get("stats") or {}).items()}
            self.write(f"epoch {e.get('epoch')} step {e.get('step')}: {str(e.get('network', 'a')).upper()} "
                       f"AP {s.get('AP', float('nan')):.3f} AP50 {s.get('AP50', float('nan')):.3f}")
        self._evals = len(evals)
        self.bar.refresh()

"""Launchers start, watch and stop one run each; they know processes and Ray jobs, not queues or the registry.

Two implementations of one small interface:
- `LocalLauncher`: `python -m pipeline.run <run_dir>/config.yaml` as a child process in its own session, so a
  server restart neither kills it nor loses it (re-attached by pid + process start time, which guards
  against pid reuse). Stop = SIGTERM to the run's main process (it finishes its step, writes "stopped", exits 0),
  then SIGKILL to its whole process group after a grace period.
- `RayLauncher`: a Ray job per run through `JobSubmissionClient` (submission id = run id, so a resubmission
  after a crash is recognised instead of duplicated). Ray token auth is passed explicitly as a bearer header.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from schemas.rundir import RunDir
from services.registry import RunRecord


PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# --quiet: no progress bar; the run's state is in progress.json, and a bar would fill the log files
DEFAULT_COMMAND = (sys.executable, "-m", "pipeline.run", "--quiet")
RAY_ENTRYPOINT = "python -m pipeline.run --quiet"


class LaunchError(RuntimeError):
    """A run could not be started. `transient`: worth retrying later (the cluster is unreachable)."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


PENDING_NOTE = "Ray job PENDING: waiting for the cluster to have the driver's CPUs/GPUs free"


@dataclass
class Observation:
    """What a launcher can tell about a run right now."""
    alive: Optional[bool]                 # None: cannot tell (the cluster is unreachable)
    exit_code: Optional[int] = None       # local child processes only
    outcome: Optional[str] = None         # Ray's terminal status: succeeded | failed | stopped
    message: Optional[str] = None         # why it ended / why we cannot tell


class Launcher(Protocol):
    kind: str

    def start(self, rec: RunRecord) -> dict[str, Any]:
        """Start the run; return registry columns that identify it (pid, ray_job_id, ...)."""

    def observe(self, rec: RunRecord) -> Observation: ...

    def stop(self, rec: RunRecord) -> None:
        """Ask the run to stop after its current step."""

    def kill(self, rec: RunRecord) -> None:
        """The run ignored `stop` for the grace period: end it now."""


# ---- local processes ----------------------------------------------------------------------------------------
def process_start_time(pid: int) -> Optional[str]:
    """Start time of a process in clock ticks since boot (Linux); None where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of stat(5); fields[0] is field 3
    except (OSError, IndexError):
        return None


def _process_state(pid: int) -> Optional[str]:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def same_process_alive(pid: int, start: Optional[str]) -> bool:
    """Whether `pid` is still the process we launched (not a zombie, not a reused pid)."""
    if os.path.isdir("/proc"):
        state = _process_state(pid)
        if state is None or state in ("Z", "X"):
            return False
        return start is None or process_start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalLauncher:
    kind = "local"

    def __init__(self, command: Optional[list[str]] = None, cwd: Optional[str] = None,
                 threads_per_run: Optional[int] = None):
        self.command = list(command or DEFAULT_COMMAND)
        self.cwd = cwd or os.getcwd()
        self.threads_per_run = threads_per_run
        self._children: dict[str, subprocess.Popen] = {}

    def _env(self, rec: RunRecord) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env["LAD_RUN_ID"] = rec.id
        env.pop("LAD_API_TOKEN", None)  # the API's secret is the server's, not the training code's
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if PROJECT_ROOT not in paths:  # the packages import even when the project is not pip-installed
            env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, *paths])
        if self.threads_per_run and "OMP_NUM_THREADS" not in env:
            env["OMP_NUM_THREADS"] = str(self.threads_per_run)  # concurrent runs share the cores, not fight
        return env

    def start(self, rec: RunRecord) -> dict[str, Any]:
        files = RunDir(rec.run_dir)
        try:
            files.logs_dir.mkdir()
            with open(files.stdout_path, "ab") as out, open(files.stderr_path, "ab") as err:
                proc = subprocess.Popen([*self.command, rec.config_path], stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, cwd=self.cwd, env=self._env(rec), start_new_session=True,
                                        close_fds=True)
        except OSError as e:
            raise LaunchError(f"cannot start {self.command[0]}: {e}") from None
        self._children[rec.id] = proc
        return {"pid": proc.pid, "pid_start": process_start_time(proc.pid), "ray_job_id": None}

    def observe(self, rec: RunRecord) -> Observation:
        proc = self._children.get(rec.id)
        if proc is not None:
            return self._observe_child(rec.id, proc)
        if rec.pid is None:
            return Observation(alive=False, message="no process was recorded for this run")
        return Observation(alive=same_process_alive(rec.pid, rec.pid_start))

    def _observe_child(self, run_id: str, proc: subprocess.Popen) -> Observation:
        try:  # look without reaping: while the leader is a zombie its pid (= the group id) cannot be reused
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            info = True  # already reaped
        if info is None:
            return Observation(alive=True)
        self._kill_group(proc.pid)  # leftovers of the run (data loader workers, an in-process Ray)
        rc = proc.wait()
        del self._children[run_id]
        return Observation(alive=False, exit_code=rc)

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _own(self, rec: RunRecord) -> bool:
        """The pid still names our run: our child, or the same process we launched before a restart."""
        if rec.id in self._children:
            return True
        return rec.pid is not None and same_process_alive(rec.pid, rec.pid_start)

    def stop(self, rec: RunRecord) -> None:
        if rec.pid is None or not self._own(rec):
            return
        try:
            os.kill(rec.pid, signal.SIGTERM)  # the main process only: it stops its workers in order
        except ProcessLookupError:
            pass

    def kill(self, rec: RunRecord) -> None:
        if rec.pid is not None and self._own(rec):
            self._kill_group(rec.pid)


# ---- Ray jobs -----------------------------------------------------------------------------------------------
_RAY_OUTCOME = {"SUCCEEDED": "succeeded", "FAILED": "failed", "STOPPED": "stopped"}


def load_ray_token(token_file: Optional[str] = None) -> Optional[str]:
    """The Ray cluster token, found where Ray itself looks: --ray-token-file, $RAY_AUTH_TOKEN,
    $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token. None: the cluster is expected to run without token auth."""
    if token_file:
        return Path(token_file).read_text().strip() or None
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise
        return None


def driver_resources(config: dict[str, Any]) -> dict[str, float]:
    """What a run's entrypoint (the Ray job's driver) asks of the cluster, so Ray places it on a node that can
    hold it. An in-process run (`pipeline.engine: local`) trains inside the driver: it asks for its threads' CPUs
    (one if unset) and a GPU when its device is CUDA, which puts it on a worker (the compose head advertises no
    CPUs). A `ray` engine driver only coordinates the Train workers and assigners Ray places itself: nothing."""
    if (config.get("pipeline") or {}).get("engine", "local") == "ray":
        return {}
    train = config.get("train") or {}
    wants = {"entrypoint_num_cpus": float(train.get("threads") or 1)}
    if str(train.get("device") or "auto").startswith("cuda"):
        wants["entrypoint_num_gpus"] = 1.0
    return wants


class RayLauncher:
    kind = "ray"

    def __init__(self, address: str, token: Optional[str] = None, entrypoint: str = RAY_ENTRYPOINT):
        self.address = address
        self.entrypoint = entrypoint
        # Ray >= 2.52 authenticates the job server with a bearer token. The client would look for the token
        # itself only when RAY_AUTH_MODE=token is set in *this* process; passing the header explicitly works
        # regardless, and Ray's client keeps a caller-provided Authorization header as is.
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client_obj = None

    def _client(self):
        if self._client_obj is None:
            from ray.job_submission import JobSubmissionClient  # imported late: ray is slow to import
            self._client_obj = self._call("connect", JobSubmissionClient, self.address,
                                          headers=dict(self._headers))
        return self._client_obj

    def _call(self, what: str, fn, *args, **kwargs):
        """Run one job-server request; trouble reaching or authenticating to Ray becomes a transient
        LaunchError (the operator fixes the cluster or the token, runs wait), and the client is rebuilt."""
        from ray.exceptions import AuthenticationError
        try:
            return fn(*args, **kwargs)
        except OSError as e:  # refused, reset, timed out
            self._client_obj = None
            raise LaunchError(f"Ray job server {self.address} unreachable ({what}): {_one_line(e)}",
                              transient=True) from None
        except AuthenticationError as e:
            self._client_obj = None
            raise LaunchError(f"Ray job server {self.address} rejected the token ({what}); check --ray-token-file "
                              f"/ $RAY_AUTH_TOKEN: {_one_line(e)[:200]}", transient=True) from None
        except RuntimeError as e:
            if what == "connect":  # e.g. the version check failed: not a Ray job server
                raise LaunchError(f"Ray job server {self.address} unusable: {_one_line(e)}", transient=True) from None
            raise

    def start(self, rec: RunRecord) -> dict[str, Any]:
        client = self._client()
        entrypoint = f"{self.entrypoint} {shlex.quote(rec.config_path)}"
        try:
            self._call("submit", client.submit_job, entrypoint=entrypoint, submission_id=rec.id,
                       metadata={"lad_run_id": rec.id, "lad_run_name": rec.name}, **driver_resources(rec.config))
        except LaunchError:
            raise
        except RuntimeError as e:
            if "already exists" not in str(e):  # else we submitted it before a crash: adopt it
                code = _status_code(e)
                raise LaunchError(f"Ray refused the job: {_one_line(e)}",
                                  transient=code is not None and code >= 500) from None
        return {"ray_job_id": rec.id, "ray_address": self.address, "pid": None, "pid_start": None}

    def observe(self, rec: RunRecord) -> Observation:
        job_id = rec.ray_job_id or rec.id
        try:
            client = self._client()
            info = self._call("status", client.get_job_info, job_id)
        except LaunchError as e:
            return Observation(alive=None, message=str(e))
        except RuntimeError as e:
            if "404" in str(e) or "does not exist" in str(e):
                return Observation(alive=False, message=f"Ray job {job_id} not found on {self.address} "
                                                        "(was the cluster restarted?)")
            return Observation(alive=None, message=f"Ray status query failed: {_one_line(e)}")
        status = str(getattr(info.status, "value", info.status))
        if status in _RAY_OUTCOME:
            return Observation(alive=False, outcome=_RAY_OUTCOME[status], message=_last_line(info.message))
        if status == "PENDING":  # submitted, but the cluster has not placed its driver yet
            return Observation(alive=True, message=PENDING_NOTE + (f" ({_last_line(info.message)})"
                                                                    if info.message else ""))
        return Observation(alive=True)

    def stop(self, rec: RunRecord) -> None:
        """Ray sends SIGTERM to the entrypoint and SIGKILL after $RAY_JOB_STOP_WAIT_TIME_S (set on the head)."""
        try:
            self._call("stop", self._client().stop_job, rec.ray_job_id or rec.id)
        except LaunchError:
            raise
        except RuntimeError as e:
            raise LaunchError(f"Ray refused to stop the job: {_one_line(e)}") from None

    def kill(self, rec: RunRecord) -> None:
        pass  # Ray escalates to SIGKILL itself


def _status_code(e: Exception) -> Optional[int]:
    """The HTTP status in the SDK's "Request failed with status code N" errors."""
    m = re.search(r"status code (\d{3})", str(e))
    return int(m.group(1)) if m else None


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text[:500]


def _last_line(text: Optional[str]) -> Optional[str]:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:2000] if lines else None

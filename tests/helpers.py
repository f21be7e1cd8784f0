"""Small helpers the process-starting tests share (importable as `tests.helpers`; pyproject puts the repo root on
the path)."""
from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn, timeout: float = 15.0, what: str = "condition", interval: float = 0.05):
    """Poll `fn` until it returns something truthy (returned), or fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


FINAL_STATES = ("succeeded", "failed", "stopped")


def wait_server_up(proc, client, log_path, timeout: float = 60.0, what: str = "the server") -> None:
    """Wait until the control plane `proc` answers GET /healthz; fail with its log if it exits first."""
    import httpx

    def up():
        assert proc.poll() is None, f"{what} exited:\n{open(log_path).read()}"
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False
    wait_for(up, timeout=timeout, what=what, interval=0.2)


def wait_run_final(client, run_id: str, timeout: float, what: str | None = None) -> dict:
    """Poll GET /runs/{id} until the run reaches a final state; returns its detail."""
    def final():
        detail = client.get(f"/runs/{run_id}").json()
        return detail if detail["state"] in FINAL_STATES else None
    return wait_for(final, timeout=timeout, what=what or f"run {run_id} to end", interval=0.5)

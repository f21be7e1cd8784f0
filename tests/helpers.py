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

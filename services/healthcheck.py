"""Container health checks for docker/compose.yaml: exit 0 when healthy, else 1 with the reason on stderr.

    python -m services.healthcheck http://127.0.0.1:8000/healthz               # the control plane
    python -m services.healthcheck --ray-token http://127.0.0.1:8265/api/gcs_healthz   # Ray's job server
    python -m services.healthcheck --raylet          # this node's raylet runs, its object store in /dev/shm

One small module rather than inline `python -c` strings so that the checks compose runs are the ones the tests
run against real processes.
"""
from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def check_http(url: str, token: str | None = None, timeout: float = 5.0) -> str | None:
    """None when `url` answers 200, else why not."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return None if response.status == 200 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return f"{url}: {getattr(e, 'reason', e)}"


def check_raylet(proc: Path = Path("/proc")) -> str | None:
    """None when a raylet process runs in this container (what makes it a Ray node) with its object store in
    shared memory, else why not. Ray moves the store to disk, silently, when /dev/shm is smaller than the store."""
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if os.path.basename(argv[0]) != b"raylet":
            continue
        plasma = next((a.split(b"=", 1)[1].decode(errors="replace") for a in argv
                       if a.startswith(b"--plasma_directory=")), "")
        if not plasma.startswith("/dev/shm"):
            return (f"Ray's object store is on disk ({plasma or 'no --plasma_directory'}), not in /dev/shm: "
                    "/dev/shm is smaller than --object-store-memory; raise RAY_SHM_SIZE (compose's shm_size)")
        return None
    return "no raylet process: this Ray node is not running"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m services.healthcheck", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("urls", nargs="*", metavar="URL", help="must answer HTTP 200")
    p.add_argument("--ray-token", action="store_true", help="send the Ray cluster token (token auth) with URLs")
    p.add_argument("--raylet", action="store_true",
                   help="a raylet process must run here, with its object store in /dev/shm")
    a = p.parse_args(argv)
    if not a.urls and not a.raylet:
        p.error("nothing to check: give a URL or --raylet")
    problems = [check_raylet()] if a.raylet else []
    token = None
    if a.ray_token:
        from services.launcher import load_ray_token  # where Ray itself looks for it
        try:
            token = load_ray_token()
        except OSError as e:
            problems.append(f"cannot read the Ray token: {e}")
    problems += [check_http(url, token) for url in a.urls]
    problems = [x for x in problems if x]
    for problem in problems:
        print(f"unhealthy: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""The image's build context, as the legacy builder (Compose v1, DOCKER_BUILDKIT=0) sends it: a real Docker engine
builds this checkout's context into a `FROM scratch` image and the test lists what arrived. Secrets, VCS data,
datasets, runs and checkpoints must not; the code must."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _engine() -> str | None:
    """None when a Docker engine answers, else why not."""
    if shutil.which("docker") is None:
        return "the docker CLI is not installed (.ci/run installs docker.io and starts dockerd)"
    p = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                       timeout=60)
    return None if p.returncode == 0 else f"no Docker engine answers: {p.stderr.strip()[:200]}"


@pytest.fixture
def canaries():
    """What a user's checkout holds and the image must not: the compose secrets, a run's checkpoint, a dataset.
    Planted only where absent, removed after."""
    planted = []
    for rel, text in (("docker/secrets/api_token", "canary-api"), ("docker/secrets/ray_token", "canary-ray"),
                      ("runs/canary/checkpoints/last.pt", "x"), ("data/canary/train.json", "{}"),
                      ("trainer/canary.pt", "x")):
        path = REPO / rel
        if not path.exists():
            top = next(p for p in [path, *path.parents] if p.parent.exists() and not p.exists())
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            planted.append(top)
    yield
    for top in reversed(planted):  # a file planted inside a folder planted before it goes first
        shutil.rmtree(top) if top.is_dir() else top.unlink(missing_ok=True)


def test_the_legacy_builder_sends_no_secret_vcs_data_or_run(tmp_path, canaries):
    why = _engine()
    if why:
        pytest.skip(why)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM scratch\nCOPY . /ctx/\n")
    tag = f"lad-context-probe:{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    container = None
    try:
        build = subprocess.run(["docker", "build", "-q", "-f", str(dockerfile), "-t", tag, str(REPO)], env=env,
                               capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stderr
        container = subprocess.run(["docker", "create", tag, "/none"], capture_output=True, text=True,
                                   check=True).stdout.strip()
        exported = subprocess.run(["docker", "export", container], capture_output=True, check=True, timeout=300)
        with tarfile.open(fileobj=io.BytesIO(exported.stdout)) as tar:
            names = {m.name.lstrip("./") for m in tar.getmembers()}
    finally:
        if container:
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)
    ctx = {n[len("ctx/"):] for n in names if n.startswith("ctx/")}
    assert {"pyproject.toml", "trainer/model.py", "docker/ray-node.sh", "docker/compose.yaml"} <= ctx
    leaked = sorted(n for n in ctx if n.split("/")[0] in (".git", "runs", "data")
                    or n.startswith("docker/secrets") or n.endswith((".pt", ".pth", ".sqlite")))
    assert not leaked, f"in the build context: {leaked[:10]}"

"""Static checks of docker/compose.yaml and docker/Dockerfile: the deployment's security and wiring promises
(loopback-only ports, Ray token auth on, shared volumes at the same paths, healthchecks gating start-up) and
that the image installs the project from pyproject.toml. Commands are checked against the real CLIs' options."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from services.server import build_parser

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVICES = ("ray-head", "ray-worker", "control-plane")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def env(service: dict) -> dict:
    e = service.get("environment") or {}
    return e if isinstance(e, dict) else dict(item.split("=", 1) for item in e)


def test_services_present(compose):
    assert set(SERVICES) <= set(compose["services"])
    for name in SERVICES:
        s = compose["services"][name]
        assert s["build"]["dockerfile"] == "docker/Dockerfile" and s["build"]["context"] == ".."
        assert s["image"] == compose["services"]["ray-head"]["image"]  # one image for all three


def test_published_ports_bind_loopback_only(compose):
    published = {}
    for name, s in compose["services"].items():
        for port in s.get("ports", []):
            assert isinstance(port, str), f"{name}: use the 'HOST_IP:HOST:CONTAINER' string form"
            parts = port.split(":")
            assert len(parts) == 3 and parts[0] == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            published[int(parts[2])] = name
    assert published == {8265: "ray-head", 8000: "control-plane"}  # GCS 6379 is not published
    assert "6379" in [str(p) for p in compose["services"]["ray-head"].get("expose", [])]


def test_ray_token_auth_is_on_everywhere(compose):
    for name in ("ray-head", "ray-worker"):
        e = env(compose["services"][name])
        assert e["RAY_AUTH_MODE"] == "token"
        assert e["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token"
        assert "ray_token" in compose["services"][name]["secrets"]
    cp = compose["services"]["control-plane"]
    assert env(cp)["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token" and "ray_token" in cp["secrets"]
    assert "disabled" not in COMPOSE.read_text().replace("never \"disabled\"", "")
    assert compose["secrets"]["ray_token"]["file"].startswith("./secrets/")
    assert compose["secrets"]["api_token"]["file"].startswith("./secrets/")


def test_volumes_shared_at_the_same_paths(compose):
    assert {"datasets", "runs", "registry"} <= set(compose["volumes"])
    mounts = {name: dict(v.split(":", 1) for v in compose["services"][name]["volumes"]) for name in SERVICES}
    for name in SERVICES:
        assert mounts[name]["datasets"] == "/data" and mounts[name]["runs"] == "/runs", name
    assert mounts["control-plane"]["registry"] == "/var/lib/lad"


def test_ray_commands(compose):
    head = command(compose["services"]["ray-head"])
    assert head[:4] == ["ray", "start", "--head", "--block"]
    assert "--port=6379" in head and "--dashboard-port=8265" in head and "--dashboard-host=0.0.0.0" in head
    worker = command(compose["services"]["ray-worker"])
    assert worker[:2] == ["ray", "start"] and "--address=ray-head:6379" in worker and "--block" in worker
    assert "container_name" not in compose["services"]["ray-worker"]  # --scale needs generated names
    if shutil.which("ray"):  # every option exists in the installed Ray's `ray start`
        help_text = subprocess.run(["ray", "start", "--help"], capture_output=True, text=True, timeout=60).stdout
        for opt in {a.split("=")[0] for a in head + worker if a.startswith("--")}:
            assert opt in help_text, f"`ray start` has no option {opt}"


def test_control_plane_command_parses_with_lad_serve(compose):
    cmd = command(compose["services"]["control-plane"])
    assert cmd[:2] == ["lad", "serve"]
    args = build_parser().parse_args(cmd[2:])  # exits (fails the test) on an unknown option
    assert args.host == "0.0.0.0" and args.port == 8000
    assert args.ray_address == "http://ray-head:8265"
    assert args.token_file == "/run/secrets/api_token" and "api_token" in compose["services"]["control-plane"][
        "secrets"]
    assert args.runs_root == "/runs" and args.data_root == ["/data"]
    assert args.registry.startswith("/var/lib/lad/")


def test_healthchecks_gate_startup(compose):
    s = compose["services"]
    head_check = " ".join(s["ray-head"]["healthcheck"]["test"])
    assert "ray health-check" in head_check and "8265" in head_check
    assert "/healthz" in " ".join(s["control-plane"]["healthcheck"]["test"])
    for name in ("ray-worker", "control-plane"):
        assert s[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for name in ("ray-head", "control-plane"):
        test = s[name]["healthcheck"]["test"]
        snippet = next((t for t in test if "import urllib" in t), None) or re.search(r'-c \\?"(.*?)\\?"', test[-1])
        code = snippet if isinstance(snippet, str) else snippet.group(1)
        code = code.split('-c "', 1)[-1].rstrip('"').replace('\\"', '"')
        compile(code, f"{name} healthcheck", "exec")


def test_shm_and_gpu_block(compose):
    for name in ("ray-head", "ray-worker"):
        assert compose["services"][name]["shm_size"]
    # the commented GPU block is valid compose once uncommented
    lines = COMPOSE.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip() == "# deploy:")
    block = []
    for ln in lines[start:]:
        if not ln.strip().startswith("#"):
            break
        block.append(ln.replace("# ", "", 1))
    gpu = yaml.safe_load("\n".join(block))
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]


def test_dockerfile_installs_the_project_with_pyproject_pins():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert re.search(r"^COPY pyproject\.toml ", text, re.M) and re.search(r"^COPY \. \.$", text, re.M)
    installs = re.findall(r"pip install[^\n;&]*", text)
    assert any(re.search(r"pip install \"?\.", i) for i in installs), installs  # `pip install .` (+ extras)
    assert any("--no-deps" in i and i.rstrip().endswith(" .") for i in installs), installs
    for pin in ("torch", "torchvision", "ray", "fastapi"):  # versions come from pyproject.toml, nowhere else
        assert not re.search(rf"\b{pin}(\[[^\]]*\])?\s*[=<>~]=", text), f"{pin} pinned in the Dockerfile"
    assert re.search(r"^USER lad$", text, re.M)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"torch==[0-9.]+"', pyproject) and re.search(r'"ray\[[^\]]*\]==[0-9.]+"', pyproject)
    ignore = (REPO / "docker" / "Dockerfile.dockerignore").read_text().split()
    assert {"runs", "data", "docker/secrets", ".git"} <= set(ignore)


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(
    ["docker", "compose", "version"], capture_output=True).returncode != 0, reason="docker compose not installed")
def test_docker_compose_config_is_valid(tmp_path):
    secrets = COMPOSE.parent / "secrets"
    created = not secrets.exists()
    if created:
        secrets.mkdir()
        (secrets / "api_token").write_text("x" * 32)
        (secrets / "ray_token").write_text("y" * 32)
    try:
        p = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"], capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == 0, p.stderr
    finally:
        if created:
            shutil.rmtree(secrets)

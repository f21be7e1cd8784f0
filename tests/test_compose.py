"""Static checks of docker/compose.yaml and docker/Dockerfile: the deployment's security and wiring promises
(loopback-only ports, Ray token auth on, shared volumes at the same paths, healthchecks gating start-up) and
that the image installs the project from pyproject.toml. Commands are checked against the real CLIs' options."""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import httpx

import pytest
import yaml

from services.server import build_parser
from tests.helpers import free_port, wait_for, wait_run_final

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker" / "compose.yaml"
DOCKERFILE = REPO / "docker" / "Dockerfile"
SERVICES = ("ray-head", "ray-worker", "control-plane")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation for the forms compose.yaml uses: ${VAR}, ${VAR:-default} and
    ${VAR:+alternative} (operands may hold ${VAR}); any other `$` form fails, so a new one is noticed."""
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:-|:\+)((?:[^{}]|\{[^{}]*\})*))?\}")

    def one(m: re.Match) -> str:
        name, op, operand = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name, "")
        if op == ":-":
            return value or interpolate(operand, env)
        if op == ":+":
            return interpolate(operand, env) if value else ""
        return value

    out = pattern.sub(one, text)
    leftover = re.search(r"\$(?!\$)[{A-Za-z_]", out)
    assert leftover is None, f"compose.yaml uses an interpolation form this test does not know: {out[leftover.start():][:40]}"
    return out


def load_compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(interpolate(COMPOSE.read_text(), env or {}))


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()  # as `docker compose up` reads it with no variables set


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


def test_head_coordinates_and_workers_compute(compose):
    """The head advertises no CPUs (work lands on workers); RAY_WORKER_CPUS caps a worker, unset it auto-detects."""
    assert "--num-cpus=0" in command(compose["services"]["ray-head"])
    assert not any(a.startswith("--num-cpus") for a in command(compose["services"]["ray-worker"]))
    assert env(compose["services"]["ray-worker"])["RAY_WORKER_CPUS"] == ""  # ray-node.sh adds nothing
    assert env(load_compose({"RAY_WORKER_CPUS": "3"})["services"]["ray-worker"])["RAY_WORKER_CPUS"] == "3"
    assert load_compose({"LAD_IMAGE": "me/lad:1"})["services"]["ray-head"]["image"] == "me/lad:1"


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


def healthcheck(service: dict) -> list[str]:
    """A service's health-check command as argv (CMD) or as a shell line (CMD-SHELL)."""
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL"), test
    return test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]


def test_healthchecks_gate_startup(compose):
    s = compose["services"]
    assert "ray health-check" in healthcheck(s["ray-head"])[-1] and "8265" in healthcheck(s["ray-head"])[-1]
    assert "--raylet" in healthcheck(s["ray-worker"])[-1]
    assert healthcheck(s["control-plane"])[-1].endswith("/healthz")
    for name in ("ray-worker", "control-plane"):
        assert s[name]["depends_on"]["ray-head"]["condition"] == "service_healthy"
    for name in SERVICES:  # each runs the project's checker, whose options must parse
        assert "python -m services.healthcheck" in " ".join(healthcheck(s[name]))


def test_healthcheck_module_reports_what_is_wrong(tmp_path):
    from services.healthcheck import check_http, check_raylet, main
    assert "Connection refused" in check_http(f"http://127.0.0.1:{free_port()}/healthz")
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cmdline").write_bytes(b"/usr/bin/python\0-m\0raylet\0")  # raylet as an argument only
    assert "no raylet" in check_raylet(tmp_path)
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "cmdline").write_bytes(b"/opt/venv/lib/ray/core/src/ray/raylet/raylet\0--node\0"
                                              b"--plasma_directory=/tmp\0")
    assert "on disk (/tmp)" in check_raylet(tmp_path)  # Ray's silent fallback when /dev/shm is too small
    (tmp_path / "43" / "cmdline").write_bytes(b"/opt/venv/lib/ray/core/src/ray/raylet/raylet\0--node\0"
                                              b"--plasma_directory=/dev/shm\0")
    assert check_raylet(tmp_path) is None
    assert main([f"http://127.0.0.1:{free_port()}/x"]) == 1


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
    ignore = (REPO / ".dockerignore").read_text().split()
    assert {"runs", "data", "docker/secrets", ".git"} <= set(ignore)
    assert not (REPO / "docker" / "Dockerfile.dockerignore").exists()  # BuildKit would read it instead of the root's


def _compose_cli(version: str) -> list[str] | None:
    """The command of Compose `version` ("v1": docker-compose 1.x, "v2": the docker CLI plugin), if installed."""
    cmd = ["docker-compose"] if version == "v1" else ["docker", "compose"]
    if shutil.which(cmd[0]) is None:
        return None
    p = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True)
    return cmd if p.returncode == 0 and p.stdout.strip().startswith("1." if version == "v1" else "2.") else None


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_docker_compose_config_is_valid(tmp_path, version):
    """Both Compose generations accept the file (v1 refused `name:` and ${VAR:+...}), and read the same services,
    entrypoint and shm size. .ci/run installs both (Debian's docker-compose 1.29 and the v2 CLI plugin)."""
    cli = _compose_cli(version)
    if cli is None:
        pytest.skip(f"Compose {version} is not installed (.ci/run installs it)")
    work = tmp_path / "docker"  # a copy beside its own secrets: the repository's docker/secrets stays untouched
    work.mkdir()
    shutil.copy(COMPOSE, work / "compose.yaml")
    (work / "secrets").mkdir()
    for name in ("api_token", "ray_token"):
        (work / "secrets" / name).write_text("x" * 32)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LAD_", "COMPOSE_"))}
    p = subprocess.run([*cli, "-f", str(work / "compose.yaml"), "config"], capture_output=True, text=True,
                       timeout=60, env={**clean_env, "RAY_WORKER_CPUS": "3"})
    assert p.returncode == 0, p.stderr
    resolved = yaml.safe_load(p.stdout)
    worker = resolved["services"]["ray-worker"]
    assert worker["entrypoint"] == ["/app/docker/ray-node.sh"] and env(worker)["RAY_WORKER_CPUS"] == "3"
    assert set(resolved["services"]) == set(SERVICES)
    assert str(worker["shm_size"]) in ("2gb", "2147483648")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_object_storage_overlay_points_every_service_at_the_bucket(tmp_path, version):
    """compose.s3.yaml over compose.yaml: the control plane's runs root is the bucket (and `lad serve` accepts
    it), every service gets the endpoint and the credentials as a secret file, and nothing of the base is lost."""
    cli = _compose_cli(version)
    if cli is None:
        pytest.skip(f"Compose {version} is not installed (.ci/run installs it)")
    work = tmp_path / "docker"
    work.mkdir()
    for name in ("compose.yaml", "compose.s3.yaml"):
        shutil.copy(COMPOSE.parent / name, work / name)
    (work / "secrets").mkdir()
    for name in ("api_token", "ray_token", "aws_credentials"):
        (work / "secrets" / name).write_text("x" * 32)
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LAD_", "COMPOSE_", "AWS_"))}
    p = subprocess.run([*cli, "-f", str(work / "compose.yaml"), "-f", str(work / "compose.s3.yaml"), "config"],
                       capture_output=True, text=True, timeout=60,
                       env={**clean_env, "LAD_RUNS_ROOT": "s3://bucket/runs", "AWS_ENDPOINT_URL": "http://minio:9000"})
    assert p.returncode == 0, p.stderr
    services = yaml.safe_load(p.stdout)["services"]
    assert set(services) == set(SERVICES)
    for name, service in services.items():
        e = env(service)
        assert e["AWS_ENDPOINT_URL"] == "http://minio:9000", name
        assert e["AWS_SHARED_CREDENTIALS_FILE"] == "/run/secrets/aws_credentials", name
        secrets = {s["source"] if isinstance(s, dict) else s for s in service["secrets"]}
        assert {"ray_token", "aws_credentials"} <= secrets, name
        assert not any(k.startswith("AWS_SECRET") or k.startswith("AWS_ACCESS") for k in e), name
    assert env(services["ray-worker"])["RAY_AUTH_MODE"] == "token"   # the base's environment is kept
    assert env(services["control-plane"])["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_token"
    cmd = services["control-plane"]["command"]
    args = build_parser().parse_args((shlex.split(cmd) if isinstance(cmd, str) else cmd)[2:])
    assert args.runs_root == "s3://bucket/runs" and "/data" in args.data_root


def test_ray_node_entrypoint_sizes_the_store_to_shm_and_adds_the_cpu_cap():
    """docker/ray-node.sh, run here on the host's /dev/shm: 80 % of it as the object store, --num-cpus from
    RAY_WORKER_CPUS, and an explicit --object-store-memory left alone."""
    script = str(REPO / "docker" / "ray-node.sh")
    shm_kb = int(subprocess.run(["df", "-kP", "/dev/shm"], capture_output=True, text=True).stdout.split("\n")[1]
                 .split()[1])
    out = subprocess.run([script, "echo", "ray", "start"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]}).stdout.split()
    assert out == ["ray", "start", f"--object-store-memory={shm_kb * 1024 // 10 * 8}"]
    out = subprocess.run([script, "echo", "ray", "start", "--object-store-memory=100"], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"], "RAY_WORKER_CPUS": "3"}).stdout.split()
    assert out == ["ray", "start", "--object-store-memory=100", "--num-cpus=3"]


# ---- the compose services' own commands, on loopback ------------------------------------------------------------
def on_loopback(cmd: list[str], swaps: dict[str, str], extra: list[str]) -> list[str]:
    """A service's command with container names, ports and volume paths swapped for loopback ones. Every swap
    must match (a compose edit that renames an option fails here instead of silently testing something else)."""
    out, used = [], set()
    for arg in cmd:
        for old, new in swaps.items():
            if arg == old or arg.startswith(old + "/"):
                arg, used = new + arg[len(old):], used | {old}
                break
        out.append(arg)
    assert used == set(swaps), f"not in {cmd}: {sorted(set(swaps) - used)}"
    return out + extra


def entrypoint(service: dict) -> list[str]:
    """A service's entrypoint, its scripts from the image's /app/docker taken from this checkout."""
    return [str(REPO / "docker" / Path(e).name) if e.startswith("/app/docker/") else e
            for e in service.get("entrypoint") or []]


class Processes:
    """Processes started in their own sessions, stopped (SIGTERM, then SIGKILL to the group) in reverse order."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def alive(self, name: str) -> bool:
        proc = next(p for n, p, _ in self.procs if n == name)
        assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{self.tail(name)}"
        return True

    def tail(self, name: str, chars: int = 3000) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-chars:]

    def stop_all(self) -> None:
        for name, proc, log in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()  # `ray start --block` stops the Ray processes it started on SIGTERM
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    pass
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            log.close()


def ray_state(dash: str, token: str, what: str) -> list[dict]:
    """Ray's state API (nodes, actors, tasks) over HTTP, with the cluster token."""
    r = httpx.get(f"{dash}/api/v0/{what}", params={"limit": 10000, "detail": 1},
                  headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]["result"]


@pytest.mark.e2e
def test_compose_services_run_a_lad_job_on_loopback(tmp_path):
    """`docker compose up` without Docker: the head's, a worker's and the control plane's own commands from
    compose.yaml, started on 127.0.0.1 with Ray token auth; a tiny LAD run POSTed to the control plane
    succeeds, and its Train workers and assigner actors ran on the worker node (the head advertises no CPUs)."""
    if shutil.which("ray") is None or shutil.which("lad") is None:
        pytest.skip("the ray and lad commands are not installed")
    from tests.tiny import make_data, make_teacher, tiny_config

    spec = load_compose()["services"]
    ray_token, api_token = "ray-" + os.urandom(16).hex(), "api-" + os.urandom(16).hex()
    secrets, data, runs, lib = (tmp_path / d for d in ("secrets", "data", "runs", "lib"))
    for d in (secrets, data, runs, lib):
        d.mkdir()
    for name, value in (("ray_token", ray_token), ("api_token", api_token)):
        (secrets / name).write_text(value)
        (secrets / name).chmod(0o600)
    digits = make_data(data / "digits")
    teacher = make_teacher(tiny_config(digits, runs, mode="paa"), data / "teacher.pt", depth=34)

    gcs, dash_port, api_port = free_port(), free_port(), free_port()
    dash = f"http://127.0.0.1:{dash_port}"
    ray_tmp = tempfile.mkdtemp(prefix="lad-ray-", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LAD_"))}
    base["PYTHONPATH"] = str(REPO)

    def service_env(name: str) -> dict:
        e = {k: str(v) for k, v in env(spec[name]).items()}
        e = {k: str(secrets / Path(v).name) if v.startswith("/run/secrets/") else v for k, v in e.items()}
        return {**base, **e}

    # Two Ray nodes share this host: each gets its own agent ports and a small object store.
    node = ["--node-ip-address=127.0.0.1", f"--temp-dir={ray_tmp}", "--object-store-memory=200000000"]
    head_cmd = entrypoint(spec["ray-head"]) + on_loopback(command(spec["ray-head"]), {
        "--port=6379": f"--port={gcs}", "--dashboard-host=0.0.0.0": "--dashboard-host=127.0.0.1",
        "--dashboard-port=8265": f"--dashboard-port={dash_port}"},
        node + [f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}"])
    worker_cmd = entrypoint(spec["ray-worker"]) + on_loopback(command(spec["ray-worker"]), {"--address=ray-head:6379": f"--address=127.0.0.1:{gcs}"},
                             node + [f"--dashboard-agent-listen-port={free_port()}"])
    serve_cmd = on_loopback(command(spec["control-plane"]), {
        "lad": shutil.which("lad"), "0.0.0.0": "127.0.0.1", "8000": str(api_port),
        "http://ray-head:8265": dash, "/run/secrets": str(secrets), "/var/lib/lad": str(lib),
        "/runs": str(runs), "/data": str(data)}, ["--log-level", "warning"])
    assert "--ray-token-file" not in serve_cmd  # the control plane finds Ray's token as compose gives it: env

    def health(name: str, swaps: dict[str, str]) -> subprocess.CompletedProcess:
        """The service's own compose health check, pointed at the loopback ports."""
        cmd = healthcheck(spec[name])
        line = cmd[-1]
        for old, new in swaps.items():
            assert old in line, (old, line)
            line = line.replace(old, new)
        return subprocess.run(cmd[:-1] + [line], env=service_env(name), cwd=tmp_path, capture_output=True,
                              text=True, timeout=90)

    head_swaps = {"127.0.0.1:6379": f"127.0.0.1:{gcs}", "127.0.0.1:8265": f"127.0.0.1:{dash_port}"}
    api_swaps = {"127.0.0.1:8000": f"127.0.0.1:{api_port}"}
    procs = Processes(tmp_path)
    try:
        assert health("ray-head", head_swaps).returncode != 0  # nothing runs yet: the check can fail
        procs.start("ray-head", head_cmd, service_env("ray-head"), tmp_path)

        def head_up():
            procs.alive("ray-head")
            try:  # the job server answers 401 without the token: answering at all means it is up
                return httpx.get(f"{dash}/api/version", timeout=2).status_code == 401
            except httpx.TransportError:
                return False
        wait_for(head_up, 120, "the Ray head", interval=0.5)
        procs.start("ray-worker", worker_cmd, service_env("ray-worker"), tmp_path)
        nodes = wait_for(lambda: procs.alive("ray-worker") and (lambda ns: ns if len(ns) == 2 else None)(
            [n for n in ray_state(dash, ray_token, "nodes") if n["state"] == "ALIVE"]), 120, "the worker to join",
            interval=0.5)
        for name, swaps in (("ray-head", head_swaps), ("ray-worker", {"ray-head:6379": f"127.0.0.1:{gcs}"})):
            check = health(name, swaps)
            assert check.returncode == 0, (name, check.stdout, check.stderr)
        head_node = next(n for n in nodes if n["is_head_node"])
        worker_node = next(n for n in nodes if not n["is_head_node"])
        assert head_node["resources_total"].get("CPU", 0) == 0 and worker_node["resources_total"]["CPU"] >= 1

        api = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=30,
                           headers={"Authorization": f"Bearer {api_token}"})

        def api_up():
            procs.alive("control-plane")
            try:
                return api.get("/healthz").json()
            except httpx.TransportError:
                return None
        assert health("control-plane", api_swaps).returncode != 0
        procs.start("control-plane", serve_cmd, service_env("control-plane"), tmp_path)
        status = wait_for(api_up, 60, "the control plane", interval=0.5)
        assert status["launcher"] == "ray" and status["ray_address"] == dash
        check = health("control-plane", api_swaps)
        assert check.returncode == 0, (check.stdout, check.stderr)

        body = tiny_config(digits, runs, mode="lad", teacher=str(teacher),
                           train={"max_steps": 4, "eval_every": 4, "checkpoint_every": 2}).to_dict()
        body["name"] = "compose-lad"
        body["pipeline"]["engine"] = "ray"
        assert httpx.post(f"http://127.0.0.1:{api_port}/runs", json=body).status_code == 401  # token needed
        r = api.post("/runs", json=body)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        done = wait_run_final(api, run_id, 420, "the LAD run")
        assert done["state"] == "succeeded", (done, procs.tail("control-plane"), procs.tail("ray-head"))
        assert done["ray_job_id"] == run_id and done["progress"]["step"] == 4
        assert {c["name"] for c in done["checkpoints"]} >= {"last.pt"}
        metrics = api.get(f"/runs/{run_id}/metrics").json()["items"]
        assert [m["step"] for m in metrics if "loss" in m][-1] == 4 and all(m["num_pos"] > 0 for m in metrics
                                                                             if "num_pos" in m)
        assert done["eval"] and done["eval"][-1]["stats"]["AP"] >= 0

        # where the work ran: the actors that held CPUs (Train workers, assigners) on the worker node only
        actors = ray_state(dash, ray_token, "actors")  # this cluster ran nothing but this run
        working = [a for a in actors if (a.get("required_resources") or {}).get("CPU", 0) > 0]
        assert working, [a["class_name"] for a in actors]
        assert {a["node_id"] for a in working} == {worker_node["node_id"]}, [
            (a["class_name"], a["node_id"]) for a in working]
        assert job_driver_node(dash, ray_token, run_id) == head_node["node_id"]  # it only coordinates

        # an in-process run trains inside its driver: the driver itself goes to the worker
        body = tiny_config(digits, runs, mode="paa", train={"max_steps": 2}).to_dict()
        body["name"] = "compose-paa-local"
        run_id = api.post("/runs", json=body).json()["id"]
        done = wait_run_final(api, run_id, 300, "the in-process run")
        assert done["state"] == "succeeded", done
        assert job_driver_node(dash, ray_token, run_id) == worker_node["node_id"]
        api.close()
    finally:
        procs.stop_all()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert all(p.poll() is not None for _, p, _ in procs.procs)
    wait_for(lambda: not processes_mentioning(ray_tmp), 30, "every Ray process of the test cluster to exit",
             interval=0.5)


def job_driver_node(dash: str, token: str, job_id: str) -> str:
    r = httpx.get(f"{dash}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["driver_node_id"]


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (Ray's raylet, GCS and workers name their session's temp dir)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
    return pids

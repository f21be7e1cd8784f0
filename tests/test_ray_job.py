"""`python -m pipeline.run CONFIG` as a Ray job: a private head on 127.0.0.1 (own ports, own --temp-dir, small
object store, 2 CPUs) with token authentication on purpose, `ray job submit` of a tiny LAD run, and the head
stopped again (only ours: `ray stop` would stop every Ray on the machine, so the blocking `ray start` we launched
is stopped through its own process group, and anything left naming our temp dir is killed by pid)."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.tiny import make_data, make_teacher, tiny_config

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def kill_leftovers(temp_dir: str) -> None:
    """Processes of our head only: those whose command line names our temp dir (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if temp_dir.encode() in (proc / "cmdline").read_bytes():
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture
def ray_head():
    """A head node of our own; yields (dashboard address, env with the cluster's token)."""
    temp_dir = tempfile.mkdtemp(prefix="ladray")   # short: Ray's unix socket paths must stay < 108 chars
    token = secrets.token_hex(32)                   # what `ray get-auth-token --generate` makes
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent_http, agent_grpc, metrics, node_mgr, obj_mgr, rt_env = free_ports(9)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", "100000000", "--temp-dir", temp_dir,
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
         "--runtime-env-agent-port", str(rt_env), "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{head.stdout.read()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                if time.time() > deadline:
                    pytest.fail("the Ray head's dashboard did not come up in 90 s")
                time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)   # our head's own session: `ray start` and what it started
        try:
            head.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.communicate()
        kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def job(env, address, command, *args, timeout=300):
    return subprocess.run([RAY, "job", command, "--address", address, *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_ray_job_submit_runs_a_lad_run_through_the_pipeline(ray_head, tmp_path):
    address, env = ray_head
    data = make_data(tmp_path / "data")
    teacher = make_teacher(tiny_config(data, tmp_path / "runs", mode="paa"), tmp_path / "teacher.pt")
    cfg = tiny_config(data, tmp_path / "runs", mode="lad", teacher=teacher,
                      train={"max_steps": 3}, pipeline={"engine": "ray"})
    cfg.name = "ray_job"
    path = tmp_path / "ray_job.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(ROOT)}})

    wrong = dict(env, RAY_AUTH_TOKEN=secrets.token_hex(32))   # token auth is really on: a wrong token is refused
    refused = job(wrong, address, "list", timeout=120)
    assert refused.returncode != 0 and "authentication" in (refused.stdout + refused.stderr).lower(), refused

    sub = job(env, address, "submit", "--submission-id", "lad-ray-job-test", "--runtime-env-json", runtime_env,
              "--", sys.executable, "-m", "pipeline.run", str(path), "--quiet")
    logs = sub.stdout + sub.stderr
    status = job(env, address, "status", "lad-ray-job-test", timeout=120)
    assert sub.returncode == 0 and "succeeded" in (status.stdout + status.stderr).lower(), logs[-4000:]
    assert "COCO bbox evaluation" in logs, logs[-4000:]
    progress = json.loads((cfg.run_dir / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["step"] == 3
    metrics = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all("assign_ms" in m for m in metrics)
    assert (cfg.run_dir / "checkpoints" / "last.pt").exists()

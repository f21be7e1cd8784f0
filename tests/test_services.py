"""Control plane tests: the real server as a subprocess for lifecycles, stops and restarts; FastAPI's TestClient
for request validation and security answers. Runs use tests/fake_run.py (the run-directory contract without
torch) except the e2e test, which drives the real `python -m pipeline.run`."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import warnings

import httpx
import pytest

with warnings.catch_warnings():  # starlette's notice that it prefers httpx2 for the TestClient
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from services.app import Settings, create_app
from services.launcher import LocalLauncher, Observation, RayLauncher, driver_resources
from services.registry import Registry, RegistryError
from services.scheduler import VANISHED, conclude, default_max_concurrent
from services.security import (MAX_BODY_BYTES, SecurityError, check_bind, is_loopback, load_token,
                               token_matches)

from tests.helpers import free_port, wait_for, wait_run_final, wait_server_up  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FAKE = [sys.executable, str(REPO / "tests" / "fake_run.py")]
TOKEN = "t0k3n-for-tests-0123456789abcdef"


# ---- helpers --------------------------------------------------------------------------------------------------
def make_workspace(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.json").write_text("{}")
    (root / "data" / "val.json").write_text("{}")
    return root


def run_body(name: str, steps: int = 5, **extra) -> dict:
    body = {"name": name, "data": {"train": "data/train.json", "val": "data/val.json"},
            "train": {"max_steps": steps}}
    body.update(extra)
    return body


class Server:
    """`python -m services.server` on a free loopback port, rooted in a workspace directory."""

    def __init__(self, workspace: Path, *extra: str, step_s: float = 0.05, env: dict | None = None):
        self.workspace, self.port = workspace, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workspace / f"server-{self.port}.log"
        # tokens only when a test passes them
        base = {k: v for k, v in os.environ.items() if k != "LAD_API_TOKEN" and not k.startswith("RAY_AUTH")}
        full_env = {**base, "PYTHONPATH": str(REPO), "LAD_FAKE_STEP_S": str(step_s), **(env or {})}
        cmd = [sys.executable, "-m", "services.server", "--port", str(self.port),
               "--registry", "runs/registry.sqlite", "--runs-root", "runs", "--data-root", "data",
               "--run-command", " ".join(FAKE), "--log-level", "warning", *extra]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=workspace, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=10)
        try:
            wait_server_up(self.proc, self.client, self.log_path, timeout=20, what=f"server on {self.url}")
        except AssertionError:
            self.stop()
            raise AssertionError(f"server did not start:\n{self.log_path.read_text()}") from None

    def run(self, run_id: str) -> dict:
        r = self.client.get(f"/runs/{run_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_state(self, run_id: str, *states: str, timeout: float = 15.0) -> dict:
        return wait_for(lambda: (lambda d: d if d["state"] in states else None)(self.run(run_id)),
                        timeout=timeout, what=f"run {run_id} to become {states}")

    def post(self, body: dict, **kw) -> httpx.Response:
        return self.client.post("/runs", json=body, **kw)

    def stop(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.proc.wait(timeout=15)
        self.client.close()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(make_workspace(tmp_path_factory.mktemp("srv")), "--max-concurrent", "2", "--stop-grace", "2")
    yield s
    for run in s.client.get("/runs").json()["runs"]:
        if run["state"] in ("pending", "running"):
            s.client.post(f"/runs/{run['id']}/stop")
    s.stop()


@pytest.fixture
def api(tmp_path, monkeypatch):
    """A TestClient app (lifespan running) with the fake entrypoint, cwd = a fresh workspace."""
    ws = make_workspace(tmp_path)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("LAD_FAKE_STEP_S", "0.01")
    settings = Settings(registry_path="runs/registry.sqlite", runs_root="runs", data_roots=["data"],
                        run_command=FAKE, max_concurrent=2, poll_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        yield client


# ---- lifecycle through the real server -------------------------------------------------------------------------
def test_run_succeeds_with_progress_metrics_checkpoints_and_eval(server):
    r = server.post(run_body("ok-1", steps=5))
    assert r.status_code == 201, r.text
    run = r.json()
    assert r.headers["location"] == f"/runs/{run['id']}"
    assert run["state"] in ("pending", "running") and run["name"] == "ok-1"
    done = server.wait_state(run["id"], "succeeded", "failed")
    assert done["state"] == "succeeded", done
    assert done["progress"]["state"] == "succeeded" and done["progress"]["step"] == 5
    assert done["latest_metrics"]["step"] == 5
    assert [c["name"] for c in done["checkpoints"]] == ["last.pt"]
    assert done["eval"][0]["stats"]["AP"] == 0.5
    assert done["started_at"] and done["finished_at"] and done["error"] is None
    cfg_file = Path(done["run_dir"]) / "config.yaml"
    assert cfg_file.exists() and Path(done["config"]["data"]["train"]).is_absolute()
    assert any(r["id"] == run["id"] for r in server.client.get("/runs").json()["runs"])
    assert server.client.get("/runs", params={"state": "succeeded"}).status_code == 200


def test_metrics_paging(server):
    run = server.post(run_body("paged", steps=7)).json()
    server.wait_state(run["id"], "succeeded")
    page = server.client.get(f"/runs/{run['id']}/metrics", params={"limit": 3}).json()
    assert [m["step"] for m in page["items"]] == [1, 2, 3] and page["has_more"] and page["next_since"] == 3
    page = server.client.get(f"/runs/{run['id']}/metrics", params={"since": 3, "limit": 3}).json()
    assert [m["step"] for m in page["items"]] == [4, 5, 6] and page["has_more"]
    page = server.client.get(f"/runs/{run['id']}/metrics", params={"since": 6, "limit": 3}).json()
    assert [m["step"] for m in page["items"]] == [7] and not page["has_more"] and page["next_since"] == 7
    page = server.client.get(f"/runs/{run['id']}/metrics", params={"since": 7}).json()
    assert page["items"] == [] and page["next_since"] == 7
    assert server.client.get(f"/runs/{run['id']}/metrics", params={"limit": 0}).status_code == 422


def test_stop_midway_then_409(server):
    run = server.post(run_body("long-stop", steps=400)).json()
    wait_for(lambda: (server.run(run["id"]).get("progress") or {}).get("step", 0) >= 2, what="steps")
    r = server.client.post(f"/runs/{run['id']}/stop")
    assert r.status_code == 202 and r.json()["stop_requested"], r.text
    done = server.wait_state(run["id"], "stopped", "failed", "succeeded")
    assert done["state"] == "stopped" and done["error"] is None, done
    assert done["progress"]["state"] == "stopped" and done["progress"]["step"] < 400
    r = server.client.post(f"/runs/{run['id']}/stop")
    assert r.status_code == 409 and "already stopped" in r.json()["detail"]["message"]


def test_failed_run_reports_the_entrypoint_error(server):
    run = server.post(run_body("fail-nan", steps=5)).json()
    done = server.wait_state(run["id"], "failed", "succeeded")
    assert done["state"] == "failed" and done["error"] == "loss is NaN at step 2"


def test_stop_escalates_to_sigkill_after_grace(server):
    run = server.post(run_body("ignore-term", steps=400)).json()
    server.wait_state(run["id"], "running")
    wait_for(lambda: server.run(run["id"]).get("progress"), what="progress")
    assert server.client.post(f"/runs/{run['id']}/stop").status_code == 202
    done = server.wait_state(run["id"], "stopped", "failed", timeout=20)
    assert done["state"] == "stopped" and "killed" in done["error"]


def test_queue_holds_runs_beyond_max_concurrent(server):
    ids = [server.post(run_body(f"queued-{i}", steps=400)).json()["id"] for i in range(3)]
    wait_for(lambda: [server.run(i)["state"] for i in ids] == ["running", "running", "pending"], what="2 running")
    time.sleep(1.5)  # several scheduler ticks later the third is still waiting
    assert server.run(ids[2])["state"] == "pending"
    server.client.post(f"/runs/{ids[0]}/stop")
    server.wait_state(ids[0], "stopped")
    server.wait_state(ids[2], "running")
    for i in ids[1:]:
        server.client.post(f"/runs/{i}/stop")
    # a pending run stops at once, without ever starting
    pending = server.post(run_body("never-started", steps=400)).json()
    stopped = server.client.post(f"/runs/{pending['id']}/stop").json()
    assert stopped["state"] in ("stopped", "running")  # running only if a slot freed in between
    for i in ids[1:]:
        server.wait_state(i, "stopped")


def test_colad_roles(server):
    plain = server.post(run_body("plain-roles", steps=3)).json()
    assert server.client.get(f"/runs/{plain['id']}/roles").status_code == 409
    run = server.post(run_body("colad-roles", steps=400, mode="colad")).json()
    server.wait_state(run["id"], "running")
    state = server.client.get(f"/runs/{run['id']}/roles").json()
    assert state["policy"] == "auto"
    bad = server.client.put(f"/runs/{run['id']}/roles", json={"policy": "pin-c"})
    assert bad.status_code == 422 and bad.json()["detail"]["field"] == "policy"
    r = server.client.put(f"/runs/{run['id']}/roles", json={"policy": "alternate:50"})
    assert r.status_code == 200, r.text
    assert r.json()["requested"]["policy"] == "alternate:50"
    control = json.loads((Path(run["run_dir"]) / "control" / "roles.json").read_text())
    assert control["policy"] == "alternate:50" and control["requested_at"] > 0
    state = wait_for(lambda: (lambda s: s if s["applied"] else None)(
        server.client.get(f"/runs/{run['id']}/roles").json()), what="policy applied")
    assert state["policy"] == "alternate:50" and state["history"][-1]["teacher_ratio"] == 0.5
    server.client.post(f"/runs/{run['id']}/stop")
    server.wait_state(run["id"], "stopped")
    assert server.client.put(f"/runs/{run['id']}/roles", json={"policy": "auto"}).status_code == 409
    server.wait_state(plain["id"], "succeeded")
    assert server.client.put(f"/runs/{plain['id']}/roles", json={"policy": "auto"}).status_code == 409


def test_restart_reattaches_live_runs_and_fails_vanished_ones(tmp_path):
    ws = make_workspace(tmp_path)
    a = Server(ws, "--max-concurrent", "3")
    try:
        finished = a.post(run_body("before", steps=2)).json()
        a.wait_state(finished["id"], "succeeded")
        survivor = a.post(run_body("survivor", steps=60)).json()      # ~3 s
        victim = a.post(run_body("victim", steps=400)).json()
        survivor_pid = a.wait_state(survivor["id"], "running")["pid"]
        victim_pid = a.wait_state(victim["id"], "running")["pid"]
    finally:
        a.stop(kill=True)  # the server dies; its runs do not (own sessions)
    os.killpg(victim_pid, signal.SIGKILL)  # ... except this one, while nobody watches
    b = Server(ws, "--max-concurrent", "3")
    try:
        assert b.run(finished["id"])["state"] == "succeeded"  # the registry survived
        gone = b.run(victim["id"])
        assert gone["state"] == "failed" and gone["error"] == VANISHED, gone
        assert b.run(survivor["id"])["pid"] == survivor_pid
        done = b.wait_state(survivor["id"], "succeeded", "failed", timeout=20)
        assert done["state"] == "succeeded", done  # re-attached, concluded from progress.json
    finally:
        b.stop()


def test_second_server_on_the_same_registry_refuses(tmp_path):
    ws = make_workspace(tmp_path)
    a = Server(ws)
    try:
        p = subprocess.run([sys.executable, "-m", "services.server", "--port", str(free_port()),
                            "--registry", "runs/registry.sqlite"], cwd=ws, env={**os.environ, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and "in use by another" in p.stderr
    finally:
        a.stop()


def test_non_loopback_bind_without_token_refuses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LAD_API_TOKEN"}
    env["PYTHONPATH"] = str(REPO)
    p = subprocess.run([sys.executable, "-m", "services.server", "--host", "0.0.0.0", "--port", str(free_port())],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "refusing to listen on 0.0.0.0 without an API token" in p.stderr
    short = tmp_path / "short"
    short.write_text("abc")
    p = subprocess.run([sys.executable, "-m", "services.server", "--token-file", str(short)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "at least 16 characters" in p.stderr


def test_token_protects_mutating_routes_over_http(tmp_path):
    s = Server(make_workspace(tmp_path), env={"LAD_API_TOKEN": TOKEN})
    try:
        r = s.post(run_body("auth-1", steps=2))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert s.post(run_body("auth-1", steps=2), headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = s.post(run_body("auth-1", steps=2), headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 201, r.text
        assert s.client.get("/runs").status_code == 200  # reads stay open
        assert s.client.post(f"/runs/{r.json()['id']}/stop").status_code == 401
    finally:
        s.stop()


# ---- request validation and security (in-process) ----------------------------------------------------------------
def test_unknown_run_is_404(api):
    for method, path in [("get", "/runs/nope"), ("post", "/runs/nope/stop"), ("get", "/runs/nope/metrics"),
                         ("get", "/runs/nope/roles")]:
        r = getattr(api, method)(path)
        assert r.status_code == 404 and r.json()["detail"]["message"] == "no run 'nope'", (path, r.text)
    assert api.put("/runs/nope/roles", json={"policy": "auto"}).status_code == 404
    r = api.get("/no/such/route")
    assert r.status_code == 404 and "message" in r.json()["detail"]


@pytest.mark.parametrize("body,field", [
    (run_body("bad-lr", train={"lr": -1}), "train.lr"),
    (run_body("bad-field", trian={"lr": 0.1}), "trian"),
    (run_body("bad-nested", model={"depth": 19}), "model.depth"),
    (run_body("bad name!"), "name"),
    (run_body("lad-no-teacher", mode="lad"), "teacher.checkpoint"),
])
def test_bad_body_is_422_naming_the_field(api, body, field):
    r = api.post("/runs", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail["field"] == field and field in detail["message"]
    assert any(e["field"] == field for e in detail["errors"])


def test_malformed_json_is_422(api):
    r = api.post("/runs", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["detail"]["message"]


def test_a_missing_body_is_422_saying_so(api):
    for r in (api.post("/runs"), api.put("/runs/r-000000000000/roles")):
        assert r.status_code == 422, r.text
        assert r.json()["detail"]["message"] == "request body required: a JSON object", r.text


def test_big_body_is_413(api):
    big = {"name": "big", "pad": "x" * (MAX_BODY_BYTES + 10)}
    assert api.post("/runs", json=big).status_code == 413

    def chunks():  # no Content-Length: counted while streaming
        for _ in range(20):
            yield b" " * 65536
    r = api.post("/runs", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]["message"]


@pytest.mark.parametrize("override,field", [
    ({"data": {"train": "/etc/passwd", "val": "data/val.json"}}, "data.train"),
    ({"data": {"train": "data/../../outside.json", "val": "data/val.json"}}, "data.train"),
    ({"data": {"train": "data/link/x.json", "val": "data/val.json"}}, "data.train"),  # symlink out of the root
    ({"data": {"train": "data/missing.json", "val": "data/val.json"}}, "data.train"),
    ({"teacher": {"checkpoint": "/tmp/evil.pt"}, "mode": "lad"}, "teacher.checkpoint"),
    ({"model": {"pretrained": "../w.pth"}}, "model.pretrained"),
    ({"colearn": {"checkpoint_b": "/root/b.pt"}, "mode": "colad"}, "colearn.checkpoint_b"),
    ({"output_dir": "/tmp"}, "output_dir"),
    ({"output_dir": "data"}, "output_dir"),  # a run must not write into the datasets
    ({"pipeline": {"ray_address": "ray://elsewhere:10001"}}, "pipeline.ray_address"),
])
def test_paths_must_stay_under_the_roots(api, tmp_path, override, field):
    outside = tmp_path.parent / f"outside-{tmp_path.name}"
    outside.mkdir(exist_ok=True)
    (outside / "x.json").write_text("{}")
    link = Path("data/link")
    if not link.exists():
        link.symlink_to(outside)
    body = run_body("escape", **override)
    r = api.post("/runs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"]["field"] == field


def test_paths_inside_the_roots_are_made_absolute(api):
    Path("runs/teacher/checkpoints").mkdir(parents=True)
    body = run_body("student", mode="lad", teacher={"checkpoint": "runs/teacher/checkpoints/best.pt"},
                    output_dir="runs/students")
    r = api.post("/runs", json=body)
    assert r.status_code == 201, r.text
    cfg = api.get(f"/runs/{r.json()['id']}").json()["config"]
    assert cfg["teacher"]["checkpoint"] == str(Path("runs/teacher/checkpoints/best.pt").resolve())
    assert cfg["output_dir"] == str(Path("runs/students").resolve())
    assert cfg["data"]["train"] == str(Path("data/train.json").resolve())


def test_defaults_name_is_the_run_id_and_names_are_unique(api):
    r = api.post("/runs", json={"data": {"train": "data/train.json", "val": "data/val.json"},
                                "train": {"max_steps": 1}})
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["name"] == run["id"] and run["run_dir"] == str(Path("runs", run["id"]).resolve())
    assert api.post("/runs", json=run_body("twice", steps=1)).status_code == 201
    r = api.post("/runs", json=run_body("twice", steps=1))
    assert r.status_code == 409 and r.json()["detail"]["field"] == "name"


def test_unreachable_ray_keeps_runs_pending(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    settings = Settings(ray_address=f"http://127.0.0.1:{free_port()}", poll_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        run = client.post("/runs", json=run_body("waits", steps=1)).json()
        waiting = wait_for(lambda: (lambda d: d if d["error"] else None)(client.get(f"/runs/{run['id']}").json()),
                           what="a reason")
        assert waiting["state"] == "pending" and "unreachable" in waiting["error"]
        health = client.get("/healthz").json()
        assert health["launcher"] == "ray" and health["ray_reachable"] is False and health["runs"]["pending"] == 1
        assert client.post(f"/runs/{run['id']}/stop").json()["state"] == "stopped"  # pending: no Ray call needed


def test_token_required_in_process(tmp_path, monkeypatch):
    make_workspace(tmp_path)
    monkeypatch.chdir(tmp_path)
    settings = Settings(api_token=TOKEN, run_command=FAKE, max_concurrent=1)
    with TestClient(create_app(settings)) as client:
        assert client.post("/runs", json=run_body("x", steps=1)).status_code == 401
        # an unauthenticated client learns nothing about the body (401 before validation)
        assert client.post("/runs", json={"train": {"lr": -1}}).status_code == 401
        assert client.put("/runs/x/roles", json={"policy": "auto"}).status_code == 401
        ok = client.post("/runs", json=run_body("x", steps=1), headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 201
        assert client.get("/healthz").json()["status"] == "ok"
        assert "/runs" in client.get("/openapi.json").json()["paths"]


# ---- units ----------------------------------------------------------------------------------------------------
def test_security_helpers(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")
    with pytest.raises(SecurityError):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", TOKEN)
    check_bind("127.0.0.1", None)
    assert token_matches(TOKEN, f"Bearer {TOKEN}") and token_matches(TOKEN, f"bearer {TOKEN}")
    assert not token_matches(TOKEN, None) and not token_matches(TOKEN, TOKEN) and not token_matches(TOKEN, "Bearer x")
    assert load_token(None, {}) is None and load_token(None, {"LAD_API_TOKEN": TOKEN}) == TOKEN
    f = tmp_path / "tok"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    assert load_token(str(f), {"LAD_API_TOKEN": "ignored-because-the-file-wins"}) == TOKEN
    with pytest.raises(SecurityError):
        load_token(str(tmp_path / "missing"), {})


def test_conclude_decides_final_states():
    alive_none = Observation(alive=False)
    assert conclude(Observation(False, exit_code=0), {"state": "succeeded"}, False) == ("succeeded", None)
    assert conclude(Observation(False, exit_code=0), {"state": "stopped"}, True) == ("stopped", None)
    assert conclude(Observation(False, exit_code=0), None, True) == ("stopped", None)
    assert conclude(Observation(False, exit_code=1), {"state": "failed", "error": "boom"}, False) == ("failed", "boom")
    assert conclude(Observation(False, exit_code=2), None, False, "error: bad config") == ("failed", "error: bad config")
    assert conclude(Observation(False, exit_code=-9), None, True, killed_after_s=30) == (
        "stopped", "did not stop within 30 s; killed")
    assert conclude(Observation(False, exit_code=-9), None, False)[0] == "failed"
    assert conclude(alive_none, {"state": "running"}, False, gone_reason=VANISHED) == ("failed", VANISHED)
    assert conclude(alive_none, {"state": "succeeded"}, False, gone_reason=VANISHED) == ("succeeded", None)
    assert conclude(Observation(False, outcome="failed", message="Traceback..."), {"error": "OOM"}, False) == (
        "failed", "OOM")
    assert conclude(Observation(False, outcome="succeeded"), {"state": "stopped"}, True) == ("stopped", None)
    assert conclude(Observation(False, outcome="stopped"), None, True) == ("stopped", None)


def test_default_max_concurrent():
    assert default_max_concurrent("local", cpus=1) == 1
    assert default_max_concurrent("local", cpus=16) == 8
    assert default_max_concurrent("ray", cpus=2) == 4


def test_registry_lock_and_persistence(tmp_path):
    path = tmp_path / "reg.sqlite"
    reg = Registry(path)
    with pytest.raises(RegistryError, match="in use by another"):
        Registry(path)
    reg.close()
    Registry(path).close()  # free again once the owner closes (or dies)


def test_ray_pending_is_noted_while_queued_by_ray_and_cleared_once_placed(tmp_path, monkeypatch):
    """Ray holds a job PENDING until a node has its driver's resources: the run says so in `error` meanwhile."""
    from schemas.config import config_from_dict
    from services.launcher import PENDING_NOTE
    from services.scheduler import Scheduler
    status = {"now": "PENDING"}

    class FakeClient:
        def __init__(self, address, headers=None, **kw):
            pass

        def submit_job(self, **kw):
            return kw["submission_id"]

        def get_job_info(self, job_id):
            return type("Info", (), {"status": status["now"], "message": None})()

    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    reg = Registry(tmp_path / "reg.sqlite")
    sched = Scheduler(reg, RayLauncher("http://ray-head:8265", token="x" * 20), max_concurrent=2)
    cfg = config_from_dict({"name": "queued", "output_dir": str(tmp_path / "runs")})
    sched.submit(cfg, "r-1")
    sched.tick()  # launched
    assert reg.get("r-1").state == "running" and reg.get("r-1").error is None
    sched.tick()  # watched: Ray says PENDING
    rec = reg.get("r-1")
    assert rec.state == "running" and rec.error.startswith(PENDING_NOTE)
    status["now"] = "RUNNING"
    sched.tick()
    assert reg.get("r-1").error is None
    status["now"] = "SUCCEEDED"
    sched.tick()
    assert reg.get("r-1").state == "succeeded" and reg.get("r-1").error is None  # Ray's verdict decides
    (tmp_path / "runs" / "link").symlink_to(tmp_path)
    with pytest.raises(Exception, match="symbolic link"):
        sched.submit(config_from_dict({"name": "link", "output_dir": str(tmp_path / "runs")}), "r-2")
    reg.close()


def test_local_launcher_exports_threads_and_project_path():
    launcher = LocalLauncher(command=FAKE, threads_per_run=3)

    class Rec:
        id = "r-x"
    env = launcher._env(Rec())
    assert str(REPO) in env["PYTHONPATH"].split(os.pathsep) and env["LAD_RUN_ID"] == "r-x"
    assert env["OMP_NUM_THREADS"] == (os.environ.get("OMP_NUM_THREADS") or "3")


def test_ray_launcher_passes_the_token_explicitly(monkeypatch):
    seen = {}

    class FakeClient:
        def __init__(self, address, headers=None, **kw):
            seen.update(address=address, headers=headers)

        def submit_job(self, **kw):
            seen["submit"] = kw
            return kw["submission_id"]

    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", FakeClient)
    launcher = RayLauncher("http://ray-head:8265", token="ray-secret")

    class Rec:
        id, name, config_path = "r-1", "n", "/runs/n/config.yaml"
        config = {"pipeline": {"engine": "local"}, "train": {"threads": 3, "device": "cuda:1"}}
    ids = launcher.start(Rec())
    assert seen["headers"] == {"Authorization": "Bearer ray-secret"}
    assert seen["submit"]["entrypoint"] == "python -m pipeline.run --quiet /runs/n/config.yaml"
    assert seen["submit"]["submission_id"] == "r-1" and ids["ray_job_id"] == "r-1"
    assert seen["submit"]["entrypoint_num_cpus"] == 3.0 and seen["submit"]["entrypoint_num_gpus"] == 1.0


@pytest.mark.parametrize("config,wants", [
    ({"pipeline": {"engine": "ray"}, "train": {"threads": 4, "device": "cuda"}}, {}),  # the driver coordinates
    ({"pipeline": {"engine": "local"}, "train": {"device": "auto"}}, {"entrypoint_num_cpus": 1.0}),
    ({"train": {"threads": 2, "device": "cpu"}}, {"entrypoint_num_cpus": 2.0}),
    ({"train": {"device": "cuda:0"}}, {"entrypoint_num_cpus": 1.0, "entrypoint_num_gpus": 1.0}),
])
def test_driver_resources_place_in_process_runs_on_workers(config, wants):
    assert driver_resources(config) == wants


# ---- end to end with the real entrypoint ----------------------------------------------------------------------
def _require_pipeline_run() -> None:
    """Skip (with the reason) until the entrypoint and everything it imports exist."""
    try:
        if importlib.util.find_spec("pipeline.run") is None:
            pytest.skip("pipeline.run (the run entrypoint) is not written yet")
        importlib.import_module("pipeline.run")
        importlib.import_module("pipeline.digits")
    except ImportError as e:
        pytest.skip(f"pipeline.run is not importable yet: {e}")


def _lad_serve(ws: Path, port: int, log) -> subprocess.Popen:
    """`lad serve` (the installed console script; `python -m services.cli serve` where it is not on PATH)."""
    lad = shutil.which("lad")
    cmd = [lad] if lad else [sys.executable, "-m", "services.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LAD_API_TOKEN", None)
    return subprocess.Popen(cmd + ["serve", "--port", str(port), "--max-concurrent", "1"], cwd=ws, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _assert_nothing_half_written(run_dir: Path) -> None:
    """Every file of a run directory is whole: no temporary files of atomic writes left, every JSON file and
    every metrics line parses, every checkpoint loads."""
    from trainer.checkpoint import load_checkpoint
    leftovers = [p.name for p in run_dir.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.startswith("."))
                 and p != run_dir / ".lock"]   # the driver's lock (schemas.rundir) is part of the directory
    assert not leftovers, leftovers
    for path in run_dir.rglob("*.json"):
        json.loads(path.read_text())
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and all(json.loads(line)["step"] >= 1 for line in text.splitlines())
    for ckpt in (run_dir / "checkpoints").glob("*.pt"):
        assert load_checkpoint(ckpt)["step"] >= 1


@pytest.mark.e2e
def test_e2e_lad_serve_runs_stops_and_restarts(tmp_path):
    """The issue's story with the real entrypoint: `lad serve` on 127.0.0.1; a PAA teacher and then a LAD student
    posted by REST and polled to success (metrics, checkpoints, COCO results); a second LAD run stopped mid-way
    (state stopped, nothing half-written); the server restarted on the same registry finds every run as it was."""
    _require_pipeline_run()
    from pipeline.digits import make_digits

    ws = tmp_path
    make_digits(ws / "data" / "digits", image_size=64, num_train=16, num_val=8, progress=False)
    port = free_port()
    log = open(ws / "server.log", "ab")
    proc = _lad_serve(ws, port, log)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def succeeded(run_id):
        done = wait_run_final(client, run_id, 300)
        stderr = Path(done["run_dir"]) / "logs" / "stderr.log"
        assert done["state"] == "succeeded", (done, stderr.read_text() if stderr.exists() else "")
        return done

    try:
        wait_server_up(proc, client, ws / "server.log", what="lad serve")
        assert client.get("/docs").status_code == 200  # the OpenAPI page
        data = {"train": "data/digits/train.json", "val": "data/digits/val.json", "input_size": 64}
        train = {"max_steps": 3, "batch_size": 4, "device": "cpu", "threads": 1, "log_every": 1}
        r = client.post("/runs", json={"name": "teacher", "mode": "paa", "data": data, "train": train,
                                       "model": {"depth": 34}})
        assert r.status_code == 201, r.text
        teacher = succeeded(r.json()["id"])
        assert any(c["name"] == "last.pt" for c in teacher["checkpoints"])

        lad_body = {"name": "student", "mode": "lad", "data": data, "train": train,
                    "teacher": {"checkpoint": "runs/teacher/checkpoints/last.pt"}}
        r = client.post("/runs", json=lad_body)
        assert r.status_code == 201, r.text
        student_id = r.json()["id"]
        student = succeeded(student_id)
        assert student["mode"] == "lad" and student["progress"]["step"] == 3
        assert {"teacher_ms", "assign_ms", "loss_cls", "num_pos"} <= set(student["latest_metrics"])
        page = client.get(f"/runs/{student_id}/metrics", params={"since": 1}).json()
        assert [m["step"] for m in page["items"]] == [2, 3]
        final = student["eval"][-1]
        assert final["network"] == "a" and len(final["stats"]) == 12 and 0.0 <= final["stats"]["AP50"] <= 1.0
        assert {c["name"] for c in student["checkpoints"]} >= {"last.pt", "best.pt"}

        # a second LAD run stops on request after its current step, with nothing half-written
        stop_body = {**lad_body, "name": "student-stopped",
                     "train": {**train, "max_steps": 100_000, "checkpoint_every": 1, "eval_every": 0}}
        stop_id = client.post("/runs", json=stop_body).json()["id"]
        wait_for(lambda: (client.get(f"/runs/{stop_id}").json().get("progress") or {}).get("step", 0) >= 2,
                 timeout=180, interval=0.5, what="the run to take two steps")
        assert client.post(f"/runs/{stop_id}/stop").status_code == 202
        stopped = wait_run_final(client, stop_id, 120)
        assert stopped["state"] == "stopped" and stopped["error"] is None, stopped
        assert stopped["progress"]["state"] == "stopped"
        assert client.post(f"/runs/{stop_id}/stop").status_code == 409
        _assert_nothing_half_written(Path(stopped["run_dir"]))
        before = {r["id"]: r for r in client.get("/runs").json()["runs"]}

        # restart on the same registry: every run, its state, times and config as before
        proc.terminate()
        proc.wait(timeout=30)
        proc = _lad_serve(ws, port, log)
        wait_server_up(proc, client, ws / "server.log", what="the restarted lad serve")
        after = {r["id"]: r for r in client.get("/runs").json()["runs"]}
        assert after == before and [after[i]["state"] for i in (teacher["id"], student_id, stop_id)] == [
            "succeeded", "succeeded", "stopped"]
        again = client.get(f"/runs/{student_id}").json()
        assert again["config"] == student["config"] and again["eval"] == student["eval"]
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


class RayHead:
    """`ray start --head --block` with token auth on free loopback ports, in its own process group; `kill()` loses
    it the way a crashed machine does, `start()` brings a fresh head up on the same ports."""

    def __init__(self, tmp_path: Path, token_file: Path):
        self.tmp_path, self.token_file = tmp_path, token_file
        self.gcs, self.dash, self.agent, self.client_port = free_port(), free_port(), free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dash}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
                    "RAY_JOB_STOP_WAIT_TIME_S": "30", "PYTHONPATH": str(REPO), "LAD_FAKE_STEP_S": "0.05"}
        self.proc, self.log, self.ray_tmp = None, None, None
        self.start()

    def start(self) -> None:
        self.ray_tmp = tempfile.mkdtemp(prefix="lad-ray-", dir="/tmp")  # unix socket paths must stay < 108 bytes
        self.log = open(self.tmp_path / "ray.log", "ab")
        self.proc = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={self.gcs}", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={self.dash}", f"--dashboard-agent-listen-port={self.agent}",
             f"--ray-client-server-port={self.client_port}", "--num-cpus=1", "--disable-usage-stats",
             f"--temp-dir={self.ray_tmp}"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

        def up():
            assert self.proc.poll() is None, (self.tmp_path / "ray.log").read_text()
            try:  # the job API answers 401 without the token: that it answers at all means it is up
                return httpx.get(f"{self.address}/api/version", timeout=2).status_code == 401
            except httpx.TransportError:
                return False
        wait_for(up, timeout=90, interval=0.5, what="the Ray head")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        subprocess.run(["ray", "stop", "--force"], env=self.env, capture_output=True, timeout=60)  # strays
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # `ray start --block` stops the processes it started on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def _ray_token(tmp_path: Path) -> Path:
    token_file = tmp_path / "ray_token"
    token_file.write_text("ray-" + os.urandom(16).hex())
    token_file.chmod(0o600)
    return token_file


@pytest.mark.e2e
def test_e2e_ray_jobs_with_token_auth(tmp_path):
    """A real single-node Ray cluster with token auth: the server (which has no RAY_AUTH_* in its environment)
    submits, watches and stops runs as Ray jobs, passing the token it was given explicitly."""
    if shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    ws = make_workspace(tmp_path / "ws")
    token_file = _ray_token(tmp_path)
    head = RayHead(tmp_path, token_file)
    dash = head.dash
    server = None
    try:
        server = Server(ws, "--ray-address", f"http://127.0.0.1:{dash}", "--ray-token-file", str(token_file))
        assert server.client.get("/healthz").json()["launcher"] == "ray"
        ok = server.post(run_body("ray-ok", steps=3)).json()
        done = server.wait_state(ok["id"], "succeeded", "failed", timeout=60)
        assert done["state"] == "succeeded" and done["ray_job_id"] == ok["id"], done
        assert server.client.get("/healthz").json()["ray_reachable"] is True
        bad = server.post(run_body("fail-ray", steps=5)).json()
        failed = server.wait_state(bad["id"], "failed", "succeeded", timeout=60)
        assert failed["state"] == "failed" and failed["error"] == "loss is NaN at step 2"
        long = server.post(run_body("ray-stop", steps=2000)).json()
        wait_for(lambda: (server.run(long["id"]).get("progress") or {}).get("step", 0) >= 2, timeout=60,
                 what="the Ray job to take steps")
        assert server.client.post(f"/runs/{long['id']}/stop").status_code == 202
        stopped = server.wait_state(long["id"], "stopped", "failed", "succeeded", timeout=60)
        assert stopped["state"] == "stopped" and stopped["progress"]["state"] == "stopped", stopped
        assert server.client.post(f"/runs/{long['id']}/stop").status_code == 409
        server.stop()
        # a wrong token: runs wait (pending, with the reason) instead of failing
        wrong = tmp_path / "wrong_token"
        wrong.write_text("not-the-cluster-token-0123456789")
        server = Server(ws, "--ray-address", f"http://127.0.0.1:{dash}", "--ray-token-file", str(wrong))
        run = server.post(run_body("ray-wrong-token", steps=1)).json()
        waiting = wait_for(lambda: (lambda d: d if d["error"] else None)(server.run(run["id"])), what="a reason")
        assert waiting["state"] == "pending" and "rejected the token" in waiting["error"], waiting
        assert server.client.get("/healthz").json()["ray_reachable"] is False
    finally:
        if server is not None:
            server.stop()
        head.stop()


@pytest.mark.e2e
def test_e2e_ray_job_runs_survive_a_control_plane_restart_and_a_lost_head_fails_them_clearly(tmp_path):
    """A run that is a Ray job goes on while `lad serve` restarts: the new server re-attaches to it by its job id.
    When the Ray head is then lost (SIGKILL to its process group), the run stays `running` while the head does
    not answer (it may come back) and healthz says Ray is unreachable; once a head answers again and no longer
    knows the job, the run is failed with a reason that says so."""
    if shutil.which("ray") is None:
        pytest.skip("the ray command is not installed")
    ws = make_workspace(tmp_path / "ws")
    token_file = _ray_token(tmp_path)
    head = RayHead(tmp_path, token_file)
    args = ("--ray-address", head.address, "--ray-token-file", str(token_file))
    server = None
    try:
        server = Server(ws, *args)
        run = server.post(run_body("ray-long", steps=100_000)).json()

        def step() -> int:
            return (server.run(run["id"]).get("progress") or {}).get("step", 0)
        wait_for(lambda: step() >= 2, timeout=90, what="the Ray job to take steps")
        server.stop()
        server = Server(ws, *args)    # a restarted control plane
        assert server.run(run["id"])["state"] == "running"
        at = step()
        wait_for(lambda: step() >= at + 5, timeout=60, what="the re-attached run to go on")
        head.kill()
        wait_for(lambda: server.client.get("/healthz").json()["ray_reachable"] is False, timeout=60,
                 what="healthz to see the head gone")
        assert server.run(run["id"])["state"] == "running"
        head.start()                  # a fresh head on the same address: the job is unknown to it
        failed = server.wait_state(run["id"], "failed", "succeeded", "stopped", timeout=120)
        assert failed["state"] == "failed" and "not found" in failed["error"], failed
        assert "was the cluster restarted?" in failed["error"]
    finally:
        if server is not None:
            server.stop()
        head.stop()
        subprocess.run(["pkill", "-f", "ray-long"], capture_output=True)  # the lost head's orphaned entrypoint

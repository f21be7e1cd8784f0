"""REST control of roles on a real co-learning run: `lad serve` (a subprocess) launches `python -m pipeline.run`
with `mode: colad, pipeline.engine: ray` (the coordinator + a Ray Train worker); the test switches the policy
auto -> pin-b -> pin-a mid-run through PUT /runs/{id}/roles and reads it all back from GET /runs/{id}/roles."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import FINAL_STATES as FINAL, free_port, wait_for, wait_run_final, wait_server_up

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent


def _steps(client, run_id) -> list[dict]:
    return client.get(f"/runs/{run_id}/metrics", params={"limit": 10000}).json()["items"]


def _switch(client, run_id: str, policy: str, expect: float, after: int = 3) -> int:
    """PUT the policy; wait until the trainer logged the switch and `after` steps under it; check every one of
    them (from the very next logged step) has the expected teacher ratio. Returns the event's step."""
    r = client.put(f"/runs/{run_id}/roles", json={"policy": policy})
    assert r.status_code == 200, r.text
    assert r.json()["requested"]["policy"] == policy

    def switched():
        items = _steps(client, run_id)
        events = [i for i, m in enumerate(items) if m.get("event") == "policy" and m["policy"] == policy]
        if not events:
            return None
        later = [m for m in items[events[-1] + 1:] if "loss" in m]
        return (items[events[-1]], later) if len(later) >= after else None

    event, later = wait_for(switched, 180, f"{after} steps under {policy}", interval=0.2)
    assert later[0]["step"] == event["step"] + 1, "the change must apply from the next step"
    for m in later:
        assert m["policy"] == policy and m["teacher_ratio"] == expect, m
        assert all(r in (expect, None) for r in m["teacher_ratio_by_level"]), m
        assert all(r in (expect, None) for r in m["teacher_ratio_by_size"].values()), m
    return event["step"]


def test_rest_switches_the_roles_of_a_running_ray_colad_run(tmp_path):
    from pipeline.digits import make_digits

    make_digits(str(tmp_path / "data" / "digits"), image_size=64, num_train=16, num_val=4, progress=False)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("LAD_API_TOKEN", "RAY_ADDRESS")}
    env["PYTHONPATH"] = str(REPO)
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "services.server", "--port", str(port), "--max-concurrent", "1",
                             "--stop-grace", "60"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)
    run_id = None
    try:
        wait_server_up(proc, client, tmp_path / "server.log", timeout=30)
        body = {"name": "colad-rest", "mode": "colad",
                "data": {"train": "data/digits/train.json", "val": "data/digits/val.json", "input_size": 64},
                "model": {"depth": 18, "fpn_levels": [3, 4], "fpn_channels": 16, "head_convs": 1,
                          "head_channels": 16},
                "colearn": {"policy": "auto"},
                "train": {"epochs": 1000, "batch_size": 2, "log_every": 1, "eval_every": 0, "warmup_steps": 0,
                          "checkpoint_every": 100000, "device": "cpu", "threads": 1},
                "pipeline": {"engine": "ray", "num_workers": 1, "cpus_per_worker": 0.5}}
        r = client.post("/runs", json=body)
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
        state = client.get(f"/runs/{run_id}/roles").json()
        assert state["policy"] == "auto" and state["applied"] is True

        def running_steps():
            d = client.get(f"/runs/{run_id}").json()
            assert d["state"] not in FINAL, (d, (Path(d["run_dir"]) / "logs" / "stderr.log").read_text()[-3000:])
            return len([m for m in _steps(client, run_id) if "loss" in m]) >= 2
        wait_for(running_steps, 240, "the Ray colad run to log 2 steps", interval=0.2)
        first = [m for m in _steps(client, run_id) if "loss" in m]
        assert all(m["policy"] == "auto" and 0.0 <= m["teacher_ratio"] <= 1.0 for m in first)

        step_b = _switch(client, run_id, "pin-b", 1.0)
        step_a = _switch(client, run_id, "pin-a", 0.0)

        roles = client.get(f"/runs/{run_id}/roles").json()
        assert roles["policy"] == "pin-a" and roles["applied"] is True
        assert roles["changes"] == [{"from_step": step_b + 1, "policy": "pin-b"},
                                    {"from_step": step_a + 1, "policy": "pin-a"}]
        points = [p for p in roles["history"] if p["teacher_ratio"] is not None]
        assert [p["policy"] for p in points] == sorted([p["policy"] for p in points], key=["auto", "pin-b",
                                                                                             "pin-a"].index)
        assert all(p["teacher_ratio"] == 1.0 for p in points if p["policy"] == "pin-b")
        assert all(p["teacher_ratio_by_level"] is not None for p in points)

        assert client.post(f"/runs/{run_id}/stop").status_code == 202
        done = wait_run_final(client, run_id, 180, "the run to stop")
        assert done["state"] == "stopped", done
        assert client.put(f"/runs/{run_id}/roles", json={"policy": "auto"}).status_code == 409
        assert client.get(f"/runs/{run_id}/roles").json()["policy"] == "pin-a"  # finished runs keep their history
        summary = json.loads((Path(done["run_dir"]) / "colearn.json").read_text())  # the coordinator's own record
        assert [(h["policy"], h["from_step"]) for h in summary["history"]] == \
            [("auto", 1), ("pin-b", step_b + 1), ("pin-a", step_a + 1)]
        assert any(c["name"] == "last.pt" for c in done["checkpoints"])
    finally:  # never leave the run (and its Ray) behind: runs outlive the server by design
        if run_id is not None:
            d = client.get(f"/runs/{run_id}").json()
            if d["state"] not in FINAL:
                client.post(f"/runs/{run_id}/stop")
                try:
                    wait_for(lambda: client.get(f"/runs/{run_id}").json()["state"] in FINAL, 120, "the stop",
                             interval=0.2)
                except AssertionError:
                    if d.get("pid"):
                        try:
                            os.killpg(d["pid"], signal.SIGKILL)
                        except (ProcessLookupError, PermissionError):
                            pass
        client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()

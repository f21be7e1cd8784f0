"""`lad serve`'s own OpenAPI, fuzzed by schemathesis (examples, coverage, fuzzing and the stateful phase that
follows the links from POST /runs into the run's routes), finds nothing: no 5xx, no undocumented status, no
response off its schema, right `Allow` headers. Runs are launched with the test's fake run command, so an
accepted POST costs nothing.

One check is off: `positive_data_acceptance` (a schema-valid body must be accepted). A run config names files,
and the server refuses those that do not exist (422, documented); no schema can say "an existing file"."""
import subprocess
import sys

import pytest

from tests.test_services import TOKEN, Server, make_workspace

pytestmark = pytest.mark.e2e


def test_the_openapi_spec_is_clean_under_a_stateful_fuzzer(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    (ws / "data" / "digits").mkdir()
    for name in ("train.json", "val.json"):   # the config's defaults, so `{}` is a run the server accepts
        (ws / "data" / "digits" / name).write_text("{}")
    server = Server(ws, "--max-concurrent", "2", "--stop-grace", "1", env={"LAD_API_TOKEN": TOKEN}, step_s=0.01)
    try:
        out = subprocess.run(
            [sys.executable, "-c", "import sys; from schemathesis.cli import schemathesis; sys.exit(schemathesis())",
             "run", f"{server.url}/openapi.json", "--max-examples", "60", "--seed", "7",
             "-H", f"Authorization: Bearer {TOKEN}", "--exclude-checks", "positive_data_acceptance",
             "--request-timeout", "10"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path)   # its cache (.schemathesis/) goes there
    finally:  # the fuzzer's runs (max_steps up to 10^5) outlive a stopped server by design: stop them first
        for run in server.client.get("/runs", params={"limit": 1000}).json()["runs"]:
            if run["state"] in ("pending", "running"):
                server.client.post(f"/runs/{run['id']}/stop", headers={"Authorization": f"Bearer {TOKEN}"})
        server.stop()
    report = out.stdout + out.stderr
    assert out.returncode == 0, report[-6000:]
    assert "✅ Stateful" in report and " failed" not in report.split("Test cases:")[-1], report[-3000:]
    runs = list((ws / "runs").iterdir()) if (ws / "runs").exists() else []
    assert len([r for r in runs if r.is_dir()]) >= 1, "the fuzzer never created a run"
    missing = report.split("Missing test data", 1)[1].split("\n\n", 2)[1] if "Missing test data" in report else ""
    assert "GET /runs/{run_id}\n" not in missing + "\n", f"the links did not lead to the run's routes:\n{missing}"

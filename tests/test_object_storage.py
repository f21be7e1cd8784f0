"""Run directories, checkpoints and datasets on object storage, against real servers these tests start on
127.0.0.1: moto's S3 server, reached through the standard `AWS_ENDPOINT_URL` as a user's MinIO or S3 would be,
and a GCS emulator through Google's `STORAGE_EMULATOR_HOST`. Faults come from outside: the training process is
killed by pid."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from schemas.rundir import RunDir
from schemas.storage import Location, filesystem
from tests.helpers import FINAL_STATES, free_port, wait_for
from tests.tiny import make_data, tiny_config
from trainer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.e2e
BUCKET = "lad-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A bucket on a moto S3 server of this module; the AWS variables point every process at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    patch = pytest.MonkeyPatch()
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        patch.setenv(key, value)

    def up():
        try:
            return urllib.request.urlopen(endpoint, timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=30, what="the moto S3 server")
        import pyarrow.fs as pafs

        pafs.S3FileSystem(endpoint_override=endpoint, scheme="http",
                          allow_bucket_creation=True).create_dir(BUCKET)
        filesystem.cache_clear()
        yield f"s3://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        patch.undo()
        filesystem.cache_clear()


def upload(local: Path, where: Location) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (where / path.relative_to(local).as_posix()).write_bytes(path.read_bytes())


def s3_data(tmp_path: Path, s3: str, name: str) -> tuple[Path, str]:
    """The tiny digits dataset made here and copied to s3://.../<name>/."""
    local = make_data(tmp_path / "data")
    upload(local, Location(f"{s3}/{name}"))
    return local, f"{s3}/{name}"


def data_at(data: str) -> list[str]:
    return [f"data.train={data}/train.json", f"data.val={data}/val.json"]


def lad(*args, cwd, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def metrics_steps(run: RunDir) -> list[int]:
    return [m["step"] for m in run.iter_metrics() if "loss" in m]


# ---- the storage layer itself ---------------------------------------------------------------------------------
def test_objects_are_written_whole_listed_and_missing_ones_say_so(s3):
    base = Location(f"{s3}/unit")
    (base / "a.json").write_text('{"x": 1}')
    (base / "sub" / "b.bin").write_bytes(b"\0" * 10)
    assert json.loads((base / "a.json").read_text()) == {"x": 1}
    assert [(loc.name, size) for loc, size, _ in base.files()] == [("a.json", 8)]
    assert base.all_files() == {"a.json", "sub/b.bin"}
    assert (base / "a.json").is_file() and not (base / "none").exists()
    assert (base / "a.json").size_mtime()[0] == 8
    with pytest.raises(FileNotFoundError):
        (base / "none.json").read_bytes()
    assert Location(f"{s3}/nothing-here").is_empty_folder() and not base.is_empty_folder()
    for odd in ("run#1", "run?x=1"):   # legal in a key; a URL parser takes them for a fragment and a query
        (base / odd / "last.pt").write_bytes(odd.encode())
    assert (base / "run#1" / "last.pt").read_bytes() == b"run#1" and {"run#1/last.pt", "run?x=1/last.pt"} <= base.all_files()


def test_a_file_uri_with_a_host_is_refused_and_one_without_keeps_its_whole_path():
    from schemas.storage import StorageError

    with pytest.raises(StorageError, match="names the host 'runs'"):
        Location("file://runs/exp")   # would have been /exp, silently
    assert Location("file:///tmp/a#b").uri == "/tmp/a#b" and Location("file://localhost/tmp/x").uri == "/tmp/x"


def test_the_control_planes_metrics_index_reads_ranges_of_an_object(s3):
    """`services.metrics_index` on S3: the appended bytes and a page's lines by ranged reads, the same records as a
    whole read, as the object grows."""
    from services.metrics_index import MetricsIndex

    writer, reader = RunDir(f"{s3}/ix/run"), RunDir(f"{s3}/ix/run")
    index = MetricsIndex(reader)
    for first in (1, 4):
        for step in range(first, first + 3):
            writer.log({"step": step, "loss": 1.0 / step, "policy": "auto", "teacher_ratio": 0.5})
        writer.flush()
        index.refresh()
        assert index.page(None, 100) == reader.metrics_page(None, 100) and index.page(2, 2) == reader.metrics_page(2, 2)
    assert [p.step for p in index.history] == list(range(1, 7))


def test_metrics_on_s3_wait_for_a_flush_and_the_last_line_is_read_from_the_tail(s3):
    writer, reader = RunDir(f"{s3}/rd/run"), RunDir(f"{s3}/rd/run")
    writer.log({"step": 1, "loss": 1.0})
    writer.set_progress("running", 1, 10, 0)   # the first progress is written at once
    assert reader.progress()["step"] == 1 and reader.latest_metrics()["step"] == 1
    writer.log({"step": 2, "loss": 0.5})
    writer.set_progress("running", 2, 10, 0)   # within REMOTE_FLUSH_S: kept back
    assert reader.progress()["step"] == 1 and [m["step"] for m in reader.iter_metrics()] == [1]
    writer.set_progress("stopped", 2, 10, 0)   # a state change is written at once, with the lines before it
    assert reader.progress()["state"] == "stopped" and reader.latest_metrics() == {"step": 2, "loss": 0.5}
    long = {"step": 3, "note": "x" * 70_000}   # a last line longer than the tail chunk
    writer.log(long)
    writer.flush()
    assert reader.latest_metrics() == long
    writer.metrics_path.write_bytes(writer.metrics_path.read_bytes() + b'{"step": 4, "lo')   # a torn last line
    assert reader.latest_metrics() == long and [m["step"] for m in reader.iter_metrics()] == [1, 2, 3]
    writer.rewind(1)
    assert [m["step"] for m in reader.iter_metrics()] == [1]


def test_a_checkpoint_on_s3_loads_back_and_a_cut_one_is_refused_in_one_line(s3, tmp_path):
    cfg = tiny_config(make_data(tmp_path / "data"), f"{s3}/ck", mode="paa")
    from trainer.engine import Engine

    where = Location(f"{s3}/ck/last.pt")
    save_checkpoint(where, {"config": cfg.to_dict(), **Engine(cfg, "cpu", 1).state(), "step": 3})
    assert load_checkpoint(where)["step"] == 3
    cut = Location(f"{s3}/ck/cut.pt")
    cut.write_bytes(where.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"s3://lad-test/ck/cut.pt: unreadable or truncated"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="s3://lad-test/ck/none.pt: checkpoint not found"):
        load_checkpoint(f"{s3}/ck/none.pt")


# ---- refusals -------------------------------------------------------------------------------------------------
def test_an_unsupported_scheme_is_one_line_and_no_folder_named_after_it(tmp_path):
    cfg = tiny_config(make_data(tmp_path / "data"), tmp_path / "runs", mode="paa")
    config = tmp_path / "paa.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = lad("train", str(config), "--quiet", "--set", "output_dir=ftp://host/runs", cwd=tmp_path)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "field 'output_dir'" in lines[0] and "unsupported storage scheme 'ftp://'" in lines[0], lines
    assert not (tmp_path / "ftp:").exists() and not list(tmp_path.glob("ftp*"))


def test_a_missing_image_on_s3_is_one_line_naming_it_before_any_ray_process(s3, tmp_path):
    local, data = s3_data(tmp_path, s3, "holes")
    gone = json.loads((local / "train.json").read_text())["images"][3]["file_name"]
    fs, key = (Location(data) / gone).filesystem_and_key()
    fs.delete_file(key)
    cfg = tiny_config(local, f"{s3}/runs", mode="paa", pipeline={"engine": "ray"}, overrides=data_at(data))
    config = tmp_path / "paa.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    ray_tmp = tmp_path / "ray_tmp"
    ray_tmp.mkdir()
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", str(config), "--quiet"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert f"{data}/train.json" in lines[0] and gone in lines[0] and "not found under image_root" in lines[0]
    assert list(ray_tmp.iterdir()) == []


# ---- a run there ----------------------------------------------------------------------------------------------
def test_a_run_on_s3_reads_its_data_there_is_killed_and_resumes_from_its_last_pt_there(s3, tmp_path):
    """Dataset, run directory and checkpoints on S3. SIGKILL of the training process once a checkpoint is there
    (no handler runs), then the same command: it resumes from that last.pt, and every step is logged once."""
    local, data = s3_data(tmp_path, s3, "digits")
    out_dir = f"{s3}/runs"
    cfg = tiny_config(local, out_dir, mode="paa", overrides=data_at(data),
                      train={"epochs": 12, "checkpoint_every": 2, "eval_every": 4, "log_every": 1})
    config = tmp_path / "paa.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    run = RunDir(cfg.run_dir)
    assert str(run.path) == f"{out_dir}/tiny_paa"
    first = subprocess.Popen([sys.executable, "-m", "services.cli", "train", str(config), "--quiet"],
                             cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def past_a_checkpoint():  # progress.json is small; last.pt of step 4 is whole once step 6 is committing
        return (run.progress() or {}).get("step", 0) >= 6

    try:
        wait_for(past_a_checkpoint, timeout=300, what="step 6 in progress.json on S3", interval=0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    killed_at = load_checkpoint(run.last)["step"]
    assert 4 <= killed_at < 72
    assert json.loads(run.progress_path.read_text())["state"] == "running"  # no handler ran
    again = lad("train", str(config), "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert metrics_steps(run) == list(range(1, 73))   # 12 epochs of 6 steps, each once
    assert run.progress()["state"] == "succeeded" and load_checkpoint(run.last)["step"] == 72
    assert [e["epoch"] for e in run.evals()] == [3, 7, 11]
    assert {c["name"] for c in run.checkpoints()} == {"best.pt", "last.pt"}
    assert yaml.safe_load(run.config_path.read_text())["output_dir"] == out_dir
    events = [loc.name for loc, _, _ in (run.path / "tensorboard").files()]
    assert len(events) >= 2 and all(n.startswith("events.out.tfevents.") for n in events)  # one per process
    assert not list(tmp_path.glob("s3*")), "a local folder named after the scheme"


def test_a_ray_stream_lad_run_writes_to_s3_through_ray_train_workers(s3, tmp_path):
    """The Ray engine: read tasks fetch the images from S3, a Train worker logs and checkpoints there, and Ray
    Train's own storage goes to the same bucket."""
    from tests.tiny import make_teacher

    local, data = s3_data(tmp_path, s3, "digits-ray")
    teacher = f"{s3}/teachers/teacher.pt"
    make_teacher(tiny_config(local, tmp_path / "runs", mode="paa"), tmp_path / "teacher.pt")
    Location(teacher).write_bytes((tmp_path / "teacher.pt").read_bytes())
    cfg = tiny_config(local, f"{s3}/runs-ray", mode="lad", teacher=teacher, pipeline={"engine": "ray"},
                      overrides=data_at(data),
                      train={"max_steps": 3, "checkpoint_every": 2})
    config = tmp_path / "lad.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    out = lad("train", str(config), "--quiet", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = RunDir(cfg.run_dir)
    assert metrics_steps(run) == [1, 2, 3] and run.progress()["state"] == "succeeded"
    assert load_checkpoint(run.last)["step"] == 3
    assert (run.path / ".ray_train").all_files(), "Ray Train's storage is not beside the run"


def test_the_control_plane_starts_and_shows_a_run_whose_directory_is_data_at(s3, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from services.app import Settings, create_app

    local, data = s3_data(tmp_path, s3, "digits-api")
    monkeypatch.chdir(tmp_path)
    settings = Settings(registry_path=str(tmp_path / "registry.sqlite"), runs_root=f"{s3}/api-runs",
                        data_roots=[f"{s3}/digits-api"], max_concurrent=1, poll_interval_s=0.2,
                        run_command=[sys.executable, "-m", "pipeline.run", "--quiet"])
    body = json.loads(json.dumps(tiny_config(local, "x", mode="paa").to_dict()))
    body.pop("output_dir")
    body.update(name="on-s3", data={**body["data"], "train": f"{data}/train.json", "val": f"{data}/val.json"})
    body["train"].update(max_steps=4, eval_every=1)
    with TestClient(create_app(settings)) as client:
        bad = client.post("/runs", json={**body, "output_dir": "ftp://elsewhere/runs"})
        assert bad.status_code == 422 and "output_dir" in bad.text
        outside = client.post("/runs", json={**body, "output_dir": f"{s3}/not-the-runs-root"})
        assert outside.status_code == 422 and "outside the runs root" in outside.text
        created = client.post("/runs", json=body)
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        deadline = time.monotonic() + 300
        while (state := client.get(f"/runs/{run_id}").json())["state"] not in FINAL_STATES:
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        assert state["state"] == "succeeded", state
        assert state["run_dir"] == f"{s3}/api-runs/on-s3"
        assert state["progress"]["step"] == 4 and state["latest_metrics"]["step"] == 4
        assert {c["name"] for c in state["checkpoints"]} == {"best.pt", "last.pt"}
        assert all(c["size"] > 10_000 for c in state["checkpoints"])
        assert state["eval"] and state["eval"][-1]["stats"]["AP"] >= 0
        page = client.get(f"/runs/{run_id}/metrics").json()
        assert [m["step"] for m in page["items"] if "loss" in m] == [1, 2, 3, 4]
        assert client.get(f"/ui/runs/{run_id}").status_code == 200
    assert Location(f"{s3}/api-runs/on-s3/checkpoints/last.pt").is_file()


# ---- Google Cloud Storage -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A bucket on a GCS emulator (gcp-storage-emulator, from PyPI) of this module, reached through Google's
    `STORAGE_EMULATOR_HOST`."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("gcs") / "gcs.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", "--default-bucket=lad-gcs"],
                            stdout=log, stderr=subprocess.STDOUT)
    patch = pytest.MonkeyPatch()
    patch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")

    def up():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/storage/v1/b", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(up, timeout=30, what="the GCS emulator")
        filesystem.cache_clear()
        yield "gs://lad-gcs"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        patch.undo()
        filesystem.cache_clear()


def test_a_run_on_gcs_reads_its_data_there_and_writes_its_directory_there(gcs, tmp_path):
    local = make_data(tmp_path / "data")
    upload(local, Location(f"{gcs}/digits"))
    assert Location(f"{gcs}/digits").all_files() == {p.relative_to(local).as_posix()
                                                     for p in local.rglob("*") if p.is_file()}
    from pipeline.local import train

    cfg = tiny_config(local, f"{gcs}/runs", mode="paa", overrides=data_at(f"{gcs}/digits"),
                      train={"max_steps": 3, "checkpoint_every": 2})
    train(cfg, progress=False)
    run = RunDir(cfg.run_dir)
    assert metrics_steps(run) == [1, 2, 3] and run.progress()["state"] == "succeeded"
    assert load_checkpoint(f"{gcs}/runs/tiny_paa/checkpoints/last.pt")["step"] == 3
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 5})}), progress=False)
    assert metrics_steps(run) == [1, 2, 3, 4, 5]   # resumed from last.pt on GCS, nothing logged twice

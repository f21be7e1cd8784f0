"""A run on object storage against the same run on the local disk, side by side in one process: the same config,
data and seed, once with the dataset and run directory in a local folder, once both on an S3 server (moto's server
mode, started here on 127.0.0.1; a real store adds its own latency). Reports seconds per run and step, and what
the S3 run asked of the store: requests by kind (from the server's access log) and bytes written, per step.

    python bench/storage.py                              # 60 steps, checkpoint every 20, evaluate every epoch
    python bench/storage.py --steps 120 --checkpoint-every 50 --out bench/results/storage.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.storage import Location, filesystem  # noqa: E402
from tests.helpers import free_port, wait_for  # noqa: E402
from tests.tiny import make_data, tiny_config  # noqa: E402

REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')


def start_s3(log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")

    def up():
        try:
            return urllib.request.urlopen(endpoint, timeout=2).status == 200
        except OSError:
            return False

    wait_for(up, timeout=30, what="moto")
    import pyarrow.fs as pafs

    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", allow_bucket_creation=True).create_dir("bench")
    filesystem.cache_clear()
    return proc, endpoint


def requests_since(log_path: Path, offset: int) -> tuple[collections.Counter, int]:
    text = log_path.read_bytes()
    counts = collections.Counter()
    for method, path in REQUEST.findall(text[offset:].decode(errors="replace")):
        kind = f"{method} {'multipart' if 'upload' in path.lower() else 'object'}"
        counts[kind] += 1
    return counts, len(text)


def train_once(cfg) -> float:
    from pipeline.local import train

    t0 = time.perf_counter()
    train(cfg, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--out", default="bench/results/storage.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lad-storage-"))
    log_path = work / "moto.log"
    proc, endpoint = start_s3(log_path)
    try:
        data = make_data(work / "data")
        upload_bytes = 0
        for path in sorted(data.rglob("*")):
            if path.is_file():
                (Location("s3://bench/data") / path.relative_to(data).as_posix()).write_bytes(path.read_bytes())
                upload_bytes += path.stat().st_size
        common = dict(mode="paa", train={"epochs": 1000, "max_steps": args.steps, "log_every": 1, "eval_every": 1,
                                         "checkpoint_every": args.checkpoint_every})
        local_cfg = tiny_config(data, work / "runs", **common)
        s3_cfg = tiny_config(data, "s3://bench/runs", **common,
                             overrides=["data.train=s3://bench/data/train.json", "data.val=s3://bench/data/val.json"])
        train_once(tiny_config(data, work / "warm", **{**common, "train": {**common["train"], "max_steps": 2}}))
        _, offset = requests_since(log_path, 0)
        seconds = {"local": train_once(local_cfg), "s3": train_once(s3_cfg)}
        counts, _ = requests_since(log_path, offset)
        run = Location("s3://bench/runs") / s3_cfg.name
        written_all = {rel: (run / rel).size_mtime()[0] for rel in run.all_files()}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    result = {
        "command": "python bench/storage.py " + " ".join(sys.argv[1:]),
        "steps": args.steps, "checkpoint_every": args.checkpoint_every, "images": len(json.loads(
            (data / "train.json").read_text())["images"]),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "ms_per_step": {k: round(v / args.steps * 1e3, 1) for k, v in seconds.items()},
        "s3_over_local": round(seconds["s3"] / seconds["local"], 3),
        "s3_requests": dict(sorted(counts.items())), "s3_requests_per_step": round(sum(counts.values()) / args.steps, 2),
        "run_directory_objects_bytes": written_all,
        "dataset_bytes_uploaded": upload_bytes,
        "versions": {"python": platform.python_version(), "pyarrow": __import__("pyarrow").__version__,
                     "moto": __import__("moto").__version__, "torch": __import__("torch").__version__},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
    }
    print(f"{args.steps} steps, checkpoint every {args.checkpoint_every}: local {seconds['local']:.1f} s, "
          f"S3 {seconds['s3']:.1f} s (x{result['s3_over_local']:.2f})")
    print(f"S3 requests: {dict(sorted(counts.items()))} = {result['s3_requests_per_step']} per step")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()

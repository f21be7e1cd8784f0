"""`lad train` for one Ray run with a test's tracer handed over explicitly (tests only; a production run has no
way to turn it on): python tests/run_traced.py CONFIG TRACER_KWARGS_JSON. Prints what `lad train` prints."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.ray_driver import train  # noqa: E402
from pipeline.run import print_summary  # noqa: E402
from schemas.config import load_config  # noqa: E402
from tests.tracing import Tracer  # noqa: E402

if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    print_summary(cfg, train(cfg, progress=True, observers=(Tracer(**json.loads(sys.argv[2])),)))

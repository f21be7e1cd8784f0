"""`lad train` for one Ray run with test instrumentation turned on explicitly (tests only; a production run cannot
turn it on): python tests/run_traced.py CONFIG FAULTS_JSON. Prints what `lad train` prints."""
import json
import sys

from pipeline.ray_driver import train
from pipeline.run import print_summary
from schemas.config import load_config

if __name__ == "__main__":
    cfg = load_config(sys.argv[1])
    print_summary(cfg, train(cfg, progress=False, faults=json.loads(sys.argv[2])))

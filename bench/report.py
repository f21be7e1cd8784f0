"""What every bench does last: write its figures as JSON and say where."""
from __future__ import annotations

import json
from pathlib import Path


def write_results(out: str, doc: dict) -> None:
    """`doc` as indented JSON at `out` (its folder made), and a line saying so."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")

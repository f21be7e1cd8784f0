"""The assignment store: a frozen teacher's hard labels, computed once per (image, view) and reused by later epochs
and later runs (`pipeline.assignment_store: PATH`, LAD on the Ray engine).

With a frozen teacher, an image's assignment depends only on the teacher's weights, the assignment settings, the
anchor layout and the image as augmented: its id, the flip, and the canvas it is padded to (anchor indices count
over the canvas). A 1x recipe flips at one scale, so an image has two views per canvas and a 12-epoch run asks the
teacher the same two questions six times each. The store answers the repeats.

    PATH/manifest.json         what the labels are valid for: schema version, the teacher checkpoint's sha256,
                               the anchor hash, the assignment settings and the teacher's precision
    PATH/parts/*.arrow         Arrow IPC files (one per assigned batch with new views), one row per view: image_id,
                               flip, pad_height, pad_width (the key), height, width, pos_anchor, pos_gt,
                               ignore_anchor, teacher_version

A store made for other labels is refused before any Ray process starts, in one line naming the difference. Each
part is written whole (`schemas.storage`: a rename locally, one upload on object storage), so a run killed while
writing leaves a readable store; what it had not written yet is recomputed. A part that cannot be read (cut by
hand, say) is one warning and its views are recomputed. The store lives on a local disk or on object storage.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
import pyarrow as pa

from schemas.config import RunConfig
from schemas.storage import Location

FORMAT = "lad-assignment-store"
# The stream schema version that last changed what a store holds (the hard labels and the view key). Schemas 5
# and 6 changed soft labels only, which a store never holds, so stores written under 4 stay valid.
LABELS_SCHEMA_VERSION = 4
READERS = 8  # parts fetched at once (one request each on object storage)
SCHEMA = pa.schema([("image_id", pa.int64()), ("flip", pa.bool_()), ("pad_height", pa.int32()),
                    ("pad_width", pa.int32()), ("height", pa.int32()), ("width", pa.int32()),
                    ("pos_anchor", pa.list_(pa.int32())), ("pos_gt", pa.list_(pa.int32())),
                    ("ignore_anchor", pa.list_(pa.int32())), ("teacher_version", pa.int64())])

View = tuple[int, bool, int, int]  # (image_id, flip, pad_height, pad_width)


class StoreMismatch(ValueError):
    """A store made for other labels (another teacher, anchors, settings or schema)."""


@dataclass
class Labels:
    height: int
    width: int
    pos_anchor: np.ndarray
    pos_gt: np.ndarray
    ignore_anchor: np.ndarray
    teacher_version: int


def manifest_for(cfg: RunConfig, anchor_hash: str, teacher_sha256: str) -> dict:
    """What the labels depend on, besides the view."""
    a = cfg.assign
    return {"format": FORMAT, "schema_version": LABELS_SCHEMA_VERSION, "teacher_sha256": teacher_sha256,
            "anchor_hash": anchor_hash,
            "assign": {"topk": a.topk, "iou_thr": a.iou_thr, "gmm": a.gmm, "single_candidate": a.single_candidate},
            "teacher_precision": ("amp" if cfg.train.amp else "fp32") + ("-nhwc" if cfg.train.channels_last else "")}


def _differences(found: dict, wanted: dict) -> list[str]:
    names = {"teacher_sha256": "another teacher (checkpoint sha256)", "anchor_hash": "other anchors",
             "schema_version": "another schema version", "assign": "other assignment settings",
             "teacher_precision": "another teacher precision", "format": "not an assignment store"}
    return [f"{names.get(k, k)}: store {found.get(k)!s:.24}, run {wanted[k]!s:.24}"
            for k in wanted if found.get(k) != wanted[k]]


def open_store(cfg: RunConfig, anchor_hash: str, create: bool = True) -> dict:
    """The driver's check, before any Ray process: refuse a store made for other labels with one line, else
    (`create`) write the manifest of a new store. Returns the manifest the run's actors are given."""
    where = Location(cfg.pipeline.assignment_store)
    wanted = manifest_for(cfg, anchor_hash, hashlib.sha256(Location(cfg.teacher.checkpoint).read_bytes()).hexdigest())
    path = where / "manifest.json"
    try:
        found = json.loads(path.read_bytes())
    except FileNotFoundError:
        if not create:
            return wanted
        if not where.is_empty_folder():
            raise StoreMismatch(f"pipeline.assignment_store {where}: exists, is not empty and has no manifest.json: "
                                "not an assignment store; give another path") from None
        path.write_text(json.dumps(wanted, indent=1))
        return wanted
    except ValueError:
        raise StoreMismatch(f"pipeline.assignment_store {path}: unreadable manifest; delete the store or give "
                            "another path") from None
    diff = _differences(found if isinstance(found, dict) else {}, wanted)
    if diff:
        raise StoreMismatch(f"pipeline.assignment_store {where}: made for other labels, not used ({'; '.join(diff)});"
                            " give this run another store path, or delete that one")
    return wanted


class AssignmentStore:
    """One process's view of the store (an assigner actor's): the views read so far, and the new ones it has not
    written yet."""

    def __init__(self, where: str):
        self.parts = Location(where) / "parts"
        self.index: dict[View, Labels] = {}
        self._read: set[str] = set()
        self._new: list[tuple[View, Labels]] = []
        self.refresh()

    def refresh(self) -> int:
        """Read the parts written since the last look (by any process); returns how many views were added."""
        new = [loc for loc, _, _ in self.parts.files() if loc.name not in self._read and loc.name.endswith(".arrow")]
        if not new:
            return 0
        with ThreadPoolExecutor(max_workers=READERS) as pool:
            tables = list(pool.map(self._read_part, new))
        self._read.update(loc.name for loc in new)
        return sum(self._add(t) for t in tables if t is not None)

    @staticmethod
    def _read_part(loc: Location) -> Optional[pa.Table]:
        try:
            with pa.ipc.open_file(io.BytesIO(loc.read_bytes())) as f:
                table = f.read_all()
            if not table.schema.equals(SCHEMA):
                raise ValueError("columns differ from the store's schema")
            return table
        except FileNotFoundError:
            return None  # compacted away since the listing: its views are in the merged part, read next time
        except (OSError, ValueError, pa.ArrowInvalid) as e:
            print(f"warning: {loc}: unreadable part of the assignment store ({str(e).splitlines()[0][:160]}); "
                  "its views are computed again", file=sys.stderr)
            return None

    def _add(self, table: pa.Table) -> int:
        columns = table.select(SCHEMA.names).to_pydict().values()  # by name: SCHEMA's order
        for image_id, flip, pad_h, pad_w, h, w, pos_anchor, pos_gt, ignore, version in zip(*columns):
            self.index[(image_id, flip, pad_h, pad_w)] = Labels(h, w, np.asarray(pos_anchor, np.int32),
                                                                np.asarray(pos_gt, np.int32),
                                                                np.asarray(ignore, np.int32), version)
        return table.num_rows

    def put(self, view: View, labels: Labels) -> None:
        """Keep a newly computed view; written with the others of its batch by `flush`."""
        if view in self.index:
            return
        self.index[view] = labels
        self._new.append((view, labels))

    def compact(self) -> int:
        """Merge every part read so far into one (written whole first, then the old ones deleted): a store filled
        during training has a part per batch. Returns how many parts were merged."""
        old = sorted(self._read)
        if len(old) < 2:
            return 0
        self._new = list(self.index.items())
        self.flush()
        for name in old:
            (self.parts / name).delete()
        self._read -= set(old)
        return len(old)

    def flush(self) -> None:
        """Write the views `put` since the last flush as one part, whole (the assigner flushes after each batch:
        an actor is stopped without notice when its stream ends, so nothing may wait for a later call)."""
        if not self._new:
            return
        views, labels = zip(*self._new)
        columns = [*zip(*views), *([getattr(x, f.name) for x in labels] for f in fields(Labels))]  # SCHEMA's order
        table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, SCHEMA)], schema=SCHEMA)
        sink = io.BytesIO()
        with pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}.arrow"
        (self.parts / name).write_bytes(sink.getvalue())
        self._read.add(name)
        self._new = []


def epoch_misses(cfg: RunConfig, image_ids: list[int], epochs: list[int]) -> Optional[list[int]]:
    """Per epoch left to train, how many of its views the store lacks, so the teacher must label them (a view that
    two epochs ask for is labelled once, by the first; with a flip in the recipe, the other flip of a miss is
    labelled with it). None for keep-ratio inputs: a view's canvas is known only when its batch is made."""
    if not isinstance(cfg.data.input_size, int):
        return None
    from pipeline.transforms import aug_params_for

    side, twins = cfg.data.input_size, 0 < cfg.data.flip_prob < 1   # a miss's other flip is labelled with it
    known, misses = set(AssignmentStore(cfg.pipeline.assignment_store).index), []
    for e in epochs:
        new = {(int(i), aug_params_for(int(i), e, cfg.seed, cfg.data.flip_prob), side, side) for i in image_ids}
        missing = new - known
        misses.append(len(missing))
        known |= missing | ({(i, not f, h, w) for i, f, h, w in missing} if twins else set())
    return misses


def pool_sizes(assigners: int, misses: Optional[list[int]], images: int) -> tuple[int, int, int]:
    """(min, initial, max) actors of the teacher pool, from the store's misses per epoch left (`epoch_misses`):
    none when the store holds every view left; otherwise one to the configured pool, starting at the first epoch's
    share of misses. Ray Data grows the pool while the teacher keeps every actor busy and lets idle actors go."""
    if misses is None:
        return assigners, assigners, assigners
    if not any(misses):
        return 0, 0, 0
    return 1, min(assigners, max(1, -(-assigners * misses[0] // max(1, images)))), assigners


_OPEN: dict = {}


def stored_labels(where: str) -> AssignmentStore:
    """The store as read once per process (a read task's worker serves many batches)."""
    if where not in _OPEN:
        _OPEN.clear()
        _OPEN[where] = AssignmentStore(where)
    return _OPEN[where]

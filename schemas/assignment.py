"""The assignment stream: one Arrow record batch per training batch, one row per image.

Teacher-assigner actors encode what they decided for each image (sparse positives, ignores, optional soft
labels for KD/SoLAD); student trainer workers decode it. Everything is built from offsets + flat numpy values
(no per-element Python), and decoding returns read-only numpy *views* of the Arrow buffers, so the only copy on
the trainer side is the one into the device tensor (`torch.from_numpy(view).to(device)`; torch warns once that
the view is not writable: the trainer never writes into it, so that warning can be silenced).

A stream is tied to one anchor layout: anchor indices mean nothing under other strides, input size or classes.
The schema metadata carries `lad.schema_version` and `lad.anchor_hash`; because Ray Data may drop schema
metadata, both also travel as (tiny) columns and `decode_*` refuses a batch whose version or hash differ.

Beside the per-image columns, the pipeline adds batch columns (`epoch`, `batch_index`, and the canvas
`pad_height` / `pad_width`): declared here with their types (`BATCH_COLUMNS`), written by `tag_batch`; the
trainer's worker reads them (`batch_canvas` for the canvas).

Soft labels (KD/SoLAD) travel as one picture per image (`trainer.soft_codec` draws and reads it): the teacher's
class probabilities, per class and FPN level, as a grey AVIF mosaic (`soft_image`, plain bytes: this module needs
no image library). The KD box entries travel zstd-compressed (`pack_array` / `unpack_array`) in binary columns:
ascending anchor indices as their deltas, the 8-bit IoU probabilities as they are. They carry no weight: the
student recomputes each one's overlap with its GT boxes from the teacher's deltas it receives.

This module imports numpy and pyarrow only (no torch), as `schemas` must.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 6  # 2: batch columns epoch, batch_index, soft_fill; 3: image_file, canvas pad_height/pad_width;
                    # 4: compact soft labels (soft_base/offset/index/prob, kd_delta), no soft_fill;
                    # 5: soft_prob and kd_iou_prob 8-bit (packed), no kd_weight;
                    # 6: class probabilities as one picture (soft_image) instead of soft_base/offset/index/prob
# Bump when the anchor generator's conventions change (same config, different anchors).
ANCHOR_LAYOUT = "xyxy, one anchor per location, side 8*stride*octave/8, levels finest first, row-major"

META_VERSION = b"lad.schema_version"
META_HASH = b"lad.anchor_hash"
META_ANCHORS = b"lad.num_anchors"
META_CLASSES = b"lad.num_classes"

_I32_MAX = np.iinfo(np.int32).max


class SchemaMismatch(ValueError):
    """A batch this trainer must not consume: other schema version, other anchors, or other columns."""


def anchor_hash(strides: Sequence[int], octave_base_scale: float, input_size: Union[int, Sequence[int]],
                num_classes: int, pad_divisor: int = 32) -> str:
    """Short stable id of everything that gives anchor indices and class ids their meaning: the anchor layout,
    and the rule that gives a batch its canvas (a fixed square, or keep-ratio padded to a multiple of
    `pad_divisor`; the canvas itself travels with each batch in `pad_height` / `pad_width`)."""
    if not strides:
        raise ValueError("anchor_hash: strides must not be empty")
    canon = {
        "layout": ANCHOR_LAYOUT,
        "strides": [int(s) for s in strides],
        "octave_base_scale": float(octave_base_scale),
        "num_classes": int(num_classes),
    }
    if isinstance(input_size, (int, np.integer)):
        canon["input_size"] = int(input_size)
    else:
        canon["keep_ratio"] = [int(v) for v in input_size]
        canon["pad_divisor"] = int(pad_divisor)
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- schema

_HARD_FIELDS = [
    ("image_id", pa.int64()),
    ("image", pa.binary()),          # raw uint8 HWC bytes of the resized image, or null (then image_file)
    ("image_file", pa.binary()),     # the image's encoded file (PNG/JPEG) as stored, decoded and resized (scale,
                                     # flip) where it is used; or null (then image)
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("scale", pa.float32()),
    ("flip", pa.bool_()),
    ("gt_boxes", pa.list_(pa.float32())),    # G*4 flat, xyxy pixels of the augmented image
    ("gt_labels", pa.list_(pa.int32())),
    ("pos_anchor", pa.list_(pa.int32())),
    ("pos_gt", pa.list_(pa.int32())),        # index into this row's gt_boxes, one per pos_anchor
    ("ignore_anchor", pa.list_(pa.int32())),
    ("teacher_version", pa.int64()),
    ("assign_ms", pa.float32()),
    ("schema_version", pa.int16()),          # copies of the metadata that survive Ray dropping it
    ("anchor_hash", pa.string()),
]
_SOFT_FIELDS = [
    ("soft_image", pa.binary()),             # the teacher's A x C class probabilities as one grey AVIF picture
                                             # (a mosaic of per-class, per-level maps: trainer.soft_codec)
    ("kd_anchor", pa.binary()),              # K int32, ascending (packed): anchors whose teacher box has IoU >
                                             # min_iou with some GT
    ("kd_delta", pa.list_(pa.float16())),    # K*4 flat, the teacher's box deltas there (decoded on the anchors)
    ("kd_iou_prob", pa.binary()),            # K uint8 in PROB_STEP (packed; float16 is read too): its
                                             # IoU-branch probability
]
SOFT_COLUMNS = tuple(name for name, _ in _SOFT_FIELDS)
PROB_STEP = 1 / 255         # kd_iou_prob's unit: uint8 covers [0, 1], rounding error <= 1/510
# binary columns of `pack_array` blobs: name -> (the dtypes allowed, sent as deltas). Probabilities are uint8 in
# PROB_STEP, or float16.
_PACKED = {"kd_anchor": ((np.int32,), True), "kd_iou_prob": ((np.uint8, np.float16), False)}

# Batch columns: the pipeline tags every row with the planned training batch it belongs to and the canvas its
# images are padded to. They describe the batch rather than the image, so they are not fields of
# `AssignmentRow`: `encode_batch` does not write them (`tag_batch` does) and `decode_*` checks their types when
# present.
EPOCH_COLUMN = "epoch"
BATCH_COLUMN = "batch_index"
CANVAS_COLUMNS = ("pad_height", "pad_width")  # the padded batch shape: images are sent unpadded
_BATCH_FIELDS = [
    (EPOCH_COLUMN, pa.int32()),
    (BATCH_COLUMN, pa.int32()),
    (CANVAS_COLUMNS[0], pa.int32()),
    (CANVAS_COLUMNS[1], pa.int32()),
]
BATCH_COLUMNS = tuple(name for name, _ in _BATCH_FIELDS)


def assignment_schema(anchor_hash: str, *, soft: bool, num_anchors: Optional[int] = None,
                      num_classes: Optional[int] = None) -> pa.Schema:
    """The stream's schema; metadata ties it to one schema version and anchor configuration."""
    fields = [pa.field(n, t, nullable=n in ("image", "image_file"))
              for n, t in _HARD_FIELDS + (_SOFT_FIELDS if soft else [])]
    meta = {META_VERSION: str(SCHEMA_VERSION).encode(), META_HASH: anchor_hash.encode()}
    if num_anchors is not None:
        meta[META_ANCHORS] = str(int(num_anchors)).encode()
    if num_classes is not None:
        meta[META_CLASSES] = str(int(num_classes)).encode()
    return pa.schema(fields, metadata=meta)


# ----------------------------------------------------------------------------------------------- rows

@dataclass
class AssignmentRow:
    """One image's assignment. Encode takes these; decode returns them with read-only views as arrays."""
    image_id: int
    height: int
    width: int
    gt_boxes: np.ndarray                 # [G, 4] float32
    gt_labels: np.ndarray                # [G] int32
    pos_anchor: np.ndarray               # [P] int32
    pos_gt: np.ndarray                   # [P] int32
    ignore_anchor: np.ndarray            # [I] int32
    image: Optional[np.ndarray] = None   # [H, W, C] uint8 (resized), or None when image_file is sent
    image_file: Optional[Any] = None     # the encoded file (bytes, or a zero-copy pa.Buffer when decoded)
    scale: float = 1.0
    flip: bool = False
    teacher_version: int = 0
    assign_ms: float = 0.0
    soft_image: Optional[Any] = None           # AVIF bytes (or a zero-copy pa.Buffer when decoded)
    kd_anchor: Optional[np.ndarray] = None     # [K] int32
    kd_delta: Optional[np.ndarray] = None      # [K, 4] float16
    kd_iou_prob: Optional[np.ndarray] = None   # [K] uint8 in PROB_STEP, or float16

    @property
    def has_soft(self) -> bool:
        return self.soft_image is not None


_LIST_COLUMNS = {  # name -> (numpy dtype, values per element)
    "gt_boxes": (np.float32, 4), "gt_labels": (np.int32, 1),
    "pos_anchor": (np.int32, 1), "pos_gt": (np.int32, 1), "ignore_anchor": (np.int32, 1),
    "kd_delta": (np.float16, 4),
}
_SOFT_SAME_LENGTH = [("kd_anchor", "kd_delta", "kd_iou_prob")]
_SAME_LENGTH = [("gt_boxes", "gt_labels"), ("pos_anchor", "pos_gt")] + _SOFT_SAME_LENGTH


def list_array(arrays: list[np.ndarray], dtype, width: int, name: str) -> tuple[pa.Array, np.ndarray]:
    """Offsets + one concatenated values buffer -> list array (the numpy buffers are handed to Arrow)."""
    flat = [np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]
    sizes = np.fromiter((f.size for f in flat), dtype=np.int64, count=len(flat))
    if np.any(sizes % width):
        raise ValueError(f"{name}: expected {width} values per element (got sizes {sizes.tolist()})")
    total = int(sizes.sum())
    if total > _I32_MAX:
        raise ValueError(f"{name}: {total} values in one batch exceed Arrow list offsets (int32); "
                         "use smaller batches")
    values = np.concatenate(flat) if flat else np.empty(0, dtype)
    offsets = np.zeros(len(flat) + 1, np.int32)
    offsets[1:] = np.cumsum(sizes)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)), sizes // width


def _image_array(rows: list[AssignmentRow]) -> pa.Array:
    valid = np.array([r.image is not None for r in rows], dtype=bool)
    for r in rows:
        if r.image is not None:
            img = r.image
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[:2] != (r.height, r.width):
                raise ValueError(f"image {r.image_id}: expected uint8 [{r.height}, {r.width}, C], "
                                 f"got {img.dtype} {list(img.shape)}")
    flat = [np.ascontiguousarray(r.image).reshape(-1) if r.image is not None else np.empty(0, np.uint8)
            for r in rows]
    sizes = np.fromiter((f.size for f in flat), dtype=np.int64, count=len(flat))
    if sizes.sum() > _I32_MAX:
        raise ValueError("images of one batch exceed 2 GiB (Arrow binary offsets are int32)")
    offsets = np.zeros(len(flat) + 1, np.int32)
    offsets[1:] = np.cumsum(sizes)
    data = np.concatenate(flat) if flat else np.empty(0, np.uint8)
    validity = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.binary(), len(rows), [validity, pa.py_buffer(offsets), pa.py_buffer(data)],
                                 null_count=int((~valid).sum()))


def _file_array(rows: list[AssignmentRow]) -> pa.Array:
    for r in rows:
        if r.image is not None and r.image_file is not None:
            raise ValueError(f"image {r.image_id}: send the pixels (image) or the encoded file (image_file), not both")
    return pa.array([None if r.image_file is None else bytes(r.image_file) for r in rows], pa.binary())


def encode_batch(rows: list[AssignmentRow], anchor_hash: str, num_anchors: int, num_classes: int,
                 soft: bool) -> pa.RecordBatch:
    """Rows -> one record batch. `soft` must match the rows: KD modes send soft labels for every image."""
    for r in rows:
        if r.has_soft != soft:
            raise ValueError(f"image {r.image_id}: soft={soft} but the row {'has' if r.has_soft else 'lacks'} "
                             "soft labels (an empty soft label is empty arrays, not None)")
    n = len(rows)
    cols: dict[str, pa.Array] = {}
    cols["image_id"] = pa.array(np.fromiter((r.image_id for r in rows), np.int64, n))
    cols["image"] = _image_array(rows)
    cols["image_file"] = _file_array(rows)
    cols["height"] = pa.array(np.fromiter((r.height for r in rows), np.int32, n))
    cols["width"] = pa.array(np.fromiter((r.width for r in rows), np.int32, n))
    cols["scale"] = pa.array(np.fromiter((r.scale for r in rows), np.float32, n))
    cols["flip"] = pa.array(np.fromiter((r.flip for r in rows), np.bool_, n))
    counts = {}
    for name, (dtype, width) in _LIST_COLUMNS.items():
        if name in SOFT_COLUMNS and not soft:
            continue
        cols[name], counts[name] = list_array([getattr(r, name) for r in rows], dtype, width, name)
    if soft:
        cols["soft_image"] = pa.array([bytes(r.soft_image) for r in rows], pa.binary())
        for name, (dtypes, deltas) in _PACKED.items():
            values = [_packed_values(getattr(r, name), dtypes, f"image {r.image_id}: {name}") for r in rows]
            counts[name] = np.array([v.size for v in values], np.int64)
            cols[name] = pa.array([pack_array(v, deltas) for v in values], pa.binary())
    for group in _SAME_LENGTH:
        present = [g for g in group if g in counts]
        for other in present[1:]:
            bad = np.flatnonzero(counts[other] != counts[present[0]])
            if bad.size:
                i = int(bad[0])
                raise ValueError(f"image {rows[i].image_id}: {present[0]} has {counts[present[0]][i]} elements "
                                 f"but {other} has {counts[other][i]}")
    cols["teacher_version"] = pa.array(np.fromiter((r.teacher_version for r in rows), np.int64, n))
    cols["assign_ms"] = pa.array(np.fromiter((r.assign_ms for r in rows), np.float32, n))
    cols["schema_version"] = pa.array(np.full(n, SCHEMA_VERSION, np.int16))
    cols["anchor_hash"] = pa.array([anchor_hash] * n, pa.string())
    schema = assignment_schema(anchor_hash, soft=soft, num_anchors=num_anchors, num_classes=num_classes)
    return pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)


# ----------------------------------------------------------------------------------------------- batch columns

def tag_batch(table: Union[pa.Table, pa.RecordBatch], epoch: int, batch_index: int,
              canvas: tuple[int, int]) -> pa.Table:
    """Append the epoch / batch_index / pad_height / pad_width columns (schema metadata is kept)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    for name, value in zip((EPOCH_COLUMN, BATCH_COLUMN) + CANVAS_COLUMNS, (epoch, batch_index) + tuple(canvas)):
        table = table.append_column(pa.field(name, pa.int32()), pa.array(np.full(n, value, np.int32)))
    return table


def batch_canvas(table: Union[pa.Table, pa.RecordBatch]) -> tuple[int, int]:
    """(pad_height, pad_width) of the batch: the shape its images are padded to, which fixes its anchors."""
    return tuple(int(table.column(name)[0].as_py()) for name in CANVAS_COLUMNS)


# ----------------------------------------------------------------------------------------------- packed columns

def pack_array(values: np.ndarray, deltas: bool = True) -> bytes:
    """A 1-d array -> its length (uint32, little-endian), its dtype (one byte, numpy's type character) and,
    zstd-compressed, its deltas (`deltas`, integers only) or the values themselves. Deltas wrap around in the
    dtype, so any sequence round-trips; they are small where the values ascend (anchor indices), which is what
    makes them compress."""
    v = np.ascontiguousarray(values).reshape(-1)
    head = np.array([v.size], "<u4").tobytes() + v.dtype.char.encode()
    if not v.size:
        return head
    if deltas:
        with np.errstate(over="ignore"):
            v = np.diff(v, prepend=v.dtype.type(0))
    return head + pa.compress(v.astype(v.dtype.newbyteorder("<"), copy=False).tobytes(), codec="zstd", asbytes=True)


def unpack_array(blob: Union[bytes, pa.Buffer], dtypes: Sequence, deltas: bool = True,
                 name: str = "column") -> np.ndarray:
    """`pack_array`'s inverse, for a blob whose dtype is one of `dtypes`. A blob that is cut, corrupt or of
    another dtype raises ValueError naming `name`."""
    buf = pa.py_buffer(blob) if isinstance(blob, (bytes, bytearray, memoryview)) else blob
    if buf.size < 5:
        raise ValueError(f"{name}: packed blob of {buf.size} bytes has no header")
    head = buf.slice(0, 5).to_pybytes()
    n = int(np.frombuffer(head[:4], "<u4")[0])
    allowed = {np.dtype(d).char: np.dtype(d) for d in dtypes}
    dtype = allowed.get(chr(head[4]))
    if dtype is None:
        raise ValueError(f"{name}: packed values are of type {chr(head[4])!r}, expected one of "
                         f"{', '.join(str(d) for d in allowed.values())}")
    if n == 0:
        return np.zeros(0, dtype)
    try:
        raw = pa.decompress(buf.slice(5), decompressed_size=n * dtype.itemsize, codec="zstd")
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{name}: packed blob does not decompress to {n} values ({e})") from None
    values = np.frombuffer(raw, dtype.newbyteorder("<"), count=n)
    if not deltas:
        return values.astype(dtype, copy=False)
    with np.errstate(over="ignore"):
        return np.cumsum(values, dtype=dtype)


def _packed_values(value, dtypes: Sequence, where: str) -> np.ndarray:
    """A row's array for a packed column, in the column's first dtype unless it already has an allowed one
    (integers are converted; anything else is refused rather than silently truncated)."""
    v = np.asarray(value).reshape(-1)
    allowed = [np.dtype(d) for d in dtypes]
    if v.dtype in allowed:
        return v
    if v.dtype.kind in "iub" and allowed[0].kind in "iu":
        return v.astype(allowed[0])
    raise ValueError(f"{where}: values of type {v.dtype}, expected {' or '.join(str(d) for d in allowed)}")


# ----------------------------------------------------------------------------------------------- decoding

def _base_type(t: pa.DataType) -> pa.DataType:
    """Types as Ray may hand them back (large offsets, dictionary strings) compare equal to ours."""
    if pa.types.is_dictionary(t):
        return _base_type(t.value_type)
    if pa.types.is_large_list(t):
        return pa.list_(_base_type(t.value_type))
    if pa.types.is_large_binary(t):
        return pa.binary()
    if pa.types.is_large_string(t):
        return pa.string()
    return t


def _distinct(column: Union[pa.Array, pa.ChunkedArray]) -> list:
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    return pc.unique(column).to_pylist()


def _check(schema: pa.Schema, columns: dict[str, Any], expected_hash: str) -> bool:
    """Refuse batches from another schema version, anchor configuration or column layout. Returns `soft`."""
    meta = schema.metadata or {}
    versions = set()
    if META_VERSION in meta:
        versions.add(meta[META_VERSION].decode())
    if "schema_version" in columns:
        versions.update(str(v) for v in _distinct(columns["schema_version"]))
    if not versions and "anchor_hash" not in columns and META_HASH not in meta:
        raise SchemaMismatch("not an assignment stream: no lad.schema_version/lad.anchor_hash in the schema "
                             "metadata nor schema_version/anchor_hash columns")
    other = sorted(versions - {str(SCHEMA_VERSION)})
    if other or not versions:
        raise SchemaMismatch(
            f"assignment stream schema version {', '.join(other) or 'missing'} differs from {SCHEMA_VERSION} "
            "expected by this trainer: it was written by a different release of the encoder and its columns "
            "may mean other things; run assigners and trainers from the same code")
    hashes = set()
    if META_HASH in meta:
        hashes.add(meta[META_HASH].decode())
    if "anchor_hash" in columns:
        hashes.update(_distinct(columns["anchor_hash"]))
    if hashes != {expected_hash}:
        got = ", ".join(sorted(map(str, hashes))) or "missing"
        raise SchemaMismatch(
            f"assignment stream anchor hash {got} differs from {expected_hash} expected by this trainer: the "
            "stream was built for other anchors, input size or number of classes (strides, octave_base_scale, "
            "input_size, num_classes), so its anchor indices would point at the wrong anchors")
    soft = "soft_image" in columns
    problems = []
    for name, typ in _HARD_FIELDS + (_SOFT_FIELDS if soft else []):
        if name not in columns:
            problems.append(f"missing column {name!r}")
        elif _base_type(columns[name].type) != typ:
            problems.append(f"column {name!r} is {columns[name].type}, expected {typ}")
    for name, typ in _BATCH_FIELDS:
        if name in columns and _base_type(columns[name].type) != typ:
            problems.append(f"column {name!r} is {columns[name].type}, expected {typ}")
    if problems:
        raise SchemaMismatch(f"assignment stream (schema version {SCHEMA_VERSION}) has unexpected columns: "
                             + "; ".join(problems))
    return soft


def _views(arr: pa.Array, dtype, width: int) -> list[np.ndarray]:
    """Per-row read-only views into one list column's values buffer (no copy)."""
    if pa.types.is_large_list(arr.type) or pa.types.is_list(arr.type):
        values = arr.values.to_numpy(zero_copy_only=True)
        offsets = arr.offsets.to_numpy(zero_copy_only=True)
    else:
        raise SchemaMismatch(f"expected a list column, got {arr.type}")
    if values.dtype != dtype:
        raise SchemaMismatch(f"list values are {values.dtype}, expected {np.dtype(dtype)}")
    out = []
    for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        v = values[a:b]
        out.append(v.reshape(-1, width) if width > 1 else v)
    return out


def _image_views(arr: pa.Array, heights: np.ndarray, widths: np.ndarray) -> list[Optional[np.ndarray]]:
    """Read-only HWC uint8 views of the image bytes (np.frombuffer on the Arrow data buffer)."""
    _, off_buf, data_buf = arr.buffers()[:3]
    off_dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_dtype)[arr.offset: arr.offset + len(arr) + 1] if len(arr) else []
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.empty(0, np.uint8)
    data.flags.writeable = False  # like to_numpy's views: the trainer must not scribble on the stream
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    out: list[Optional[np.ndarray]] = []
    for i in range(len(arr)):
        if not valid[i]:
            out.append(None)
            continue
        a, b = int(offsets[i]), int(offsets[i + 1])
        hw = int(heights[i]) * int(widths[i])
        if hw <= 0 or (b - a) % hw:
            raise ValueError(f"row {i}: {b - a} image bytes do not fit height {heights[i]} x width {widths[i]}")
        out.append(data[a:b].reshape(int(heights[i]), int(widths[i]), (b - a) // hw))
    return out


def _file_views(arr: pa.Array) -> list[Optional[pa.Buffer]]:
    """Zero-copy buffers of the encoded files (None where the row sends pixels)."""
    _, off_buf, data_buf = arr.buffers()[:3]
    off_dtype = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
    offsets = np.frombuffer(off_buf, dtype=off_dtype)[arr.offset: arr.offset + len(arr) + 1] if len(arr) else []
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    data_buf = data_buf if data_buf is not None else pa.py_buffer(b"")
    return [data_buf.slice(int(offsets[i]), int(offsets[i + 1] - offsets[i])) if valid[i] else None
            for i in range(len(arr))]


def _scalars(arr: pa.Array) -> list:
    return arr.to_numpy(zero_copy_only=False).tolist()


def _decode_record_batch(rb: pa.RecordBatch, soft: bool) -> list[AssignmentRow]:
    col = {name: rb.column(name) for name in rb.schema.names}
    n = rb.num_rows
    heights = col["height"].to_numpy(zero_copy_only=False)
    widths = col["width"].to_numpy(zero_copy_only=False)
    fields: dict[str, list] = {
        "image_id": _scalars(col["image_id"]), "height": heights.tolist(), "width": widths.tolist(),
        "scale": _scalars(col["scale"]), "flip": _scalars(col["flip"]),
        "teacher_version": _scalars(col["teacher_version"]), "assign_ms": _scalars(col["assign_ms"]),
        "image": _image_views(col["image"], heights, widths),
        "image_file": _file_views(col["image_file"]),
    }
    for name, (dtype, width) in _LIST_COLUMNS.items():
        if name in SOFT_COLUMNS and not soft:
            continue
        fields[name] = _views(col[name], dtype, width)
    if soft:
        ids = fields["image_id"]
        fields["soft_image"] = _file_views(col["soft_image"])
        for i, picture in enumerate(fields["soft_image"]):
            if picture is None or picture.size == 0:
                raise ValueError(f"image {ids[i]}: soft_image is {'null' if picture is None else 'empty'} (a KD "
                                 "stream sends a picture for every image)")
        for name, (dtypes, deltas) in _PACKED.items():
            fields[name] = [unpack_array(b, dtypes, deltas, f"image {ids[i]}: {name}")
                            for i, b in enumerate(_file_views(col[name]))]
        for first, *others in _SOFT_SAME_LENGTH:
            for other in others:
                for i, (a, b) in enumerate(zip(fields[first], fields[other])):
                    if len(a) != len(b):
                        raise ValueError(f"image {ids[i]}: {first} has {len(a)} elements but {other} has {len(b)}")
    return [AssignmentRow(**{k: v[i] for k, v in fields.items()}) for i in range(n)]


def check_bounds(rows: list[AssignmentRow], num_anchors: Optional[int], num_classes: Optional[int]) -> None:
    """Catch corrupt indices here, not as a CUDA device-side assert deep in the loss."""
    for r in rows:
        for name in ("pos_anchor", "ignore_anchor", "kd_anchor"):
            v = getattr(r, name)
            if v is not None and v.size and (v.min() < 0 or (num_anchors is not None and v.max() >= num_anchors)):
                raise ValueError(f"image {r.image_id}: {name} out of range [0, {num_anchors})")
        if r.pos_gt.size and (r.pos_gt.min() < 0 or r.pos_gt.max() >= len(r.gt_labels)):
            raise ValueError(f"image {r.image_id}: pos_gt out of range [0, {len(r.gt_labels)})")
        labels = r.gt_labels
        if labels.size and (labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes)):
            raise ValueError(f"image {r.image_id}: gt_labels out of range [0, {num_classes})")


def decode_batch(batch: Union[pa.RecordBatch, pa.Table], expected_hash: str) -> list[AssignmentRow]:
    """Validate and decode a batch (or a table of any number of chunks) into rows of zero-copy views.

    Raises SchemaMismatch if the schema version, the anchor hash or the columns differ from this code's.
    """
    columns = {name: batch.column(name) for name in batch.schema.names}
    soft = _check(batch.schema, columns, expected_hash)
    parts = batch.to_batches() if isinstance(batch, pa.Table) else [batch]
    rows = [row for rb in parts for row in _decode_record_batch(rb, soft)]
    meta = batch.schema.metadata or {}
    check_bounds(rows, int(meta[META_ANCHORS]) if META_ANCHORS in meta else None,
                 int(meta[META_CLASSES]) if META_CLASSES in meta else None)
    return rows


def decode_table_rows(table: Union[pa.Table, pa.RecordBatch, dict], expected_hash: str) -> list[AssignmentRow]:
    """The Ray Data form: a pa.Table (`batch_format="pyarrow"`, metadata possibly dropped, several chunks) or
    a dict of numpy arrays (`batch_format="numpy"`; converted through Arrow, which copies once: prefer pyarrow).
    """
    if isinstance(table, dict):
        if "anchor_hash" not in table:
            raise SchemaMismatch("not an assignment stream: the batch has no anchor_hash column")
        soft = "soft_image" in table
        schema = assignment_schema(expected_hash, soft=soft).remove_metadata()
        missing = [f.name for f in schema if f.name not in table]
        if missing:
            raise SchemaMismatch(f"assignment stream has unexpected columns: missing {missing}")
        arrays = [pa.array(list(table[f.name]) if f.type.num_fields or f.type == pa.binary() else table[f.name],
                           type=f.type) for f in schema]
        table = pa.Table.from_arrays(arrays, schema=schema)
    return decode_batch(table, expected_hash)


# ----------------------------------------------------------------------------------------------- sizes

def column_bytes(batch: Union[pa.RecordBatch, pa.Table]) -> dict[str, int]:
    """Bytes per column (values + offsets + validity), for the payload benchmark."""
    return {name: int(batch.column(name).nbytes) for name in batch.schema.names}


def payload_bytes(rows: Union[list[AssignmentRow], pa.RecordBatch, pa.Table]) -> int:
    """Bytes of the assignment itself, i.e. everything but the image columns."""
    if not isinstance(rows, (pa.RecordBatch, pa.Table)):
        soft = bool(rows) and rows[0].has_soft
        rows = encode_batch(list(rows), "0" * 16, 0, 0, soft)
    return sum(v for k, v in column_bytes(rows).items() if k not in ("image", "image_file"))


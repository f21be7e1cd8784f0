"""The assignment stream contract: round trips, refusal of foreign streams, zero-copy decoding, soft labels."""
import dataclasses
import io

import numpy as np
import pyarrow as pa
import pytest

from schemas.assignment import (
    SCHEMA_VERSION, AssignmentRow, SchemaMismatch, anchor_hash, assignment_schema, decode_batch,
    decode_table_rows, encode_batch, pack_array, payload_bytes, unpack_array,
)

A, C = 1344, 10
HASH = anchor_hash([4, 8, 16], 8.0, 128, C)
ARRAYS = ["gt_boxes", "gt_labels", "pos_anchor", "pos_gt", "ignore_anchor", "kd_anchor", "kd_delta", "kd_iou_prob",
          "image"]
SCALARS = ["image_id", "height", "width", "scale", "flip", "teacher_version", "assign_ms"]


def make_row(rng, soft, g=None, p=None, s=None, k=None, with_image=True, image_id=0):
    g = int(rng.integers(0, 6)) if g is None else g
    p = (int(rng.integers(0, 50)) if g else 0) if p is None else p
    s = int(rng.integers(0, 300)) if s is None else s
    k = int(rng.integers(0, 40)) if k is None else k
    h, w = int(rng.integers(1, 40)), int(rng.integers(1, 40))
    row = AssignmentRow(
        image_id=image_id, height=h, width=w,
        gt_boxes=rng.random((g, 4), dtype=np.float32) * 128, gt_labels=rng.integers(0, C, g).astype(np.int32),
        pos_anchor=rng.choice(A, p, replace=False).astype(np.int32),
        pos_gt=rng.integers(0, max(g, 1), p).astype(np.int32),
        ignore_anchor=rng.choice(A, int(rng.integers(0, 5)), replace=False).astype(np.int32),
        image=rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if with_image else None,
        scale=float(np.float32(rng.random())), flip=bool(rng.integers(0, 2)),
        teacher_version=int(rng.integers(0, 1 << 40)), assign_ms=float(np.float32(rng.random() * 10)))
    if soft:
        row.soft_image = rng.integers(0, 256, s + 1, dtype=np.uint8).tobytes()   # opaque to the schema
        row.kd_anchor = rng.choice(A, k, replace=False).astype(np.int32)
        row.kd_delta = rng.normal(0, 1, (k, 4)).astype(np.float16)
        row.kd_iou_prob = rng.integers(0, 256, k).astype(np.uint8)
    return row


def assert_rows_equal(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        for name in SCALARS:
            assert getattr(a, name) == getattr(b, name), name
        for name in ARRAYS:
            x, y = getattr(a, name), getattr(b, name)
            if y is None:
                assert x is None, name
                continue
            assert x.dtype == y.dtype and x.shape == y.shape, (name, x.dtype, y.dtype, x.shape, y.shape)
            np.testing.assert_array_equal(x, y, err_msg=name)
        assert (a.soft_image is None) == (b.soft_image is None)
        if b.soft_image is not None:
            assert bytes(a.soft_image) == bytes(b.soft_image)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_round_trip_random(seed, soft):
    rng = np.random.default_rng(seed)
    rows = [make_row(rng, soft, image_id=i, with_image=bool(rng.integers(0, 4))) for i in range(int(rng.integers(1, 9)))]
    rows.append(make_row(rng, soft, g=0, p=0, s=0, k=0, image_id=99))  # no GT, no positives, empty soft labels
    rows.append(make_row(rng, soft, g=3, p=0, image_id=100))            # GTs but no positives
    assert_rows_equal(decode_batch(encode_batch(rows, HASH, A, C, soft), HASH), rows)


def test_empty_batch_and_single_row():
    rng = np.random.default_rng(0)
    assert decode_batch(encode_batch([], HASH, A, C, True), HASH) == []
    row = make_row(rng, True)
    assert_rows_equal(decode_batch(encode_batch([row], HASH, A, C, True), HASH), [row])


def test_sliced_and_multi_chunk_tables():
    rng = np.random.default_rng(1)
    rows = [make_row(rng, True, image_id=i) for i in range(7)]
    b1, b2 = encode_batch(rows[:3], HASH, A, C, True), encode_batch(rows[3:], HASH, A, C, True)
    assert_rows_equal(decode_batch(b2.slice(1, 2), HASH), rows[4:6])
    table = pa.Table.from_batches([b1, b2])
    assert table.column("pos_anchor").num_chunks == 2
    assert_rows_equal(decode_batch(table, HASH), rows)
    assert_rows_equal(decode_table_rows(table.slice(2, 3), HASH), rows[2:5])


def test_refuses_other_anchor_hash():
    batch = encode_batch([make_row(np.random.default_rng(2), False)], HASH, A, C, False)
    other = anchor_hash([8, 16, 32], 8.0, 256, C)
    with pytest.raises(SchemaMismatch, match="anchor hash") as e:
        decode_batch(batch, other)
    assert HASH in str(e.value) and other in str(e.value) and "other anchors" in str(e.value)


def test_refuses_other_schema_version():
    batch = encode_batch([make_row(np.random.default_rng(3), False)], HASH, A, C, False)
    meta = dict(batch.schema.metadata)
    meta[b"lad.schema_version"] = b"1"
    with pytest.raises(SchemaMismatch, match=f"schema version 1 differs from {SCHEMA_VERSION}"):
        decode_batch(batch.replace_schema_metadata(meta), HASH)
    stripped = pa.Table.from_batches([batch]).replace_schema_metadata(None)
    i = stripped.schema.get_field_index("schema_version")
    v2 = stripped.set_column(i, "schema_version", pa.array([1], pa.int16()))
    with pytest.raises(SchemaMismatch, match="schema version 1"):
        decode_table_rows(v2, HASH)


def test_refuses_missing_or_retyped_columns():
    batch = encode_batch([make_row(np.random.default_rng(4), False)], HASH, A, C, False)
    table = pa.Table.from_batches([batch])
    with pytest.raises(SchemaMismatch, match="missing column 'pos_gt'"):
        decode_batch(table.drop_columns(["pos_gt"]), HASH)
    i = table.schema.get_field_index("pos_anchor")
    retyped = table.set_column(i, "pos_anchor", table.column("pos_anchor").cast(pa.list_(pa.int64())))
    with pytest.raises(SchemaMismatch, match="pos_anchor"):
        decode_batch(retyped, HASH)
    with pytest.raises(SchemaMismatch, match="not an assignment stream"):
        decode_batch(pa.table({"x": [1]}), HASH)


def test_metadata_stripped_still_validated_by_column():
    rng = np.random.default_rng(5)
    rows = [make_row(rng, True, image_id=i) for i in range(4)]
    table = pa.Table.from_batches([encode_batch(rows, HASH, A, C, True)]).replace_schema_metadata(None)
    assert table.schema.metadata is None
    assert_rows_equal(decode_table_rows(table, HASH), rows)
    with pytest.raises(SchemaMismatch, match="anchor hash"):
        decode_table_rows(table, anchor_hash([4, 8, 16], 8.0, 128, 80))
    # Ray may hand columns back dictionary-encoded or with 64-bit offsets.
    i = table.schema.get_field_index("anchor_hash")
    dict_table = table.set_column(i, "anchor_hash", table.column("anchor_hash").dictionary_encode())
    j = table.schema.get_field_index("kd_delta")
    dict_table = dict_table.set_column(j, "kd_delta", table.column("kd_delta").cast(pa.large_list(pa.float16())))
    j = table.schema.get_field_index("soft_image")
    dict_table = dict_table.set_column(j, "soft_image", table.column("soft_image").cast(pa.large_binary()))
    assert_rows_equal(decode_table_rows(dict_table, HASH), rows)
    # A table mixing rows of two streams is refused even without metadata.
    foreign = encode_batch(rows[:1], anchor_hash([4, 8], 8.0, 128, C), A, C, True)
    mixed = pa.concat_tables([table, pa.Table.from_batches([foreign]).replace_schema_metadata(None)])
    with pytest.raises(SchemaMismatch, match="anchor hash"):
        decode_table_rows(mixed, HASH)


def test_ray_numpy_dict_form():
    rng = np.random.default_rng(6)
    rows = [make_row(rng, True, image_id=i, with_image=i != 1) for i in range(3)]
    table = pa.Table.from_batches([encode_batch(rows, HASH, A, C, True)])
    as_numpy = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    assert_rows_equal(decode_table_rows(as_numpy, HASH), rows)


def _buffer_view(arr: pa.Array, index: int) -> np.ndarray:
    return np.frombuffer(arr.buffers()[index], dtype=np.uint8)


def test_decode_is_zero_copy():
    rng = np.random.default_rng(7)
    batch = encode_batch([make_row(rng, True, g=3, p=5, s=20, k=4, image_id=i) for i in range(3)], HASH, A, C, True)
    rows = decode_batch(batch, HASH)
    for name in ["gt_boxes", "pos_anchor", "pos_gt", "kd_delta"]:
        values = _buffer_view(batch.column(name).values, 1)
        for r in rows:
            v = getattr(r, name)
            assert np.shares_memory(v, values), name
            assert not v.flags.writeable and not v.flags.owndata, name
    image_data = _buffer_view(batch.column("image"), 2)
    for r in rows:
        assert np.shares_memory(r.image, image_data) and not r.image.flags.writeable
    pictures = batch.column("soft_image").buffers()[2]
    for r in rows:   # the soft-label pictures are slices of the column's data buffer, handed to the decoder as such
        assert pictures.address <= r.soft_image.address < pictures.address + pictures.size


def test_ipc_stream_round_trip_stays_zero_copy():
    rng = np.random.default_rng(8)
    rows = [make_row(rng, True, image_id=i) for i in range(5)]
    sink = io.BytesIO()
    batch = encode_batch(rows, HASH, A, C, True)
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
        writer.write_batch(batch.slice(2))
    buf = pa.py_buffer(sink.getvalue())
    reader = pa.ipc.open_stream(buf)
    table = reader.read_all()
    assert table.schema.metadata[b"lad.anchor_hash"] == HASH.encode()
    got = decode_batch(table, HASH)
    assert_rows_equal(got, rows + rows[2:])
    whole = np.frombuffer(buf, dtype=np.uint8)
    assert all(np.shares_memory(r.pos_anchor, whole) for r in got if r.pos_anchor.size)
    assert all(np.shares_memory(r.image, whole) for r in got)


def test_packed_integers_round_trip_and_refuse_cut_blobs():
    rng = np.random.default_rng(9)
    offsets = np.array([127, -128, 127, 0, -1, -128, 5], np.int8)            # deltas that wrap around int8
    ascending = np.sort(rng.choice(1 << 30, 5000, replace=False)).astype(np.int32)
    smooth = np.cumsum(rng.integers(-2, 3, 20000)).clip(-128, 127).astype(np.int8)
    probs = rng.integers(0, 256, 3000).astype(np.uint8)
    for values, dtype in [(offsets, np.int8), (ascending, np.int32), (smooth, np.int8), (np.zeros(0, np.int8), np.int8),
                          (probs, np.uint8)]:
        for deltas in (True, False):
            got = unpack_array(pack_array(values, deltas), (dtype,), deltas)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, values)
    halves = rng.random(100).astype(np.float16)
    np.testing.assert_array_equal(unpack_array(pack_array(halves, False), (np.uint8, np.float16), False), halves)
    assert len(pack_array(smooth)) < smooth.size / 2   # neighbours close: the deltas compress
    assert len(pack_array(smooth)) < len(pack_array(smooth, deltas=False))
    blob = pack_array(ascending)
    with pytest.raises(ValueError, match="kd_anchor: packed blob does not decompress"):
        unpack_array(blob[: len(blob) // 2], (np.int32,), name="kd_anchor")
    with pytest.raises(ValueError, match="no header"):
        unpack_array(b"\x01", (np.int8,))
    with pytest.raises(ValueError, match="kd_iou_prob: packed values are of type 'i'"):
        unpack_array(blob, (np.uint8, np.float16), False, "kd_iou_prob")


def test_encode_rejects_inconsistent_rows():
    rng = np.random.default_rng(10)
    row = make_row(rng, True, g=2, p=3)
    row.pos_gt = row.pos_gt[:2]
    with pytest.raises(ValueError, match="pos_anchor has 3 elements but pos_gt has 2"):
        encode_batch([row], HASH, A, C, True)
    with pytest.raises(ValueError, match="lacks soft labels"):
        encode_batch([make_row(rng, False)], HASH, A, C, True)
    bad = make_row(rng, False, g=1, p=1)
    bad.pos_anchor = np.array([A], np.int32)
    with pytest.raises(ValueError, match="pos_anchor out of range"):
        decode_batch(encode_batch([bad], HASH, A, C, False), HASH)
    row = make_row(rng, True, k=4)
    row.kd_iou_prob = row.kd_iou_prob.astype(np.float32)       # neither 8-bit steps nor fp16: refused, not cast
    with pytest.raises(ValueError, match="kd_iou_prob: values of type float32"):
        encode_batch([row], HASH, A, C, True)
    row = make_row(rng, True, k=4)
    row.kd_iou_prob = row.kd_iou_prob[:3]
    with pytest.raises(ValueError, match="kd_anchor has 4 elements but kd_iou_prob has 3"):
        encode_batch([row], HASH, A, C, True)
    for field, value, message in [("kd_anchor", np.array([0, A], np.int32), "kd_anchor out of range"),
                                  ("gt_labels", np.array([0, C], np.int32), r"gt_labels out of range \[0, 10\)"),
                                  ("soft_image", b"", "image 0: soft_image is empty")]:
        row = make_row(rng, True, g=2, k=2)
        setattr(row, field, value)
        with pytest.raises(ValueError, match=message):
            decode_batch(encode_batch([row], HASH, A, C, True), HASH)
    table = pa.Table.from_batches([encode_batch([make_row(rng, True, image_id=4)], HASH, A, C, True)])
    j = table.schema.get_field_index("soft_image")
    table = table.set_column(j, table.schema.field(j), pa.array([None], pa.binary()))
    with pytest.raises(ValueError, match="image 4: soft_image is null"):
        decode_batch(table, HASH)


def test_anchor_hash_and_schema_metadata():
    assert anchor_hash([4, 8, 16], 8, 128, 10) == anchor_hash((4, 8, 16), 8.0, 128, 10) == HASH
    assert len(HASH) == 16 and int(HASH, 16) >= 0
    variants = {anchor_hash([4, 8, 16], 8, 256, 10), anchor_hash([4, 8, 16], 4, 128, 10),
                anchor_hash([4, 8, 16], 8, 128, 80), anchor_hash([8, 16, 32], 8, 128, 10), HASH}
    assert len(variants) == 5
    schema = assignment_schema(HASH, soft=True, num_anchors=A, num_classes=C)
    assert schema.metadata[b"lad.schema_version"] == str(SCHEMA_VERSION).encode()
    assert schema.metadata[b"lad.num_anchors"] == b"1344" and "soft_image" in schema.names
    assert "soft_image" not in assignment_schema(HASH, soft=False).names


def test_payload_bytes_excludes_image():
    rng = np.random.default_rng(11)
    rows = [make_row(rng, True, image_id=i) for i in range(3)]
    batch = encode_batch(rows, HASH, A, C, True)
    assert payload_bytes(rows) == payload_bytes(batch) == (batch.nbytes - batch.column("image").nbytes
                                                          - batch.column("image_file").nbytes)
    no_image = [dataclasses.replace(r, image=None) for r in rows]
    assert payload_bytes(no_image) == payload_bytes(rows)

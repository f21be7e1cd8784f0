"""Atomic writes: a reader sees the old file or the new one, and a failed write changes nothing."""
import json

import pytest

from schemas.files import atomic_write, atomic_write_json, atomic_write_text


def test_replaces_whole_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "progress.json"
    atomic_write_json(path, {"step": 1})
    atomic_write_json(path, {"step": 2})
    assert json.loads(path.read_text()) == {"step": 2}
    assert [p.name for p in path.parent.iterdir()] == ["progress.json"]


def test_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def half_then_fail(f):
        f.write(b"new: ")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]

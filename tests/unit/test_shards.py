"""The shard set: markers with a key and checksums, reuse of good shards, sweep of the rest."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from recoup.orchestrator import shards
from recoup.orchestrator.shards import FILES_KEY, ShardSet

LOG = logging.getLogger("recoup.test_shards")


def _set(root: Path, key: str = "k1", num_shards: int = 3) -> ShardSet:
    return ShardSet(root=root, key=key, num_shards=num_shards,
                    files_of=lambda s: [root / "data" / f"a-{s}.bin", root / "data" / f"b-{s}.bin"],
                    data_dirs=("data",), expect={"layers": 2}, name="test")


def _finish(ss: ShardSet, shard: int) -> None:
    for i, path in enumerate(ss.files_of(shard)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([shard, i]) * 10)
    ss.mark_done(shard, {"shard": shard, "layers": 2})


def test_markers_carry_key_and_checksums_and_good_shards_are_reused(tmp_path: Path) -> None:
    ss = _set(tmp_path)
    for s in range(3):
        _finish(ss, s)
    marker = json.loads(ss.marker_file(1).read_text())
    assert marker["key"] == "k1" and marker["layers"] == 2
    assert marker[FILES_KEY] == shards.file_records(tmp_path, ss.files_of(1))
    assert set(marker[FILES_KEY]) == {"data/a-1.bin", "data/b-1.bin"}
    assert shards.done_shards(tmp_path) == {0, 1, 2}
    assert ss.reusable(LOG) == {0, 1, 2}


def test_damaged_stale_and_unmarked_shards_are_recomputed_and_swept(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ss = _set(tmp_path, num_shards=4)
    for s in range(3):
        _finish(ss, s)
    ss.files_of(0)[1].write_bytes(b"x" * 20)  # same size, other bytes
    ss.files_of(2)[0].write_bytes(b"short")
    (tmp_path / "data" / "a-3.bin").write_bytes(b"a killed writer's file")
    with caplog.at_level(logging.INFO):
        assert ss.reusable(LOG) == {1}
    assert f"recomputing shard 0: {ss.files_of(0)[1]} does not match its sha256" in caplog.text
    assert f"recomputing shard 2: {ss.files_of(2)[0]} has 5 bytes" in caplog.text
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["data/a-1.bin", "data/b-1.bin", "shards/shard-0001.json"]
    other = _set(tmp_path, key="k2")
    with caplog.at_level(logging.INFO):
        assert other.reusable(LOG) == set()
    assert "not reusing shard 1: it was computed for another config" in caplog.text
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_marker_without_checksums_is_not_trusted(tmp_path: Path) -> None:
    ss = _set(tmp_path)
    _finish(ss, 0)
    shards.write_marker(tmp_path, 0, {"key": "k1", "layers": 2})
    marker = shards.read_marker(tmp_path, 0)
    assert marker is not None
    assert "records no checksums" in str(shards.files_problem(tmp_path, 0, marker, ss.files_of(0)))
    assert ss.reusable(LOG) == set()

"""Run-directory primitives: atomic writes, manifests, output verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recoup.orchestrator import store


def _manifest(stage_dir: Path) -> store.Manifest:
    return store.Manifest(
        stage="s", version=1, fingerprint="f" * 64, config={"a": 1}, upstream={"u": "x"},
        outputs=store.describe_outputs(stage_dir), metrics={"m": 2.5},
        started_at=10.0, finished_at=12.5, versions={"python": "3"},
    )


def test_atomic_write_leaves_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "x.json"
    store.atomic_write_json(target, {"b": 2, "a": 1})
    store.atomic_write_json(target, {"a": 3})
    assert json.loads(target.read_text()) == {"a": 3}
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_atomic_path_renames_on_success_and_cleans_up_on_error(tmp_path: Path) -> None:
    target = tmp_path / "t.bin"
    with store.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".t.bin" + store.TMP_MARK)
        tmp.write_bytes(b"new")
        assert not target.exists()
    assert target.read_bytes() == b"new"
    with pytest.raises(RuntimeError, match="boom"), store.atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["t.bin"]


def test_outputs_exclude_control_and_temporary_files(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.bin").write_bytes(b"123")
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "half.bin.tmp-99").write_bytes(b"partial")
    (tmp_path / "dir.tmp-7").mkdir()
    (tmp_path / "dir.tmp-7" / "f").write_text("x")
    (tmp_path / store.RUNNING).write_text("{}")
    outs = store.describe_outputs(tmp_path)
    assert sorted(outs) == ["a.txt", "model/w.bin"]
    assert outs["a.txt"].size == 5
    assert outs["a.txt"].sha256 == store.sha256_file(tmp_path / "a.txt")
    store.remove_temporaries(tmp_path)
    assert not (tmp_path / "half.bin.tmp-99").exists() and not (tmp_path / "dir.tmp-7").exists()
    assert (tmp_path / "a.txt").exists()


def test_manifest_round_trip_and_duration(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    m = _manifest(tmp_path)
    store.write_manifest(tmp_path, m)
    back = store.read_manifest(tmp_path)
    assert back == m
    assert back.duration_s == pytest.approx(2.5)


def test_missing_or_garbled_manifest_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(store.ManifestError, match="does not exist"):
        store.read_manifest(tmp_path)
    (tmp_path / store.MANIFEST).write_text('{"stage": "s", "trunc')
    with pytest.raises(store.ManifestError, match="unreadable"):
        store.read_manifest(tmp_path)


def test_verify_detects_missing_resized_and_corrupted_files(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("hello")
    m = _manifest(tmp_path)
    store.verify_outputs(tmp_path, m, "sha256")
    f.write_text("hellO")  # same size, other bytes
    store.verify_outputs(tmp_path, m, "size")
    with pytest.raises(store.ManifestError, match="a.txt does not match its sha256"):
        store.verify_outputs(tmp_path, m, "sha256")
    f.write_text("hello world")
    with pytest.raises(store.ManifestError, match="has 11 bytes, the manifest says 5"):
        store.verify_outputs(tmp_path, m, "size")
    f.unlink()
    with pytest.raises(store.ManifestError, match="missing"):
        store.verify_outputs(tmp_path, m, "size")


def test_commit_path_replaces_a_folder(tmp_path: Path) -> None:
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("old")
    tmp = store.tmp_path_for(final)
    tmp.mkdir()
    (tmp / "new").write_text("new")
    store.commit_path(tmp, final)
    assert [p.name for p in final.iterdir()] == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]

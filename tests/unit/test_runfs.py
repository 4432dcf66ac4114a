"""RunFS: the run directory's control files on a local path, a file:// URI, or pyarrow.fs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from recoup.orchestrator import runfs, store
from recoup.orchestrator.runfs import ArrowRunFS, LocalRunFS, RunFS


def _manifest() -> store.Manifest:
    now = 1_700_000_000.25
    return store.Manifest(stage="degrade", version=1, fingerprint="ab" * 32,
                          config={"sparsity": 0.5}, upstream={"prepare": "cd" * 32},
                          outputs={"model/w.bin": store.OutputFile(size=3, sha256="0" * 64)},
                          metrics={"linear_sparsity": 0.5}, started_at=now, finished_at=now + 1)


@pytest.fixture(params=["path", "file-uri", "arrow-local", "arrow-mock"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> RunFS:
    root = tmp_path / "run"
    if request.param == "path":
        return runfs.open_run_fs(root)
    if request.param == "file-uri":
        return runfs.open_run_fs(root.as_uri())
    if request.param == "arrow-local":  # the pyarrow code path, on a local disk
        return ArrowRunFS(pafs.LocalFileSystem(), str(root))
    return ArrowRunFS(pafs._MockFileSystem(), "bucket/run")  # in memory, like an object store


def test_manifest_round_trip_and_size_check(fs: RunFS) -> None:
    m = _manifest()
    runfs.write_manifest(fs, "degrade", m)
    assert runfs.read_manifest(fs, "degrade") == m
    with pytest.raises(store.ManifestError, match="missing"):
        runfs.verify_sizes(fs, "degrade", m)
    fs.write_bytes("degrade/model/w.bin", b"abc")
    runfs.verify_sizes(fs, "degrade", m)
    fs.write_bytes("degrade/model/w.bin", b"abcd")
    with pytest.raises(store.ManifestError, match="4 bytes, the manifest says 3"):
        runfs.verify_sizes(fs, "degrade", m)
    fs.write_bytes("degrade/manifest.json", b"{not json")
    with pytest.raises(store.ManifestError, match="unreadable"):
        runfs.read_manifest(fs, "degrade")
    with pytest.raises(store.ManifestError, match="does not exist"):
        runfs.read_manifest(fs, "svd")


def test_writes_replace_whole_files_and_leave_no_temporaries(fs: RunFS) -> None:
    fs.write_bytes(runfs.CONFIG_NAME, b"run: {dir: a}\n")
    fs.write_bytes(runfs.CONFIG_NAME, b"run: {dir: b}\n")
    assert fs.read_bytes(runfs.CONFIG_NAME) == b"run: {dir: b}\n"
    assert fs.list_dir() == [runfs.CONFIG_NAME]  # no .tmp- files left behind
    assert fs.size(runfs.CONFIG_NAME) == 14
    fs.delete(runfs.CONFIG_NAME)
    fs.delete(runfs.CONFIG_NAME)  # absent: no error
    assert not fs.exists(runfs.CONFIG_NAME) and fs.list_dir("nothing") == []
    with pytest.raises(FileNotFoundError):
        fs.read_bytes(runfs.CONFIG_NAME)


def test_lock_is_exclusive_and_released_only_by_its_holder(fs: RunFS) -> None:
    me = {"pid": 1, "host": "a"}
    other = {"pid": 2, "host": "b"}
    assert runfs.take_lock(fs, me) is None
    assert runfs.take_lock(fs, other) == me
    runfs.release_lock(fs, other)  # not the holder: nothing happens
    assert fs.exists(runfs.LOCK_NAME)
    runfs.release_lock(fs, me)
    assert runfs.take_lock(fs, other) is None


def test_paths_stay_inside_the_run_directory(fs: RunFS) -> None:
    with pytest.raises(ValueError, match="inside the run directory"):
        fs.read_bytes("../elsewhere")


def test_local_path_of_paths_and_uris(tmp_path: Path) -> None:
    assert runfs.local_path("/shared/runs/x") == Path("/shared/runs/x")
    assert runfs.local_path("runs/x") == Path("runs/x")
    assert runfs.local_path("file:///shared/runs/a%20b") == Path("/shared/runs/a b")
    assert runfs.local_path("s3://bucket/runs/x") is None
    with pytest.raises(ValueError, match="no host"):
        runfs.local_path("file://otherhost/x")
    assert isinstance(runfs.open_run_fs(tmp_path.as_uri()), LocalRunFS)
    # the store's own manifests are readable through a RunFS: one format, two access paths
    stage = tmp_path / "degrade"
    stage.mkdir()
    store.write_manifest(stage, _manifest())
    assert runfs.read_manifest(runfs.open_run_fs(tmp_path.as_uri()), "degrade") == _manifest()

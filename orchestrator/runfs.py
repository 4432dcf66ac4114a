"""The run directory's control files on any storage: a local/NFS path or a ``pyarrow.fs`` URI.

A run directory is shared by every node of a cluster: the driver writes ``config.yaml``, the
manifests and the lock; stage tasks on other machines read their inputs from it. On one
machine or an NFS mount that is a plain path; on object storage it is a URI such as
``s3://bucket/runs/llama-13b``. :class:`RunFS` is the small interface the *control files*
need (whole-file reads and atomic whole-file writes, an exclusive create for the lock,
listing, deletion), with two implementations:

- :class:`LocalRunFS` for paths and ``file://`` URIs: the same temporary-file + fsync +
  rename writes as :mod:`recoup.orchestrator.store`, and ``O_EXCL`` for the lock;
- :class:`ArrowRunFS` for anything :func:`pyarrow.fs.FileSystem.from_uri` resolves (``s3://``,
  ``gs://``, ``hdfs://``, ...). On object stores (S3, GCS) a single object write is already
  atomic: readers see the old object or the complete new one, never a part. On other
  filesystems the write goes to a temporary name and is moved into place.

Paths given to a RunFS are relative to the run directory, with ``/`` separators
(``"degrade/manifest.json"``), so the code that uses it never builds storage-specific paths.

What this module does *not* do (yet): the stages write their bulk outputs (models,
Parquet shards, checkpoints) with local file APIs under ``run.dir``, so today a run
directory must be a local or mounted path; see the notes in the module's tests and the
cluster docs for what moving them would take.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from recoup.orchestrator import store

LOCK_NAME = ".lock"
CONFIG_NAME = "config.yaml"
#: pyarrow filesystem types whose single-object writes are atomic (no rename needed).
ATOMIC_PUT_TYPES = frozenset({"s3", "gcs"})


class RunFS(Protocol):
    """Whole-file access to one run directory; paths are relative, '/'-separated."""

    #: where the run directory is, for messages (a path or a URI)
    location: str

    def read_bytes(self, rel: str) -> bytes:
        """The file's content; FileNotFoundError naming the location if it is absent."""

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace the file so that readers see the old content or all of the new."""

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create the file with ``data`` unless it exists; True if this call created it."""

    def exists(self, rel: str) -> bool: ...

    def size(self, rel: str) -> int:
        """Bytes of the file; FileNotFoundError if it is absent."""

    def delete(self, rel: str) -> None:
        """Remove the file; nothing happens if it is absent."""

    def list_dir(self, rel: str = "") -> list[str]:
        """Names of the entries directly under ``rel`` (sorted); [] if it is absent."""


def _clean(rel: str) -> str:
    rel = posixpath.normpath(rel.replace("\\", "/")) if rel else ""
    if rel in ("", "."):
        return ""
    if rel.startswith("/") or rel == ".." or rel.startswith("../"):
        raise ValueError(f"{rel!r} is not a path inside the run directory")
    return rel


class LocalRunFS:
    """A run directory on a local or mounted (NFS) filesystem."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def _path(self, rel: str) -> Path:
        rel = _clean(rel)
        return self.root / rel if rel else self.root

    def read_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def write_bytes(self, rel: str, data: bytes) -> None:
        store.atomic_write_bytes(self._path(rel), data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self._path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True

    def exists(self, rel: str) -> bool:
        return self._path(rel).exists()

    def size(self, rel: str) -> int:
        return self._path(rel).stat().st_size

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def list_dir(self, rel: str = "") -> list[str]:
        path = self._path(rel)
        return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


class ArrowRunFS:
    """A run directory on a ``pyarrow.fs.FileSystem`` (object store, HDFS, ...)."""

    def __init__(self, fs: Any, root: str, *, location: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/")
        self.location = location or f"{fs.type_name}:{self.root}"
        self._atomic_put = fs.type_name in ATOMIC_PUT_TYPES

    def _path(self, rel: str) -> str:
        rel = _clean(rel)
        return f"{self.root}/{rel}" if rel else self.root

    def _info(self, rel: str) -> Any:
        import pyarrow.fs as pafs

        info = self.fs.get_file_info(self._path(rel))
        return None if info.type == pafs.FileType.NotFound else info

    def read_bytes(self, rel: str) -> bytes:
        if self._info(rel) is None:
            raise FileNotFoundError(f"{self.location}/{_clean(rel)} does not exist")
        with self.fs.open_input_stream(self._path(rel)) as f:
            return f.read()

    def _put(self, path: str, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(path), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self._path(rel)
        if self._atomic_put:
            self._put(path, data)
            return
        tmp = f"{path}{store.TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            self._put(tmp, data)
            self.fs.move(tmp, path)
        except BaseException:
            if self.fs.get_file_info(tmp).size is not None:
                self.fs.delete_file(tmp)
            raise

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Best effort: pyarrow exposes no conditional put, so two writers racing within
        one round trip can both believe they won; the read-back catches the later one."""
        if self._info(rel) is not None:
            return False
        self.write_bytes(rel, data)
        return self.read_bytes(rel) == data

    def exists(self, rel: str) -> bool:
        return self._info(rel) is not None

    def size(self, rel: str) -> int:
        info = self._info(rel)
        if info is None:
            raise FileNotFoundError(f"{self.location}/{_clean(rel)} does not exist")
        return int(info.size)

    def delete(self, rel: str) -> None:
        if self._info(rel) is not None:
            self.fs.delete_file(self._path(rel))

    def list_dir(self, rel: str = "") -> list[str]:
        import pyarrow.fs as pafs

        if self._info(rel) is None:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), recursive=False))
        return sorted(i.base_name for i in infos)


def local_path(location: str | Path) -> Path | None:
    """The local path of a plain path or ``file://`` URI; None for any other URI."""
    if isinstance(location, Path):
        return location
    parsed = urlparse(location)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{location}: a file:// URI must name a local path (no host)")
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # "C:" is a drive, not a scheme
        return None
    return Path(location)


def open_run_fs(location: str | Path) -> RunFS:
    """The RunFS of a run directory given as a path or a URI pyarrow resolves."""
    path = local_path(location)
    if path is not None:
        return LocalRunFS(path)
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(str(location))
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: one sentence
        raise ValueError(f"run directory {location}: pyarrow cannot open it ({e})") from e
    return ArrowRunFS(fs, root, location=str(location).rstrip("/"))


# --------------------------------------------------------------------------- control files


def manifest_path(stage: str) -> str:
    return f"{stage}/{store.MANIFEST}"


def write_manifest(fs: RunFS, stage: str, manifest: store.Manifest) -> None:
    """Write a stage's manifest (last, atomically: see :mod:`recoup.orchestrator.store`)."""
    text = json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n"
    fs.write_bytes(manifest_path(stage), text.encode())


def read_manifest(fs: RunFS, stage: str) -> store.Manifest:
    """A stage's manifest, or ManifestError saying what is wrong with it."""
    rel = manifest_path(stage)
    try:
        raw = fs.read_bytes(rel)
    except FileNotFoundError:
        raise store.ManifestError(f"{fs.location}/{rel} does not exist") from None
    try:
        return store.Manifest.from_json(json.loads(raw))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise store.ManifestError(
            f"{fs.location}/{rel} is unreadable ({type(e).__name__}: {e})") from e


def verify_sizes(fs: RunFS, stage: str, manifest: store.Manifest) -> None:
    """ManifestError naming the first output that is missing or resized."""
    for rel, expected in manifest.outputs.items():
        path = f"{stage}/{rel}"
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise store.ManifestError(
                f"{fs.location}/{path} is listed in the manifest but missing") from None
        if size != expected.size:
            raise store.ManifestError(
                f"{fs.location}/{path} has {size} bytes, the manifest says {expected.size}")


def take_lock(fs: RunFS, holder: dict[str, Any]) -> dict[str, Any] | None:
    """Create the run's lock file holding ``holder``; None on success, else the holder
    that has it. Deciding whether that holder is still alive is the caller's business
    (:mod:`recoup.orchestrator.lock` does it for local runs)."""
    data = json.dumps(holder).encode()
    if fs.create_exclusive(LOCK_NAME, data):
        return None
    try:
        return json.loads(fs.read_bytes(LOCK_NAME))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def release_lock(fs: RunFS, holder: dict[str, Any]) -> None:
    """Remove the lock file if ``holder`` still holds it."""
    try:
        current = json.loads(fs.read_bytes(LOCK_NAME))
    except (FileNotFoundError, json.JSONDecodeError):
        return
    if current == holder:
        fs.delete(LOCK_NAME)

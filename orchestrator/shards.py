"""A shard set: the unit of work, retry and resume of a sharded stage (collect, synthesize).

A sharded stage cuts its work into numbered shards. Shard ``n`` writes its data files
(through :func:`recoup.orchestrator.store.atomic_path`), then its *marker*
``shards/shard-NNNN.json``; the marker is what makes the shard count. It records:

- ``key``: what the shard's numbers depend on (the stage's settings that change results,
  the device kind, upstream fingerprints; never the worker count), so a marker from
  another config is never mixed in;
- ``files``: each data file's size and sha256 by path relative to the stage folder, so a
  file damaged after its shard finished (a bad disk, a truncating copy) is caught before
  it is reused;
- whatever else the stage wants to keep (counts, timings).

On a (re)run, :meth:`ShardSet.reusable` keeps every shard whose marker carries this run's
key and whose files still match, logs why any other is recomputed, and *sweeps* the shard
folders: files of unmarked shards (a killed writer), of another key, of shards beyond the
count, and damaged ones are deleted, so the finished folder holds this run's shards only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recoup.orchestrator.store import TMP_MARK, atomic_write_json, sha256_file

SHARDS_DIR = "shards"
#: marker key: relative path of each data file -> {"size": bytes, "sha256": hex digest}
FILES_KEY = "files"
KEY = "key"


def marker_file(root: Path, shard: int) -> Path:
    """The marker of ``shard`` in the stage folder ``root``: ``shards/shard-NNNN.json``."""
    return root / SHARDS_DIR / f"shard-{shard:04d}.json"


def done_shards(root: Path) -> set[int]:
    """Shards whose marker exists and parses (their files were all complete)."""
    d = root / SHARDS_DIR
    if not d.is_dir():
        return set()
    out = set()
    for p in d.glob("shard-*.json"):
        if TMP_MARK in p.name:
            continue
        try:
            json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.add(int(p.stem.split("-")[1]))
    return out


def read_marker(root: Path, shard: int) -> dict[str, Any] | None:
    """A shard's marker, or None when it is missing or unreadable."""
    try:
        return dict(json.loads(marker_file(root, shard).read_text()))
    except (OSError, json.JSONDecodeError, TypeError, ValueError):
        return None


def write_marker(root: Path, shard: int, marker: Mapping[str, object]) -> None:
    """Write ``shard``'s marker as given, atomically (:meth:`ShardSet.mark_done` adds the
    key and checksums; a marker written here without them is never reused)."""
    atomic_write_json(marker_file(root, shard), dict(marker))


def file_records(root: Path, files: Iterable[Path]) -> dict[str, dict[str, object]]:
    """Size and sha256 of each file, keyed by its path relative to ``root``."""
    return {path.relative_to(root).as_posix(): {"size": path.stat().st_size,
                                                "sha256": sha256_file(path)}
            for path in files}


def files_problem(root: Path, shard: int, marker: Mapping[str, object],
                  files: Sequence[Path]) -> str | None:
    """Why the files of a marked shard cannot be trusted (naming the file), or None.

    Each file must exist with the size and sha256 its marker recorded. A marker without
    records (written before they existed) cannot vouch for its files, so the shard counts
    as unverifiable rather than silently trusted.
    """
    records = marker.get(FILES_KEY)
    if not isinstance(records, Mapping):
        return f"{marker_file(root, shard)} records no checksums of its files"
    for path in files:
        expected = records.get(path.relative_to(root).as_posix())
        if not isinstance(expected, Mapping):
            return f"{marker_file(root, shard)} records no checksum of {path}"
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected.get("size"):
            return f"{path} has {size} bytes, its shard marker says {expected.get('size')}"
        if sha256_file(path) != expected.get("sha256"):
            return f"{path} does not match its sha256 in the shard marker (corrupted)"
    return None


@dataclass(frozen=True, kw_only=True)
class ShardSet:
    """The shards of one sharded stage run: where they live and which may be reused."""

    #: the stage folder
    root: Path
    #: what a shard's numbers depend on; a marker with another key is stale
    key: str
    num_shards: int
    #: a shard's data files (absolute paths under ``root``), without its marker
    files_of: Callable[[int], Sequence[Path]]
    #: folders (relative to ``root``) holding data files; swept with ``shards/``
    data_dirs: tuple[str, ...] = ()
    #: marker fields that must equal these values for reuse (beyond ``key``)
    expect: Mapping[str, object] = field(default_factory=dict)
    #: the stage's name, for log lines
    name: str = "shards"

    def marker_file(self, shard: int) -> Path:
        return marker_file(self.root, shard)

    def mark_done(self, shard: int, info: Mapping[str, object]) -> dict[str, Any]:
        """Write ``shard``'s marker (atomically) once its files are complete: ``info``
        plus the key and the files' checksums. Returns what was written."""
        marker = {**info, KEY: self.key,
                  FILES_KEY: file_records(self.root, self.files_of(shard))}
        write_marker(self.root, shard, marker)
        return marker

    def stale_reason(self, shard: int, marker: Mapping[str, object] | None) -> str | None:
        """Why a marked shard does not belong to this run (a normal sight after a config
        change), or None when it does."""
        if shard >= self.num_shards:
            return f"it is beyond the {self.num_shards} shards of this run"
        if marker is None:
            return f"{self.marker_file(shard)} is unreadable"
        if marker.get(KEY) != self.key or any(marker.get(k) != v for k, v in self.expect.items()):
            return "it was computed for another config"
        return None

    def reusable(self, log: logging.Logger) -> set[int]:
        """Finished shards of this run whose files still match; every other file in the
        shard folders is deleted (see the module docstring)."""
        keep = set()
        for shard in sorted(done_shards(self.root)):
            marker = read_marker(self.root, shard)
            stale = self.stale_reason(shard, marker)
            if stale is not None:
                log.info("%s: not reusing shard %d: %s", self.name, shard, stale)
                continue
            assert marker is not None
            damage = files_problem(self.root, shard, marker, self.files_of(shard))
            if damage is not None:
                log.warning("%s: recomputing shard %d: %s", self.name, shard, damage)
                continue
            keep.add(shard)
        self.sweep(keep)
        return keep

    def sweep(self, keep: Iterable[int]) -> None:
        """Delete every file in the shard folders that is not a file or marker of ``keep``,
        then the folders left empty."""
        wanted = set()
        for s in keep:
            wanted.add(self.marker_file(s))
            wanted.update(self.files_of(s))
        for sub in dict.fromkeys((SHARDS_DIR, *self.data_dirs)):
            folder = self.root / sub
            if not folder.is_dir():
                continue
            for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
                if p.is_file() and p not in wanted:
                    p.unlink()
                elif p.is_dir() and not any(p.iterdir()):
                    p.rmdir()


__all__ = (
    "FILES_KEY",
    "KEY",
    "SHARDS_DIR",
    "ShardSet",
    "done_shards",
    "file_records",
    "files_problem",
    "marker_file",
    "read_marker",
    "write_marker",
)

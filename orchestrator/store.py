"""The run directory on disk: atomic writes, checksums and stage manifests.

A stage's output folder counts as complete only when its ``manifest.json`` exists and
agrees with the files beside it (sizes always, sha256 when asked). The manifest is
written last, through a temporary file, fsync and rename, so a crash at any instant
leaves either the old complete state or no manifest at all; never a manifest that
points at half-written files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

MANIFEST = "manifest.json"
RUNNING = "running.json"
FAILED = "failed.json"
#: Files in a stage folder that describe the stage rather than being its output.
CONTROL_FILES = frozenset({MANIFEST, RUNNING, FAILED})
#: Temporary files carry this marker in their name; they are never outputs.
TMP_MARK = ".tmp-"
_HASH_CHUNK = 1 << 20

Verify = Literal["size", "sha256"]


class ManifestError(RuntimeError):
    """A manifest is missing, unreadable, or disagrees with the files it describes."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_MARK)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def tmp_path_for(path: Path) -> Path:
    """A sibling temporary name for writers that need a path (e.g. ``save_pretrained``)."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


def commit_path(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder into place, replacing an old one."""
    if final.is_dir() and not final.is_symlink():
        old = final.with_name(f"{final.name}{TMP_MARK}old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        _rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def iter_output_files(stage_dir: Path) -> Iterator[Path]:
    """Every file of a stage folder that is an output: not a control file, not temporary."""
    for p in sorted(stage_dir.rglob("*")):
        rel = p.relative_to(stage_dir)
        if any(TMP_MARK in part for part in rel.parts):
            continue
        if p.is_file() and str(rel) not in CONTROL_FILES:
            yield p


def remove_temporaries(stage_dir: Path) -> None:
    """Delete what a killed writer left behind; such files were never complete."""
    if not stage_dir.exists():
        return
    for p in sorted(stage_dir.rglob(f"*{TMP_MARK}*"), key=lambda q: len(q.parts), reverse=True):
        if p.is_dir():
            _rmtree(p)
        else:
            p.unlink(missing_ok=True)


@dataclass(frozen=True, kw_only=True)
class OutputFile:
    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a finished stage produced, and from what. Written last; read first."""

    stage: str
    version: int
    fingerprint: str
    config: dict[str, Any]
    upstream: dict[str, str]
    outputs: dict[str, OutputFile]
    metrics: dict[str, Any] = field(default_factory=dict)
    started_at: float
    finished_at: float
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.finished_at - self.started_at

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "config": self.config,
            "upstream": self.upstream,
            "outputs": {k: {"size": v.size, "sha256": v.sha256} for k, v in self.outputs.items()},
            "metrics": self.metrics,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "versions": self.versions,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Manifest:
        return cls(
            stage=obj["stage"],
            version=int(obj["version"]),
            fingerprint=obj["fingerprint"],
            config=obj["config"],
            upstream=dict(obj["upstream"]),
            outputs={k: OutputFile(size=v["size"], sha256=v["sha256"])
                     for k, v in obj["outputs"].items()},
            metrics=obj.get("metrics", {}),
            started_at=float(obj["started_at"]),
            finished_at=float(obj["finished_at"]),
            versions=obj.get("versions", {}),
        )


def describe_outputs(stage_dir: Path) -> dict[str, OutputFile]:
    return {
        str(p.relative_to(stage_dir)): OutputFile(size=p.stat().st_size, sha256=sha256_file(p))
        for p in iter_output_files(stage_dir)
    }


def write_manifest(stage_dir: Path, manifest: Manifest) -> None:
    atomic_write_json(stage_dir / MANIFEST, manifest.to_json())


def read_manifest(stage_dir: Path) -> Manifest:
    """The manifest of a stage folder, or ManifestError saying what is wrong with it."""
    path = stage_dir / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path} does not exist")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable ({type(e).__name__}: {e})") from e


def verify_outputs(stage_dir: Path, manifest: Manifest, verify: Verify) -> None:
    """Raise ManifestError naming the first output that is missing, resized or corrupted."""
    for rel, expected in manifest.outputs.items():
        path = stage_dir / rel
        if not path.is_file():
            raise ManifestError(f"{path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != expected.size:
            raise ManifestError(f"{path} has {size} bytes, the manifest says {expected.size}")
        if verify == "sha256" and sha256_file(path) != expected.sha256:
            raise ManifestError(f"{path} does not match its sha256 in the manifest (corrupted)")

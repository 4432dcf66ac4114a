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
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Write a file through a temporary sibling, so readers see the old file or the whole new one.

    Yields a temporary path in ``path``'s folder (``.<name>.tmp-<pid>-<random>``: hidden,
    and marked as temporary so it is never taken for an output), not yet created. The
    caller writes the file there by any means (``open``, ``pyarrow.parquet.write_table``,
    ``torch.save``, ...). On normal exit the file is fsynced, renamed over ``path`` and
    the folder fsynced; on an exception the temporary is removed and ``path`` is left as
    it was.

    The one home of the temp-file / fsync / rename pattern: every writer of a file that a
    crash must not leave half-written goes through here.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # not created here: the writer creates it (with the process's usual permissions)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(6)}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    def from_json(cls, obj: Any) -> Manifest:
        """Parse a manifest, checking the shape of every field (a valid JSON file of the
        wrong shape, e.g. ``"outputs": "x"``, is refused here with what is wrong, not left to
        fail deep inside a reader) and its self-checksum (an edited metric or fingerprint
        does not match, so a hand-edited manifest is never shown as a real result)."""
        if not isinstance(obj, dict):
            raise ValueError(f"a manifest is a JSON object, not {type(obj).__name__}")
        for key, kinds in _MANIFEST_SCHEMA.items():
            if key not in obj:
                raise ValueError(f"field {key!r} is missing")
            if not isinstance(obj[key], kinds) or isinstance(obj[key], bool):
                raise ValueError(f"field {key!r} is a {type(obj[key]).__name__}, not "
                                 f"{' or '.join(k.__name__ for k in kinds)}")
        if CHECKSUM_KEY not in obj:
            raise ValueError("it has no checksum (written by an older recoup, or edited)")
        if obj[CHECKSUM_KEY] != manifest_checksum(obj):
            raise ValueError("its checksum does not match its content (edited or damaged)")
        outputs: dict[str, OutputFile] = {}
        for k, v in obj["outputs"].items():
            if not (isinstance(v, dict) and isinstance(v.get("size"), int)
                    and not isinstance(v.get("size"), bool) and v["size"] >= 0
                    and isinstance(v.get("sha256"), str)):
                raise ValueError(f"output {k!r} is not {{size, sha256}}")
            if Path(k).is_absolute() or ".." in Path(k).parts:
                raise ValueError(f"output {k!r} is not a path inside the stage folder")
            outputs[k] = OutputFile(size=v["size"], sha256=v["sha256"])
        if not all(isinstance(v, str) for v in obj["upstream"].values()):
            raise ValueError("field 'upstream' must map stage names to fingerprints")
        return cls(
            stage=obj["stage"],
            version=obj["version"],
            fingerprint=obj["fingerprint"],
            config=obj["config"],
            upstream=dict(obj["upstream"]),
            outputs=outputs,
            metrics=obj["metrics"],
            started_at=float(obj["started_at"]),
            finished_at=float(obj["finished_at"]),
            versions=obj.get("versions", {}) if isinstance(obj.get("versions"), dict) else {},
        )


#: the key of a manifest's own checksum: sha256 of the rest of it, canonical JSON
CHECKSUM_KEY = "checksum"
_MANIFEST_SCHEMA: dict[str, tuple[type, ...]] = {
    "stage": (str,), "version": (int,), "fingerprint": (str,), "config": (dict,),
    "upstream": (dict,), "outputs": (dict,), "metrics": (dict,),
    "started_at": (int, float), "finished_at": (int, float),
}


def manifest_checksum(obj: dict[str, Any]) -> str:
    """sha256 over a manifest's content without its checksum (sorted keys, no spaces)."""
    body = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     allow_nan=True).encode()).hexdigest()


def describe_outputs(stage_dir: Path) -> dict[str, OutputFile]:
    return {
        str(p.relative_to(stage_dir)): OutputFile(size=p.stat().st_size, sha256=sha256_file(p))
        for p in iter_output_files(stage_dir)
    }


def write_manifest(stage_dir: Path, manifest: Manifest) -> None:
    obj = manifest.to_json()
    # the checksum is of the JSON as it reads back (a float's repr round-trips exactly)
    obj = json.loads(json.dumps(obj))
    obj[CHECKSUM_KEY] = manifest_checksum(obj)
    atomic_write_json(stage_dir / MANIFEST, obj)


def read_manifest(stage_dir: Path) -> Manifest:
    """The manifest of a stage folder, or ManifestError saying what is wrong with it."""
    path = stage_dir / MANIFEST
    if not path.exists():
        raise ManifestError(f"{path} does not exist")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is unreadable (not text)") from None
    try:
        return Manifest.from_json(json.loads(text))
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is unreadable (not JSON: {e})") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ManifestError(f"{path} is not a valid manifest: {e}") from e


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

"""The run directory as recoup's own: the ownership mark, the sweep of a killed run's
temporaries, and the content digests of the data files stages read.

Ownership: recoup deletes and replaces things in a run directory (stage folders, staging
folders, temporaries), so it must never take a user's folder for one. A run directory is
marked when recoup creates it (:data:`MARK`, written before anything else); a folder that
is not empty and carries no mark is refused. Folders made by an older recoup, which had no
mark, are adopted when they are recognisably a run directory: nothing in them but stage
folders holding recoup's control files (``manifest.json``, ``running.json``,
``failed.json``), ``config.yaml``, ``logs/``, ``.cache/`` and recoup's temporaries.
Every run of an older recoup left exactly that; a user folder with one file of its own
fails the test, and refusing real old runs would strand results that cost GPU hours.

Sweep: a SIGKILL while a stage's folder was being replaced leaves ``<stage>.tmp-old-PID``
(the previous outputs) and ``<stage>.tmp-staging`` (the new ones); one during an atomic
write leaves ``.<name>.tmp-PID-RANDOM``. Under the lock no other run is writing, so the
next run finishes or undoes the interrupted replacement and deletes the rest. Only names
of these shapes are touched.

Data digests: a stage's fingerprint includes the sha256 of every data file its config
names (fields :data:`DATA_FIELDS` in its section), so a changed file or a ``run.data_dir``
holding other content re-runs the stages that read it. Hashes are cached by (path, size,
mtime_ns) in :data:`HASH_CACHE`, so an unchanged multi-GB file is not read again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from recoup.orchestrator import store
from recoup.orchestrator.lock import LOCK_NAME
from recoup.orchestrator.shards import SHARDS_DIR

log = logging.getLogger("recoup.rundir")

#: written first into a run directory recoup creates; its presence makes the folder ours
MARK = ".recoup-run"
CONFIG_FILE = "config.yaml"
HASH_CACHE = Path(".cache") / "data-hashes.json"
#: config fields (at any depth of a stage's section) that name a data file, relative to
#: the data dir or absolute
DATA_FIELDS = frozenset({"path", "labels", "wikitext"})
_TEMP = re.compile(re.escape(store.TMP_MARK) + r"(old-\d+|staging|\d+(-[0-9a-f]+)?)$")
STAGING = f"{store.TMP_MARK}staging"


class RunDirError(ValueError):
    """The run directory cannot be used (not recoup's, not a folder)."""


def _looks_like_old_run(run_dir: Path, stages: Iterable[str]) -> bool:
    """Whether an unmarked folder is a run directory of an older recoup: at least one
    stage folder holding recoup's control files, and nothing in it but such stage
    folders, ``config.yaml``, ``logs/``, ``.cache/``, a lock and recoup's temporaries."""
    from recoup.orchestrator.stage import registered_stages

    known = set(stages) | set(registered_stages())
    own = {CONFIG_FILE, "logs", ".cache", LOCK_NAME}
    found = False
    for entry in run_dir.iterdir():
        if entry.name in own or _TEMP.search(entry.name):
            continue
        if entry.name in known and entry.is_dir() and not entry.is_symlink():
            names = {p.name for p in entry.iterdir()}
            if names & store.CONTROL_FILES:
                found = True
                continue
        return False
    return found


def claim(run_dir: Path, stages: Iterable[str]) -> None:
    """Make ``run_dir`` a marked run directory, or refuse it in one sentence.

    Creates it (and the mark) when it does not exist or is empty; accepts it when marked;
    adopts an unmarked run directory of an older recoup; refuses anything else.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} exists and is not a folder")
    if (run_dir / MARK).is_file():
        return
    # a folder holding only a run lock (another run is creating it now) counts as empty
    if run_dir.is_dir() and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        if not _looks_like_old_run(run_dir, stages):
            raise RunDirError(
                f"refusing to use {run_dir} as a run directory: it is not empty and recoup did "
                f"not create it (no {MARK} in it); name a new or empty folder")
        log.info("adopting %s, a run directory of an older recoup (only stage folders "
                 "and recoup's files in it); marking it with %s", run_dir, MARK)
    run_dir.mkdir(parents=True, exist_ok=True)
    store.atomic_write_text(run_dir / MARK, "recoup run directory: recoup may replace and "
                            "delete the stage folders in here\n")


def is_ours(stage_dir: Path) -> bool:
    """A stage folder recoup may replace: absent, empty, holding recoup's control files
    (every stage folder recoup makes gets ``running.json`` first), or a sharded stage's
    shard markers (what a resumable stage keeps across a crash)."""
    if not stage_dir.exists():
        return True
    if not stage_dir.is_dir() or stage_dir.is_symlink():
        return False
    names = {p.name for p in stage_dir.iterdir()}
    return not names or bool(names & (store.CONTROL_FILES | {SHARDS_DIR}))


def sweep(run_dir: Path, stages: Iterable[str]) -> list[Path]:
    """Finish or undo a replacement a kill interrupted, then delete what killed writers
    left; returns what was removed. Call only while holding the run's lock."""
    removed: list[Path] = []
    if not run_dir.is_dir():
        return removed
    for name in stages:
        final = run_dir / name
        olds = sorted(run_dir.glob(f"{name}{store.TMP_MARK}old-*"))
        staging = run_dir / f"{name}{STAGING}"
        if final.exists() or not olds:
            continue
        # killed between "old out" and "new in": the new outputs are complete only if
        # their manifest was written (it is written before the swap)
        if staging.is_dir() and (staging / store.MANIFEST).is_file():
            os.replace(staging, final)
            log.warning("%s: completed the replacement a killed run left half done", name)
        else:
            os.replace(olds[-1], final)
            log.warning("%s: restored the previous outputs a killed run had moved aside", name)
    for p in sorted(run_dir.rglob(f"*{store.TMP_MARK}*"), key=lambda q: len(q.parts),
                    reverse=True):
        if not _TEMP.search(p.name) or not (p.exists() or p.is_symlink()):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        log.warning("removed %d temporaries left by a killed run: %s", len(removed),
                    ", ".join(str(p.relative_to(run_dir)) for p in removed[:5])
                    + (" ..." if len(removed) > 5 else ""))
    return removed


# --------------------------------------------------------------------------- data digests


def data_paths(section: Any) -> list[str]:
    """The data file names a stage's config section mentions (``DATA_FIELDS``), in order."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if k in DATA_FIELDS and isinstance(v, str) and v:
                    out.append(v)
                else:
                    walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)

    walk(section)
    return list(dict.fromkeys(out))


class DataHasher:
    """sha256 of data files, cached by (resolved path, size, mtime_ns)."""

    def __init__(self, cache_file: Path | None):
        self.cache_file = cache_file
        self.entries: dict[str, dict[str, Any]] = {}
        self.dirty = False
        if cache_file is not None:
            try:
                obj = json.loads(cache_file.read_text())
                if isinstance(obj, dict):
                    self.entries = {k: v for k, v in obj.items() if isinstance(v, dict)}
            except (OSError, ValueError):
                pass  # absent or damaged: it is only a cache

    def digest(self, path: Path) -> str | None:
        try:
            st = path.stat()
        except OSError:
            return None
        if not path.is_file():
            return None
        key = str(path)
        e = self.entries.get(key)
        if e and e.get("size") == st.st_size and e.get("mtime_ns") == st.st_mtime_ns \
                and isinstance(e.get("sha256"), str):
            return e["sha256"]
        sha = store.sha256_file(path)
        self.entries[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
        self.dirty = True
        return sha

    def save(self) -> None:
        if self.cache_file is not None and self.dirty:
            try:
                store.atomic_write_json(self.cache_file, self.entries)
            except OSError:
                log.warning("could not write the data hash cache %s", self.cache_file)
            self.dirty = False


def resolve_data_file(name: str, data_dir: Path | None) -> Path | None:
    """Where a data file name points: absolute as is, else under the data dir (None when
    there is no data dir). A relative name that leads out of the data dir is warned about
    with the resolved path: it is allowed, but usually a mistake (``../`` too many)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return p
    if data_dir is None:
        return None
    resolved = (data_dir / p).resolve()
    if not resolved.is_relative_to(data_dir.resolve()):
        log.warning("data path %r leads out of the data directory %s to %s", name, data_dir,
                    resolved)
    return resolved


def data_digests(section: Any, data_dir: Path | None, hasher: DataHasher) -> dict[str, str]:
    """``{name as configured: sha256 | "absent"}`` for the data files a section names."""
    out: dict[str, str] = {}
    for name in data_paths(section):
        path = resolve_data_file(name, data_dir)
        digest = hasher.digest(path) if path is not None else None
        out[name] = digest or "absent"
    return out


#: bytes of a data file inspected to tell text from binary
_SNIFF = 1 << 16


def check_text_file(path: Path, what: str) -> None:
    """One sentence naming ``path`` when a data file that must be text is binary (a NUL
    byte, or not UTF-8, in its first 64 KiB): otherwise a decoder error deep inside a
    reader names no file."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF)
    except OSError:
        return  # absent or unreadable: the reader says so, naming it
    if b"\0" in head:
        raise ValueError(f"{what}: {path} is a binary file, not text")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not merely a character cut at the 64 KiB boundary
            raise ValueError(f"{what}: {path} is not UTF-8 text (bad byte at offset "
                             f"{e.start})") from None

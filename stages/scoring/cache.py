"""Checked cache entries: a JSON value stored with its own sha256.

evaluate's results cache (``RUN/.cache/evaluate``) outlives the runs that wrote it, and a
cached number is certified again by every manifest that reuses it. An entry whose
checksum does not match (edited by hand, damaged on disk, or written by an older recoup
without one) is therefore dropped with a warning naming the file, and recomputed; it is
never reused and never fails the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from recoup.orchestrator.store import atomic_write_json

log = logging.getLogger("recoup.evaluate")
_SHA, _VALUE = "sha256", "value"


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_checked(path: Path, value: Any) -> None:
    """Store ``value`` (JSON) at ``path`` atomically, with its checksum."""
    value = json.loads(json.dumps(value))  # the value as it will read back
    atomic_write_json(path, {_SHA: _digest(value), _VALUE: value})


def read_checked(path: Path) -> Any | None:
    """The value stored at ``path``; None when absent or when the entry is bad (then it is
    deleted, with a warning naming it, so that it is recomputed)."""
    if not path.is_file():
        return None
    try:
        obj = json.loads(path.read_text())
        ok = (isinstance(obj, dict) and set(obj) == {_SHA, _VALUE}
              and obj[_SHA] == _digest(obj[_VALUE]))
        why = "its checksum does not match"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        ok, why = False, f"unreadable: {type(e).__name__}"
    if ok:
        return obj[_VALUE]
    log.warning("dropping the cache entry %s (%s); recomputing it", path, why)
    path.unlink(missing_ok=True)
    return None

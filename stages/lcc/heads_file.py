"""``heads.json``: the select stage's scores and chosen heads, its one writer and reader.

Format::

    {"method": "probe",
     "chosen": [[layer, head], ...],                    best first
     "scores": [{"layer": l, "head": h, "score": s}, ...]}  every head, (layer, head) order

``scores`` may be absent (a hand-written file that only chooses heads); ``chosen`` may not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from recoup.orchestrator.store import atomic_write_json
from recoup.stages.lcc.heads import HeadId, HeadScores

HEADS_FILE = "heads.json"


class HeadsRecord(NamedTuple):
    """What ``heads.json`` holds; unpacks as ``method, chosen, scores``."""

    method: str
    #: the heads to compensate, best first
    chosen: list[HeadId]
    #: every head's score; None when the file carries only the chosen heads
    scores: HeadScores | None


def heads_document(method: str, scores: HeadScores, chosen: Sequence[HeadId]) -> dict[str, Any]:
    """The JSON document of ``heads.json``."""
    return {"method": method, "chosen": [[int(layer), int(h)] for layer, h in chosen],
            "scores": scores.to_records()}


def write_heads(folder: Path, method: str, scores: HeadScores, chosen: Sequence[HeadId]) -> Path:
    """Write ``folder/heads.json`` atomically; returns its path."""
    path = folder / HEADS_FILE
    atomic_write_json(path, heads_document(method, scores, chosen))
    return path


def read_heads(folder: Path) -> HeadsRecord:
    """``folder/heads.json``; a clear error when it is missing or chooses no head."""
    path = folder / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the select stage writes the chosen heads")
    doc = json.loads(path.read_text())
    chosen = [(int(layer), int(h)) for layer, h in doc["chosen"]]
    if not chosen:
        raise ValueError(f"{path} chooses no heads; nothing to compensate")
    scores = HeadScores.from_records(doc["scores"]) if doc.get("scores") else None
    return HeadsRecord(method=str(doc.get("method", "?")), chosen=chosen, scores=scores)


__all__ = ("HEADS_FILE", "HeadsRecord", "heads_document", "read_heads", "write_heads")

"""What a report reads: the complete stage folders of one run and their manifests.

Everything comes from complete stage folders (manifest present and current), so the same
facts serve the ``report`` stage (its verified inputs) and ``recoup report`` / ``recoup
compare`` (a run directory, checked by the runner's plan first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recoup.orchestrator import store

#: The stages a report reads when they are in the pipeline, in pipeline order.
SOURCE_STAGES = ("prepare", "synthesize", "degrade", "data", "sensitivity", "collect", "svd",
                 "select", "train", "export", "evaluate")
MODELS = ("dense", "degraded", "recovered")


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """The complete stages of one run: folder and manifest of each, in pipeline order."""

    name: str
    folders: dict[str, Path]
    manifests: dict[str, store.Manifest]
    #: stages present in the run but not usable (stale, failed, ...), with the reason
    skipped: dict[str, str] = field(default_factory=dict)

    def metrics(self, stage: str) -> dict[str, Any]:
        m = self.manifests.get(stage)
        return m.metrics if m is not None else {}

    def config(self, stage: str) -> dict[str, Any]:
        m = self.manifests.get(stage)
        return m.config if m is not None else {}

    @property
    def evaluation(self) -> dict[str, Any]:
        return self.metrics("evaluate")


def facts_from_folders(name: str, folders: Mapping[str, Path]) -> RunFacts:
    """Facts from stage folders the runner already verified (the report stage's inputs),
    ordered as the pipeline runs them."""
    order = {s: i for i, s in enumerate(SOURCE_STAGES)}
    names = sorted(folders, key=lambda s: (order.get(s, len(order)), s))
    return RunFacts(name=name, folders={s: folders[s] for s in names},
                    manifests={s: store.read_manifest(folders[s]) for s in names})

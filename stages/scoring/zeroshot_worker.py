"""One zero-shot shard task: load one model, score some documents, write each job's file.

Runs as a Ray task (:func:`recoup.cluster.tasks.map_layers`) or in-process; the evaluate
stage plans the jobs and reads the files back, so a killed evaluation keeps what finished.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from recoup.cluster import progress as worker_progress
from recoup.stages.model import modelio
from recoup.stages.scoring import zeroshot
from recoup.stages.scoring.cache import write_checked
from recoup.stages.scoring.zeroshot import TaskSpec


@dataclass(frozen=True, kw_only=True)
class ShardJob:
    """One task's share of documents for one model; the worker writes ``out``."""

    spec: TaskSpec
    indices: tuple[int, ...]
    out: Path


@contextmanager
def _quiet_bars(progress: bool):  # noqa: ANN202 - a context manager
    """lm-eval draws its own tqdm bars; ``TQDM_DISABLE`` silences them when asked."""
    if progress:
        yield
        return
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


def zeroshot_shard(model_dir: Path, dtype: str, device: str, data_dir: Path,
                   jobs: Sequence[ShardJob], batch_size: int, progress: bool,
                   progress_key: str | None = None) -> int:
    """Load one model and score each job's documents with lm-eval; runs as a Ray task.

    Each job's per-document scores are written to ``job.out`` atomically as soon as they
    exist, so a killed evaluation keeps what finished. Returns the documents scored.
    Finished documents are added to the stage's shared bar ``progress_key``, if given.
    """

    def finished(n: int) -> None:
        if progress_key is not None:
            worker_progress.advance(progress_key, n)

    with _quiet_bars(progress):
        # one model per task; spread over the task's GPUs when larger than one
        model = modelio.load_model_spread(model_dir, modelio.DTYPES[dtype], device)
        tokenizer = modelio.load_tokenizer(model_dir)
        lm = zeroshot.make_lm(model, tokenizer, batch_size, on_documents=finished)
        scored = 0
        for job in jobs:
            docs = zeroshot.load_docs(job.spec, data_dir)
            scores = zeroshot.score_task(lm, job.spec, docs, job.indices, data_dir)
            write_checked(job.out, [s.to_json() for s in scores])
            scored += len(scores)
    return scored

"""The zero-shot settings of the evaluate stage (``evaluate.zeroshot``), apart so that the
stage module stays about orchestration."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.stages.scoring.zeroshot import DEFAULT_TASKS, TaskSpec


class ZeroShotConfig(StrictModel):
    """Zero-shot multiple-choice tasks, scored by lm-evaluation-harness."""

    tasks: tuple[TaskSpec, ...] = Field(
        DEFAULT_TASKS,
        description="Tasks (name, format, path[, labels]); default: piqa, arc_easy, "
        "arc_challenge, boolq, openbookqa from the data dir. Empty: no zero-shot evaluation.",
    )
    limit: int | None = Field(
        None, ge=1,
        description="Score the first this many documents of each task (lm-eval's --limit), "
        "for quick CPU runs; unset: every document, as the papers report.",
    )
    batch_size: int = Field(
        16, ge=1, description="Requests (context + one answer choice) per forward pass."
    )
    dtype: Literal["model", "float32", "bfloat16"] = Field(
        "model",
        description="Compute dtype of the zero-shot forwards. 'model': the prepared model's "
        "own. bfloat16 takes about 0.6x the float32 time on a CPU with bf16 instructions "
        "(avx512_bf16, AMX) and is how GPU evaluations run; perplexity and KL always use "
        "the model's own dtype.",
    )
    shards: int = Field(
        2, ge=1,
        description="Pieces each model's documents are split into: one Ray task each (it "
        "loads the model once), and the unit of resume. Results do not depend on it.",
    )
    cpus_per_shard: float = Field(
        1.0, gt=0, description="CPUs each shard task asks Ray for; also its torch threads."
    )
    workers: int | None = Field(
        None, ge=1,
        description="Most shard tasks in flight at once (each holds one model in memory); "
        "unset: all. No effect with cluster.mode=inprocess.",
    )


def zeroshot_dtype(cfg: ZeroShotConfig, model_dtype: str) -> str:
    """The dtype the zero-shot forwards run in."""
    return model_dtype if cfg.dtype == "model" else cfg.dtype


__all__ = ("ZeroShotConfig", "zeroshot_dtype")

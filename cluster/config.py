"""Cluster settings. Kept apart from :mod:`recoup.cluster.runtime` so that reading a
config never imports Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from recoup.cluster.hostmem import MMAP_THRESHOLD_BYTES, MMAP_THRESHOLD_MAX
from recoup.orchestrator.config import StrictModel


class StageResources(StrictModel):
    """What one single-task stage asks Ray for; an unset value falls back to the
    cluster-wide ``stage_cpus`` / ``stage_gpus``."""

    cpus: float | None = Field(None, gt=0, description="CPUs of the stage's task.")
    gpus: float | None = Field(
        None, ge=0,
        description="GPUs of the stage's task; for train and evaluate, which hold none in "
        "their own task, the GPUs of each of their device tasks (train's closed-form fit, "
        "evaluate's model tasks). collect and synthesize ignore it: their workers' GPUs are "
        "num_gpus_per_worker.")


class ClusterConfig(StrictModel):
    """Where stages run, and how failures of the machines they run on are retried.

    This section is part of no stage's fingerprint: changing it re-runs nothing that is
    finished (which is why the training retry policy lives here and not in train.engine).
    """

    mode: Literal["ray", "inprocess"] = Field(
        "ray",
        description="'ray': each stage runs as a Ray task (a local Ray is started unless "
        "`address` is set); 'inprocess': in this Python process, no Ray at all.",
    )
    address: str | None = Field(
        None,
        description="Address of an existing Ray cluster (e.g. 'ray://head:10001' or 'auto'). "
        "Unset: start an embedded local Ray bound to 127.0.0.1. `recoup submit` sets 'auto' "
        "(the cluster the job runs on).",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the embedded local Ray (unset: all of this machine's)."
    )
    stage_cpus: float = Field(
        2.0, gt=0, description="CPUs a single-task stage (prepare, degrade, evaluate) asks for."
    )
    stage_gpus: float = Field(
        0.0, ge=0,
        description="GPUs a single-task stage asks for (0 on CPU machines). evaluate gives "
        "them to each of its model tasks (the perplexity pass, every zero-shot shard) and "
        "holds none itself; collect, synthesize and train hold none in their own task (their "
        "workers' GPUs are set in their sections).",
    )
    stages: dict[str, StageResources] = Field(
        {},
        description="Per-stage overrides of stage_cpus / stage_gpus, e.g. {prepare: {gpus: "
        "0}, evaluate: {gpus: 3}}: for the stage's own task, or for train and evaluate their "
        "device tasks. Pool and group stages size their workers in their own section "
        "(collect.num_gpus_per_worker, train.engine.workers, svd.cpus_per_task, "
        "select.cpus_per_task).",
    )
    dashboard: bool = Field(
        False, description="Start Ray's dashboard (on 127.0.0.1) with the embedded local Ray."
    )
    mmap_threshold: int | None = Field(
        MMAP_THRESHOLD_BYTES, ge=0, le=MMAP_THRESHOLD_MAX,
        description="glibc's mmap threshold (bytes) in recoup's process and local Ray's "
        "workers (recoup/cluster/hostmem.py): allocations this large get their own mapping "
        "and go back to the OS when freed. 1 MiB keeps a ZeRO-3 worker at what the code "
        "holds (a 1.5 GB model: 2.22 GB peak, 4.43 GB with glibc's default) for ~1.33x CPU "
        "step time; 4194304 costs no time on a CPU for 2.79 GB; null: glibc's dynamic "
        "threshold. MALLOC_MMAP_THRESHOLD_ in the environment wins over this.",
    )
    train_max_failures: int = Field(
        2, ge=0,
        description="Ray Train: times the training worker group is restarted after a worker "
        "process died (node lost, OOM kill); each restart resumes from the last DeepSpeed "
        "checkpoint, so the result is that of an uninterrupted run. 0: fail at once (a "
        "later `recoup run` still resumes). No effect with mode 'inprocess'.",
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: dict[str, StageResources]) -> dict[str, StageResources]:
        from recoup.orchestrator.stage import registered_stages

        known = registered_stages()
        unknown = sorted(set(v) - set(known)) if known else []
        if unknown:
            raise ValueError(f"unknown stage {', '.join(map(repr, unknown))}; known stages: "
                             f"{', '.join(sorted(known))}")
        return v

    def resources_for(self, stage: str) -> tuple[float, float]:
        """(CPUs, GPUs) the task of single-task stage ``stage`` asks for."""
        own = self.stages.get(stage, StageResources())
        cpus = own.cpus if own.cpus is not None else self.stage_cpus
        gpus = own.gpus if own.gpus is not None else self.stage_gpus
        return cpus, gpus

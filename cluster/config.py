"""Cluster settings. Kept apart from :mod:`recoup.cluster.runtime` so that reading a
config never imports Ray."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recoup.orchestrator.config import StrictModel


class ClusterConfig(StrictModel):
    """Where stages run."""

    mode: Literal["ray", "inprocess"] = Field(
        "ray",
        description="'ray': each stage runs as a Ray task (a local Ray is started unless "
        "`address` is set); 'inprocess': in this Python process, no Ray at all.",
    )
    address: str | None = Field(
        None,
        description="Address of an existing Ray cluster (e.g. 'ray://head:10001' or 'auto'). "
        "Unset: start an embedded local Ray bound to 127.0.0.1.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="CPUs of the embedded local Ray (unset: all of this machine's)."
    )
    stage_cpus: float = Field(
        2.0, gt=0, description="CPUs a single-task stage (prepare, degrade, evaluate) asks for."
    )
    stage_gpus: float = Field(
        0.0, ge=0, description="GPUs a single-task stage asks for (0 on CPU machines)."
    )
    dashboard: bool = Field(
        False, description="Start Ray's dashboard (on 127.0.0.1) with the embedded local Ray."
    )

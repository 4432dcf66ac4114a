"""The training job: everything a recovery worker needs, as plain frozen data.

The train stage reads its inputs on the driver and packs them into a :class:`TrainJob`;
Ray Train pickles it to every worker, which turns it into a model and a task
(:mod:`recoup.stages.recovery.task`). So the job holds tensors, paths and frozen
dataclasses only: the stage's pydantic settings (:mod:`recoup.stages.train`) are reduced
to the specs below, and nothing here depends on the stage module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from torch import Tensor

from recoup.stages.lcc.compensation import HeadId
from recoup.stages.recovery.batching import Encoded
from recoup.stages.recovery.losses import KlPositions

#: Where the compensation starts (see ``train.lcc.init``).
LccInit = Literal["normal", "lost_component", "closed_form"]


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """The loss terms' weights (see :func:`recoup.stages.recovery.losses.recovery_loss`)."""

    ce_weight: float
    kl_weight: float
    temperature: float
    kl_on: KlPositions


@dataclass(frozen=True, kw_only=True)
class LccSpec:
    """How the compensation starts (``init``, ``init_std`` of the normal start) and the
    learning rate of beta and b (None: the engine's)."""

    init: LccInit
    init_std: float
    lr: float | None


@dataclass(frozen=True, kw_only=True)
class LoraSpec:
    """The peft LoRA adapters: rank ``r``, ``alpha`` (update scaled by alpha / r), input
    dropout and the linears of a block that get adapters (``q_proj``, ...)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a training worker needs, as plain data (it travels to Ray workers)."""

    method: str
    degraded_dir: Path
    dense_dir: Path
    dtype: str
    samples: tuple[Encoded, ...]
    pad_id: int
    loss: LossSpec
    n_heads: int
    lcc: LccSpec | None = None
    chosen: tuple[HeadId, ...] = ()
    V: Mapping[HeadId, Tensor] = field(default_factory=dict)
    lost: Mapping[HeadId, Tensor] | None = None
    lora: LoraSpec | None = None
    lora_layers: tuple[int, ...] = ()
    #: the degrade stage's keep masks (None: the weights' non-zero pattern), for masked LoRA
    masks_file: Path | None = None
    #: LoRA start: linear module name -> peft (lora_A (r, in), lora_B (out, r))
    lora_init: Mapping[str, tuple[Tensor, Tensor]] | None = None


__all__ = ("LccInit", "LccSpec", "LoraSpec", "LossSpec", "TrainJob")

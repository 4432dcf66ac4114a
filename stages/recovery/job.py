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

DEFAULT_TEACHER_TOP_K = 64
"""Teacher tokens kept per position for the KL (``train.loss.teacher_top_k``): a Llama's
next-token distribution puts nearly all of its mass on far fewer than 64 of its 32000
tokens, and 64 x 8 bytes per token keeps the file of 2048 samples x 512 tokens near half a
GB."""

DEFAULT_CHUNK_TOKENS = 64
"""Tokens per chunk of the top-k KL (``train.loss.chunk_tokens``): 64 x a 32k vocabulary in
float32 is 8 MB per vocabulary-wide tensor."""

#: Where the compensation starts (see ``train.lcc.init``).
LccInit = Literal["normal", "lost_component", "closed_form"]


@dataclass(frozen=True, kw_only=True)
class LossSpec:
    """The loss terms' weights (see :func:`recoup.stages.recovery.losses.recovery_loss`) and
    how the teacher is kept: ``teacher_top_k`` > 0 tokens per position computed before
    training (:mod:`recoup.stages.recovery.teacher`), 0 the whole dense model resident."""

    ce_weight: float
    kl_weight: float
    temperature: float
    kl_on: KlPositions
    teacher_top_k: int = DEFAULT_TEACHER_TOP_K
    #: tokens per chunk of the top-k KL (0: the whole micro-batch at once)
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    @property
    def cached_teacher(self) -> bool:
        """The KL reads the teacher's top-k from a file (no teacher beside the student)."""
        return bool(self.kl_weight) and self.teacher_top_k > 0

    @property
    def resident_teacher(self) -> bool:
        """The exact KL: the whole dense model runs beside the student."""
        return bool(self.kl_weight) and self.teacher_top_k == 0


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
    #: the adapter runs (and is merged) under the sparsity mask; False: a separate dense
    #: low-rank branch, left unmerged by the export (train.lora.merge: none)
    masked: bool = True


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


__all__ = ("DEFAULT_TEACHER_TOP_K", "LccInit", "LccSpec", "LoraSpec", "LossSpec", "TrainJob")

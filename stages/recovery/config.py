"""The train stage's settings for each part of recovery: loss, compensation, LoRA, and the
calibration of the training-free fits.

They are pydantic models (checked when the run config loads, unknown keys refused) composed
by :class:`recoup.stages.train.TrainConfig`, and only the train stage reads them: each one
reduces to the frozen spec the library takes (``.spec()``, :mod:`recoup.stages.recovery.job`)
or is passed on field by field, so the math modules (:mod:`~recoup.stages.recovery.losses`,
:mod:`~recoup.stages.recovery.eora`, :mod:`~recoup.stages.recovery.training_free`) never see a
config class. They live here rather than in ``stages/train.py`` to keep the stage module to
the stage itself.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from recoup.orchestrator.config import ADDED_FIELD, StrictModel
from recoup.stages.lcc.compensation import DEFAULT_INIT_STD
from recoup.stages.model.layout import LINEAR_TARGETS
from recoup.stages.recovery.eora import EIG_RTOL
from recoup.stages.recovery.job import (
    DEFAULT_CHUNK_TOKENS,
    DEFAULT_TEACHER_TOP_K,
    LccInit,
    LccSpec,
    LoraSpec,
    LossSpec,
)
from recoup.stages.recovery.losses import KlPositions
from recoup.stages.recovery.training_free import DEFAULT_CALIBRATION_SAMPLES, DEFAULT_MICRO_BATCH


class LossConfig(StrictModel):
    """Weighted sum of response-only cross-entropy and distillation KL to the dense model."""

    ce_weight: float = Field(
        1.0, ge=0.0, description="Weight of cross-entropy on response tokens (prompt masked)."
    )
    kl_weight: float = Field(
        0.0, ge=0.0,
        description="Weight of KL(dense || degraded) on the logits; > 0 runs the dense model "
        "as teacher: once before training (teacher_top_k > 0) or beside the student.",
    )
    teacher_top_k: int = Field(
        DEFAULT_TEACHER_TOP_K, ge=0,
        description="KL on the dense model's top-k tokens per position plus one tail bucket, "
        "computed once before training (the teacher is never resident beside the student; "
        "a lower bound of the exact KL, equal at k = vocabulary). 0: the exact full-"
        "vocabulary KL with the whole dense model loaded in every training worker.",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Softmax temperature of the KL; the KL is scaled by T^2."
    )
    kl_on: KlPositions = Field(
        "all",
        description="Positions the KL averages over: 'all' real tokens, or 'response' only.",
    )
    chunk_tokens: int = Field(
        DEFAULT_CHUNK_TOKENS, ge=0,
        description="The top-k KL over about this many tokens at a time, each chunk "
        "recomputed in the backward: its vocabulary-wide float32 tensors (several times the "
        "logits) live for one chunk instead of the micro-batch. 0: the whole micro-batch.",
        json_schema_extra=ADDED_FIELD,
    )

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise ValueError("ce_weight and kl_weight are both 0: nothing to train on")
        return self

    def spec(self) -> LossSpec:
        return LossSpec(ce_weight=self.ce_weight, kl_weight=self.kl_weight,
                        temperature=self.temperature, kl_on=self.kl_on,
                        teacher_top_k=self.teacher_top_k, chunk_tokens=self.chunk_tokens)


class LccConfig(StrictModel):
    """The compensation vectors ``c = V^T beta + b`` of the chosen heads (lcc methods)."""

    init: LccInit = Field(
        "normal",
        description="'normal': beta, b ~ N(0, init_std) (the reference); 'lost_component': "
        "start at the mean lost component of each head (from the collect stage's activations, "
        "last prompt token, top init_directions directions); 'closed_form': start at the mean "
        "of z_dense - z_degraded over all calibration tokens, fitted block by block on the "
        "compensated model (train.closed_form; no collect needed).",
    )
    init_std: float = Field(DEFAULT_INIT_STD, gt=0, description="Std of the 'normal' init.")
    init_directions: int = Field(
        10, ge=1, description="'lost_component': singular directions kept in the mean shift."
    )
    lr: float | None = Field(
        None, gt=0,
        description="Peak learning rate of beta and b (their own AdamW parameter group, same "
        "schedule); unset: train.engine.lr. The lost shift is O(0.1-1) per coordinate while "
        "LoRA wants ~1e-4, so one lr rarely suits both.",
    )

    def spec(self) -> LccSpec:
        return LccSpec(init=self.init, init_std=self.init_std, lr=self.lr)


class LoraAdapterConfig(StrictModel):
    """LoRA adapters (``peft``) on some decoder layers."""

    layers: tuple[int, ...] | Literal["auto", "all"] = Field(
        "auto",
        description="Decoder layers that get adapters: a list of indices, 'all', or 'auto' = the "
        "`auto_layers` layers whose outputs differ most between dense and degraded (from "
        "the sensitivity stage when it is in the pipeline, else measured on the first "
        "`auto_samples` training samples).",
    )
    auto_layers: int = Field(4, ge=1, description="'auto': how many layers.")
    auto_samples: int = Field(
        16, ge=1, description="'auto': training samples run through both models to rank layers."
    )
    targets: tuple[str, ...] = Field(
        LINEAR_TARGETS, min_length=1, description="Linear layers of a block that get adapters."
    )
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    init: Literal["random", "eora"] = Field(
        "random",
        description="'random': peft's init (A random, B = 0: training starts at the degraded "
        "model); 'eora': start at the EoRA factors of W_dense - W_degraded in the eigenspace "
        "of each linear's input covariance (train.closed_form), peft's alpha/r accounted for.",
    )

    merge: Literal["masked", "none"] = Field(
        "masked",
        description="'masked': the adapter trains under the sparsity mask and the export "
        "merges it there (W_hat + M * scale B A: zeros kept, no runtime cost, but only the "
        "surviving weights move); 'none': a dense low-rank branch beside the sparse weights "
        "(W_hat x + scale B A x, EoRA's form), trained and exported unmerged (the base keeps "
        "its zeros; the adapter costs r (in + out) multiply-adds per token per linear). "
        "Pruning's error sits on the pruned positions, which a masked merge cannot reach.",
    )

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in v if t not in LINEAR_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {', '.join(LINEAR_TARGETS)}")
        return v

    def layer_count(self, n_layers: int) -> int:
        """How many decoder layers get adapters in a model of ``n_layers``."""
        if self.layers == "auto":
            return self.auto_layers
        return n_layers if self.layers == "all" else len(self.layers)

    def spec(self) -> LoraSpec:
        return LoraSpec(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                        targets=self.targets, masked=self.merge == "masked")


class ClosedFormConfig(StrictModel):
    """Calibration of the training-free fits (methods ``lcc-closed``, ``eora``,
    ``lcc-closed+eora``; inits ``train.lcc.init: closed_form``, ``train.lora.init: eora``)."""

    samples: int = Field(
        DEFAULT_CALIBRATION_SAMPLES, ge=1,
        description="Calibration sequences: the first this many training samples (prompt + "
        "response, cut at train.max_seq_len); every real token counts.",
    )
    micro_batch: int = Field(
        DEFAULT_MICRO_BATCH, ge=1, description="Sequences per block forward (bounds memory)."
    )
    offload: bool = Field(
        False, description="Keep both models' hidden states in host memory between blocks "
        "(large calibration sets on a small device).",
    )
    heads: Literal["chosen", "all"] = Field(
        "chosen",
        description="Heads that 'lcc-closed' compensates: 'chosen' = the select stage's "
        "chosen heads (every head when select is not in the pipeline); 'all' = every head "
        "(it costs nothing at inference: one o_proj bias per layer).",
    )
    eig_rtol: float = Field(
        EIG_RTOL, gt=0, lt=1,
        description="EoRA: eigenvalues of an input covariance below eig_rtol * its largest "
        "are dropped (directions the inputs never take).",
    )


__all__ = ("ClosedFormConfig", "LccConfig", "LoraAdapterConfig", "LossConfig")

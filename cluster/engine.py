"""The training engine's typed settings and the DeepSpeed config built from them.

Kept apart from :mod:`recoup.cluster.train` so that reading a run config imports neither
Ray nor DeepSpeed. Everything here is pure: config in, dict or number out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from recoup.orchestrator.config import ADDED_FIELD, StrictModel

_NEVER_PRINT = 2**31 - 1
"""DeepSpeed's ``steps_per_print``: recoup logs steps itself (log.jsonl and a bar)."""


class EngineConfig(StrictModel):
    """How recovery training runs: workers, ZeRO, batch, optimiser, schedule, checkpoints."""

    workers: int = Field(
        2, ge=1,
        description="Ray Train workers (one per GPU on a GPU cluster). cluster.mode "
        "'inprocess' runs exactly one, in this process.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray Train worker asks for.")
    zero_stage: Literal[2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients, 3 also "
        "the (frozen) base weights."
    )
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: keep optimizer state and step on the CPU."
    )
    offload_params: bool = Field(
        False, description="ZeRO-3 only: keep the partitioned parameters on the CPU."
    )
    frozen_weights: Literal["resident", "streamed"] = Field(
        "resident",
        description="Where the frozen base lives while it trains. 'resident': in memory "
        "(ZeRO-3 partitions it over the workers, ZeRO-2 keeps it whole on each). 'streamed': "
        "it stays in its checkpoint files and each module reads its weights when the forward "
        "(and the backward's recompute) reaches it, the embeddings and the LM head by rows, "
        "so a worker holds about one block whatever the model's size (a 70B run fits one "
        "GPU), for "
        "reading the model twice per micro-batch (from the page cache when the host has room "
        "for it). Needs activation checkpointing, which it turns on under 'auto'.",
        json_schema_extra=ADDED_FIELD,
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto': bf16 on GPU, fp32 on CPU (gloo)."
    )
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute each decoder block's activations in backward instead of "
        "keeping them (one block's activations plus every block's input stay): a fraction of "
        "the activation memory for about a third more compute. 'auto': on GPU, off on CPU.",
    )
    micro_batch: int = Field(4, ge=1, description="Samples per worker per forward pass.")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches accumulated per optimizer step."
    )
    group_by_length: bool = Field(
        False,
        description="Batch samples of about one length together (each window of 50 global "
        "batches of the shuffled sample stream sorted by length, its batches shuffled): less "
        "right padding and less waiting for the slowest worker. Needs a task that knows its "
        "sample lengths.",
    )
    steps: int = Field(100, ge=1, description="Optimizer steps to train.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(
        0, ge=0, description="Linear warmup steps; the first step already uses lr/warmup_steps."
    )
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="After warmup: keep the peak lr, or decay it linearly to ~0."
    )
    grad_clip: float = Field(1.0, ge=0, description="Gradient-norm clipping; 0 turns it off.")
    checkpoint_every: int = Field(
        50, ge=1, description="Save a DeepSpeed checkpoint every this many optimizer steps."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest ones).")
    seed: int = Field(0, description="Seed of the trainable init, the data order and dropout.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.frozen_weights == "streamed" and self.activation_checkpointing is False:
            raise ValueError("frozen_weights 'streamed' needs activation_checkpointing (true "
                             "or 'auto'): without it the backward keeps every block's "
                             "weights, the whole model")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        return self


def use_bf16(cfg: EngineConfig, device_type: str) -> bool:
    """bf16 when asked, or on GPU under 'auto'; CPU runs (gloo) stay in fp32."""
    if cfg.precision == "auto":
        return device_type == "cuda"
    return cfg.precision == "bf16"


def use_checkpointing(cfg: EngineConfig, device_type: str) -> bool:
    """Activation checkpointing when asked, or under 'auto' on GPU (memory is what a GPU
    lacks; tiny CPU runs would only pay the recompute) and with streamed frozen weights
    (which need it)."""
    if cfg.activation_checkpointing == "auto":
        return device_type == "cuda" or cfg.frozen_weights == "streamed"
    return bool(cfg.activation_checkpointing)


def deepspeed_config(cfg: EngineConfig, *, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for ``cfg`` on ``world_size`` data-parallel workers.

    The optimizer (torch AdamW) and the LR schedule (:func:`lr_factor`) are passed to
    ``deepspeed.initialize`` as client objects, not named here: DeepSpeed's own Adam needs a
    compiled op, and its WarmupLR floors warmup at 2 steps and spends the first steps at the
    minimum lr, which makes "warmup_steps" mean something else than it says. ZeRO therefore
    has to be told that a client optimizer is fine, also with offload.
    """
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _NEVER_PRINT,
        "wall_clock_breakdown": False,
    }


ZERO3_LIVE_BLOCKS = 2
"""Decoder blocks whose weights ZeRO-3 may hold gathered at once: the running one and the
prefetched next one (``recoup plan`` charges the same)."""


def zero3_live_limits(block_params: int) -> dict[str, int]:
    """ZeRO-3's gathering limits (in elements) for a model whose largest decoder block has
    ``block_params`` parameters: at most :data:`ZERO3_LIVE_BLOCKS` blocks' worth live,
    a prefetch of one block, and a gathered parameter released unless it is used again
    within one block.

    DeepSpeed's defaults (1e9 live, 1e9 reuse distance) are sized for a GPU's memory, not
    the model's: a parameter used again within 1e9 elements stays gathered, and under
    activation checkpointing every block is used again in its backward recompute, so a model
    under 1e9 parameters (every model up to ~1B; every block of a 70B one) ends up gathered
    whole on every rank after the first step, the partition saving nothing. The embeddings
    and the LM head, larger than a block in small-hidden models, are still gathered whole
    for their own call (a module's parameters are fetched together whatever the limit)."""
    if block_params <= 0:
        raise ValueError(f"block_params must be positive, got {block_params}")
    unit = int(block_params)
    return {"stage3_max_live_parameters": ZERO3_LIVE_BLOCKS * unit,
            "stage3_max_reuse_distance": unit,
            "stage3_prefetch_bucket_size": unit}


def with_zero3_limits(ds_config: dict[str, Any], block_params: int) -> dict[str, Any]:
    """``ds_config`` with :func:`zero3_live_limits` in its ``zero_optimization`` when that is
    stage 3 and the model has a repeated block (unchanged otherwise: without a block to size
    them by, DeepSpeed's own limits stand); a new dict, the input is left alone."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage") != 3 or block_params <= 0:
        return ds_config
    return {**ds_config, "zero_optimization": {**zero, **zero3_live_limits(block_params)}}


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr used by optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps, so no step
    runs at lr 0. Then 1 ('constant') or a linear decay ``(total - step) / (total - warmup)``
    that reaches ``1 / (total - warmup)`` at the last step ('linear').
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant or linear")


__all__ = ("ZERO3_LIVE_BLOCKS", "EngineConfig", "deepspeed_config", "lr_factor", "use_bf16",
           "use_checkpointing", "with_zero3_limits", "zero3_live_limits")

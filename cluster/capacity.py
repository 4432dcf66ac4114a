"""Capacity arithmetic of a training worker under DeepSpeed ZeRO: what one GPU holds.

Pure arithmetic on the model's shape (:class:`recoup.orchestrator.estimate.ModelShape`)
and the engine settings; the train stage's estimate (``stages/train.py``) maps its config
onto it. No Ray, no DeepSpeed import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from recoup.cluster.engine import EngineConfig, use_bf16
from recoup.orchestrator.estimate import FP32, ModelShape

if TYPE_CHECKING:
    from recoup.stages.model.modelio import ModelCard

ADAM_BYTES_PER_PARAM = 16
"""Mixed-precision Adam per trainable parameter: 16-bit weight and gradient (2 + 2), fp32
master weight and two fp32 moments (4 + 4 + 4), as in the ZeRO paper."""
ZERO3_LIVE_BLOCKS = 2
"""Decoder blocks whose weights ZeRO-3 holds gathered at once (the running one and the
prefetched next one)."""
MAX_WORLD_SIZE = 4096
"""Largest training world size :func:`min_world_size` tries."""


def train_token_layer_bytes(card: ModelCard, itemsize: int) -> int:
    """Bytes one token keeps for backward in one decoder layer whose linears are frozen.

    A frozen linear needs only its weight to pass gradients to its input, so it keeps no
    activation. What stays: each RMSNorm's float32 input (2 x hidden x 4), the SDPA inputs
    and output (q, k, v expanded to every head, out: 4 x heads x d_head), and the MLP's
    gate, up and SiLU(gate) (3 x intermediate).
    """
    attn = 4 * card.heads * card.d_head
    return 2 * card.hidden * FP32 + itemsize * (attn + 3 * card.intermediate)


def lora_parts(shape: ModelShape, *, layers: int, rank: int, targets: tuple[str, ...],
               itemsize: int) -> tuple[int, int]:
    """(trainable LoRA parameters, extra activation bytes per token) of the adapted layers."""
    adapted = [(o, i) for n, o, i in shape.block_linears if n.rsplit(".", 1)[-1] in targets]
    params = layers * sum(rank * (o + i) for o, i in adapted)
    # An adapted linear's input is kept for A's gradient; q/k/v and gate/up share theirs.
    inputs = {i for n, _, i in shape.block_linears if n.rsplit(".", 1)[-1] in targets}
    per_token = layers * itemsize * (sum(inputs) + rank * len(adapted))
    return params, per_token


@dataclass(frozen=True, kw_only=True)
class LoraShape:
    """The LoRA adapters a run trains: how many layers, their rank, the adapted linears."""

    layers: int
    rank: int
    targets: tuple[str, ...]


def zero_worker_parts(shape: ModelShape, eng: EngineConfig, world_size: int, *, tokens: int,
                      heads: int, lora: LoraShape | None, teacher: bool) -> dict[str, int]:
    """Device bytes of one training worker (one GPU) under ``eng``'s ZeRO stage, for
    micro-batches of ``tokens`` tokens; ``heads`` compensated heads (0: none), ``lora``
    adapters (None: none), ``teacher``: the dense model runs beside for a KL loss."""
    card = shape.card
    item = 2 if use_bf16(eng, "cuda") else FP32
    parts: dict[str, int] = {}
    frozen = shape.params * item
    if eng.zero_stage == 3 and eng.offload_params:
        parts["frozen weights (offloaded to CPU)"] = 0
    elif eng.zero_stage == 3:
        parts["frozen weights / world size (ZeRO-3)"] = math.ceil(frozen / world_size)
        parts[f"{ZERO3_LIVE_BLOCKS} gathered blocks (ZeRO-3)"] = (
            ZERO3_LIVE_BLOCKS * shape.block_params * item)
    else:
        parts["frozen weights (ZeRO-2 keeps them whole)"] = frozen
    trainable = 0
    extra_per_token = 0
    if heads:
        trainable += heads * 2 * card.d_head  # beta and b per chosen head
        parts["V of the chosen heads (float32)"] = heads * card.d_head * card.d_head * FP32
    if lora is not None:
        lora_params, extra_per_token = lora_parts(
            shape, layers=lora.layers, rank=lora.rank, targets=lora.targets, itemsize=item)
        trainable += lora_params
    # ZeRO-2 keeps the 16-bit trainable weights whole and shards grads and Adam states;
    # ZeRO-3 shards all of it. Offloading moves the fp32 master and moments to the CPU.
    whole = item if eng.zero_stage == 2 else 0
    sharded = ADAM_BYTES_PER_PARAM - whole - (3 * FP32 if eng.offload_optimizer else 0)
    parts["trainable params + grads + Adam"] = (
        trainable * whole + math.ceil(trainable * sharded / world_size))
    per_token = card.layers * train_token_layer_bytes(card, item) + extra_per_token
    parts["activations for backward (all layers)"] = tokens * per_token
    parts["logits (16-bit, float32 log-softmax and its grad)"] = tokens * card.vocab * (
        item + 2 * FP32)
    if teacher:
        parts["teacher: dense model, whole on every worker"] = shape.weights_bytes
        parts["teacher logits"] = tokens * card.vocab * (item + FP32)
    return parts


def min_world_size(parts_at: Callable[[int], Mapping[str, int]], usable: float) -> int | None:
    """Fewest training workers whose per-GPU bytes ``parts_at(world_size)`` fit ``usable``;
    None if none up to :data:`MAX_WORLD_SIZE` does."""
    if sum(parts_at(MAX_WORLD_SIZE).values()) > usable:
        return None
    lo, hi = 1, MAX_WORLD_SIZE
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(parts_at(mid).values()) <= usable:
            hi = mid
        else:
            lo = mid + 1
    return lo

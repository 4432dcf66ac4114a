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

from recoup.cluster.engine import ZERO3_LIVE_BLOCKS, EngineConfig, use_bf16, zero3_live_limits
from recoup.orchestrator.estimate import FP32, ModelShape, forward_working_bytes

if TYPE_CHECKING:
    from recoup.stages.model.modelio import ModelCard

ADAM_BYTES_PER_PARAM = 16
"""Mixed-precision Adam per trainable parameter: 16-bit weight and gradient (2 + 2), fp32
master weight and two fp32 moments (4 + 4 + 4), as in the ZeRO paper."""
MAX_WORLD_SIZE = 4096
"""Largest training world size :func:`min_world_size` tries."""
STREAMED_ROW_CHUNK_BYTES = 32 << 20
"""Bytes of LM-head rows a streamed base reads at once, as stored
(:mod:`recoup.stages.model.streamed` reads this, so the plan and the reader agree)."""


DEEPSPEED_ENGINE_HOST_BYTES = 70 * 10**6
"""Host memory a DeepSpeed engine holds whatever it trains: ``deepspeed.initialize`` of a
one-layer module on the CPU (ZeRO-3, gloo, DeepSpeed 0.19, torch 2.13) took 60 MB of RSS
and 66 MB after two steps, for 42 KB and for 4 MB of parameters alike
(``benchmarks/memory_scaling.py`` measured the train workers above the plan by about that
much, in both the partitioned and the streamed mode)."""


def streamed_read_bytes(shape: ModelShape, itemsize: int) -> int:
    """Bytes of the largest read of a streamed base in ``itemsize``: a block's widest
    linear, or one chunk of LM-head rows."""
    return max([o * i * itemsize for _, o, i in shape.block_linears]
               + [streamed_head_chunk_bytes(shape, itemsize)])


def streamed_head_chunk_bytes(shape: ModelShape, itemsize: int) -> int:
    """Device bytes of one chunk of LM-head rows of a streamed base, in ``itemsize``."""
    card = shape.card
    rows = min(card.vocab, max(1, STREAMED_ROW_CHUNK_BYTES // (card.hidden * shape.itemsize)))
    return rows * card.hidden * itemsize


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


def masked_lora_bytes(shape: ModelShape, *, layers: int, targets: tuple[str, ...],
                      itemsize: int) -> tuple[int, int]:
    """(bool keep masks, masked deltas kept for backward) of ``layers`` adapted layers.

    Masked LoRA (:mod:`recoup.stages.recovery.masked_lora`) keeps an (out, in) bool mask per
    adapted linear, and its forward multiplies by the (out, in) delta ``M * B A``, which
    autograd keeps for the input's gradient."""
    elems = layers * sum(o * i for n, o, i in shape.block_linears
                         if n.rsplit(".", 1)[-1] in targets)
    return elems, elems * itemsize


def checkpointed_activation_parts(card: ModelCard, *, tokens: int, itemsize: int,
                                  layer_bytes: int) -> dict[str, int]:
    """Activation memory under activation checkpointing: every block keeps only its input
    hidden state; one block at a time recomputes its activations (``layer_bytes`` per token)
    in backward."""
    return {
        "block inputs (activation checkpointing)": tokens * card.layers * card.hidden * itemsize,
        "one block recomputed in backward": tokens * layer_bytes,
    }


@dataclass(frozen=True, kw_only=True)
class LoraShape:
    """The LoRA adapters a run trains: how many layers, their rank, the adapted linears."""

    layers: int
    rank: int
    targets: tuple[str, ...]
    #: trained under the sparsity mask (keep masks and masked deltas held); False for
    #: ``train.lora.merge: none``, a plain adapter
    masked: bool = True


def zero_worker_parts(shape: ModelShape, eng: EngineConfig, world_size: int, *, tokens: int,
                      heads: int, lora: LoraShape | None, teacher_top_k: int | None,
                      checkpointing: bool, kl_chunk_tokens: int = 0) -> dict[str, int]:
    """Device bytes of one training worker (one GPU) under ``eng``'s ZeRO stage, for
    micro-batches of ``tokens`` tokens; ``heads`` compensated heads (0: none), ``lora``
    adapters (None: none); ``teacher_top_k``: None without a KL, 0 for the exact KL (the
    dense model whole beside the student), k for the KL on the teacher's cached top-k;
    ``checkpointing``: activation checkpointing of the decoder blocks; ``kl_chunk_tokens``:
    the top-k KL's chunk (``train.loss.chunk_tokens``; 0: the micro-batch at once).

    Under ZeRO-3 the base is built partitioned (no whole-model load peak): a worker holds
    its 1/world share and the blocks gathered for the running forward or backward. Streamed
    (``eng.frozen_weights``): no share at all, one block and LM-head rows read from the
    checkpoint (:mod:`recoup.stages.model.streamed`)."""
    card = shape.card
    item = 2 if use_bf16(eng, "cuda") else FP32
    parts: dict[str, int] = {}
    frozen = shape.params * item
    streamed = eng.frozen_weights == "streamed"
    if streamed:
        # read from the checkpoint around each module's call: a checkpointed block's
        # recompute holds its weights until its backward is done; the LM head reads a chunk
        # of its rows at a time (not at once; both counted)
        parts["streamed frozen weights: one block + a chunk of LM head rows"] = (
            shape.block_params * item + streamed_head_chunk_bytes(shape, item))
    elif eng.zero_stage == 3 and eng.offload_params:
        parts["frozen weights (offloaded to CPU)"] = 0
    elif eng.zero_stage == 3:
        parts["frozen weights / world size (ZeRO-3)"] = math.ceil(frozen / world_size)
    else:
        parts["frozen weights (ZeRO-2 keeps them whole)"] = frozen
    if eng.zero_stage == 3 and not streamed:
        # the live limit (recoup.cluster.engine.zero3_live_limits) holds two blocks; the
        # LM head is gathered whole for its call and stays gathered from the end of the
        # forward into the backward, where it is used again at once (measured:
        # benchmarks/memory_scaling.py, step 2 on)
        parts[f"{ZERO3_LIVE_BLOCKS} gathered blocks + the LM head (ZeRO-3)"] = (
            ZERO3_LIVE_BLOCKS * shape.block_params + card.vocab * card.hidden) * item
        # the prefetch (its bucket as zero3_live_limits sets it) is all-gathered coalesced:
        # received into one flat buffer, then every parameter copied out of it (torch.cat in
        # DeepSpeed's AllGatherCoalescedHandle.wait); the buffer lives until the last of
        # those parameters is used, so the prefetched block is held twice meanwhile. Not
        # in the live-parameter count (measured: the worker's peak is in a block's fetch)
        prefetch = zero3_live_limits(shape.block_params)["stage3_prefetch_bucket_size"]
        parts["all-gather buffer of the prefetched block (ZeRO-3)"] = prefetch * item
    trainable = 0
    extra_per_token = 0
    if heads:
        trainable += heads * 2 * card.d_head  # beta and b per chosen head
        parts["V of the chosen heads (float32)"] = heads * card.d_head * card.d_head * FP32
    if lora is not None:
        lora_params, extra_per_token = lora_parts(
            shape, layers=lora.layers, rank=lora.rank, targets=lora.targets, itemsize=item)
        trainable += lora_params
        if lora.masked:
            masks, deltas = masked_lora_bytes(shape, layers=lora.layers,
                                              targets=lora.targets, itemsize=item)
            parts["keep masks of the adapted linears (bool)"] = masks
            # checkpointing keeps one layer's deltas at a time (its recompute)
            parts["masked LoRA deltas kept for backward"] = (
                deltas // max(1, lora.layers) if checkpointing else deltas)
    # ZeRO-2 keeps the 16-bit trainable weights whole and shards grads and Adam states;
    # ZeRO-3 shards all of it. Offloading moves the fp32 master and moments to the CPU.
    whole = item if eng.zero_stage == 2 else 0
    sharded = ADAM_BYTES_PER_PARAM - whole - (3 * FP32 if eng.offload_optimizer else 0)
    parts["trainable params + grads + Adam"] = (
        trainable * whole + math.ceil(trainable * sharded / world_size))
    layer = train_token_layer_bytes(card, item)
    if checkpointing:
        lora_layer = extra_per_token // lora.layers if lora is not None and lora.layers else 0
        parts.update(checkpointed_activation_parts(card, tokens=tokens, itemsize=item,
                                                   layer_bytes=layer + lora_layer))
    else:
        parts["activations for backward (all layers)"] = tokens * (
            card.layers * layer + extra_per_token)
    chunked = teacher_top_k and 0 < kl_chunk_tokens < tokens
    if chunked:
        # the logits and their gradient whole; the KL's float32 tensors (the student's
        # log-softmax, its tail, their gradients) for one chunk of tokens at a time
        parts["logits and their gradient (16-bit)"] = tokens * card.vocab * 2 * item
        parts[f"KL on the teacher's top-{teacher_top_k}, {kl_chunk_tokens} tokens at a time"] = (
            tokens * (teacher_top_k * (8 + FP32) + FP32)
            + kl_chunk_tokens * card.vocab * 4 * FP32)
    else:
        parts["logits (16-bit, float32 log-softmax and its grad)"] = tokens * card.vocab * (
            item + 2 * FP32)
    if teacher_top_k == 0:
        parts["teacher: dense model, whole on every worker"] = shape.weights_bytes
        parts["teacher logits"] = tokens * card.vocab * (item + FP32)
    elif teacher_top_k and not chunked:
        # ids as int64 for the gather, log-probs, tail; the student's float32 copy without
        # the top-k for its tail mass
        parts[f"KL on the teacher's top-{teacher_top_k} (its rows, the student's tail)"] = (
            tokens * (teacher_top_k * (8 + FP32) + FP32 + card.vocab * FP32))
    return parts


def teacher_pass_parts(shape: ModelShape, eng: EngineConfig, world_size: int, *,
                       tokens: int, top_k: int) -> dict[str, int]:
    """Device bytes of one worker's teacher pass, which runs before the student is built
    (:mod:`recoup.stages.recovery.teacher`): the dense model as training would hold it, one
    gathered unit at a time under ZeRO-3 (a block or the embeddings / LM head), one
    micro-batch's forward and its logits turned into top-``top_k``. Streamed
    (``frozen_weights``): one module's weights at a time, read from the checkpoint."""
    card = shape.card
    item = 2 if use_bf16(eng, "cuda") else FP32
    parts: dict[str, int] = {}
    if eng.frozen_weights == "streamed":
        parts["one module's weights (streamed)"] = streamed_read_bytes(shape, item)
    elif eng.zero_stage == 3:
        parts["dense weights / world size (ZeRO-3)"] = math.ceil(shape.params * item / world_size)
        parts["one gathered block (ZeRO-3)"] = max(shape.block_params,
                                                   card.vocab * card.hidden) * item
    else:
        parts["dense weights, whole"] = shape.weights_bytes
    parts["forward working set"] = forward_working_bytes(card, tokens, item)
    # 16-bit logits, their float32 copy / temperature, the copy without the top-k (tail)
    parts["logits and their top-k"] = tokens * (card.vocab * (item + 2 * FP32)
                                                + top_k * (8 + 2 * FP32))
    return parts


def teacher_file_bytes(tokens: int, top_k: int) -> int:
    """Disk bytes of the teacher's top-k over ``tokens`` token positions: int32 ids and
    float32 log-probs per kept token, a float32 tail per position."""
    return tokens * (top_k * 2 * FP32 + FP32)


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

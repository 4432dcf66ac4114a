"""Capture the input of every ``self_attn.o_proj`` at chosen tokens: the activations recoup
compares between the dense and the degraded model.

The input of ``o_proj`` is the attention output before the output projection, heads
concatenated: row ``t`` of it is ``z_t = [z_t^1 | ... | z_t^H]`` with ``z_t^h`` in R^{d_head}.
Per sample we keep one row per layer: the row at the sample's last real token, or the mean
over its response tokens. Forward pre-hooks on the ``o_proj`` modules reduce the
``(B, T, H * d_head)`` input to ``(B, H * d_head)`` right away, so a batch never holds more
than one layer's full input, whatever the model's depth.

Padding is handled per sample, not per batch: :func:`pad_batch` builds the attention mask,
``position_ids`` that restart at 0 at each sample's first real token (without them Hugging
Face's Llama numbers positions 0..T-1 whatever the mask, shifting every left-padded sample;
RoPE being relative, that costs Llama only rounding, but a model with absolute or
length-dependent positions would compute something else), and the per-sample token
selection. Left and right padding and any batch composition therefore give the same rows
up to floating-point rounding.

The same functions serve a direct single-process forward pass (:func:`plan_batches` ->
:func:`pad_batch` -> :func:`capture_batch`) and the collect workers, which run the same
batches one decoder block at a time (:mod:`recoup.stages.model.block_capture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from recoup.stages.model import layout
from recoup.stages.model.tokenize import TokenSeq

Position = Literal["last_token", "mean_response"]
"""Which tokens of a sequence give its row.

``last_token``: the last real token of the sequence. For a prompt-only sequence that is the
last prompt token; for prompt + response it is the last response token (the reference takes
the last token of whatever text it feeds the model; the last *prompt* token of q + r would
equal that of q alone, since attention is causal).
``mean_response``: the mean over the response tokens; a sequence without response tokens
(a prompt-only view) falls back to its last token.
"""

PaddingSide = Literal["left", "right"]


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size``, longest first.

    Sorting by length keeps padding small; ties keep index order, so the plan is a pure
    function of the lengths (a rerun or another worker builds the same batches).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass(frozen=True, kw_only=True)
class Batch:
    """A padded batch and, per sample, the tokens its captured row averages."""

    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = real token
    position_ids: torch.Tensor  # (B, T) long, 0 at each sample's first real token
    select: torch.Tensor  # (B, T) bool, the tokens of each sample's row

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return self.input_ids.numel()


def token_selection(seq: TokenSeq, position: Position) -> tuple[int, int]:
    """The ``[start, stop)`` token range of ``seq`` whose o_proj inputs make its row."""
    n = len(seq.ids)
    if position == "last_token" or not seq.has_response:
        return n - 1, n
    if position == "mean_response":
        return seq.response_start, n
    raise ValueError(f"unknown position {position!r}; use 'last_token' or 'mean_response'")


def pad_batch(seqs: Sequence[TokenSeq], *, pad_id: int, padding_side: PaddingSide,
              position: Position) -> Batch:
    """Pad ``seqs`` to the longest one on ``padding_side``; see :class:`Batch`."""
    if not seqs:
        raise ValueError("a batch needs at least one sequence")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(s.ids) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    select = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, s in enumerate(seqs):
        offset = width - len(s.ids) if padding_side == "left" else 0
        ids[b, offset:offset + len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
        mask[b, offset:offset + len(s.ids)] = 1
        start, stop = token_selection(s, position)
        select[b, offset + start:offset + stop] = True
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
    return Batch(input_ids=ids, attention_mask=mask, position_ids=positions, select=select)


def reduce_rows(x: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Per sample, the mean of ``x`` over its selected tokens, in float32.

    ``x`` (B, T, W), ``select`` (B, T) bool -> (B, W). A single selected token is copied
    exactly (no arithmetic), so a last-token row is bit-identical to the input it came from.
    """
    counts = select.sum(dim=1)  # (B,)
    if bool((counts == 0).any()):
        raise ValueError("every sample needs at least one selected token")
    x = x.float()
    if bool((counts == 1).all()):
        index = select.to(torch.long).argmax(dim=1)  # (B,) the selected token
        return x[torch.arange(x.shape[0], device=x.device), index]  # (B, W)
    weights = select.to(x.dtype) / counts.to(x.dtype)[:, None]  # (B, T)
    picked = torch.where(select[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.einsum("bt,btw->bw", weights, picked)  # (B, W)


@torch.no_grad()
def capture_batch(model: Any, batch: Batch) -> torch.Tensor:
    """One forward pass of the decoder; the o_proj input rows of every layer and sample.

    Returns float32 (L, B, H * d_head) on the CPU. Only the decoder runs, not the LM head:
    the logits are not needed, and at a 49k vocabulary they would cost a fifth of the time.
    """
    decoder = layout.decoder(model)
    modules = layout.o_proj_modules(model)
    device = decoder.embed_tokens.weight.device
    rows: list[torch.Tensor | None] = [None] * len(modules)
    select = batch.select.to(device)

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]  # (B, T, H * d_head)
            rows[layer] = reduce_rows(x, select.to(x.device)).cpu()  # (B, H * d_head)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        decoder(input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        raise RuntimeError(f"the forward pass never reached o_proj of layers {missing}")
    return torch.stack([r for r in rows if r is not None])  # (L, B, H * d_head)


def capture_sequences(model: Any, seqs: Sequence[TokenSeq], *, batch_size: int, pad_id: int,
                      padding_side: PaddingSide, position: Position) -> torch.Tensor:
    """Rows of every sequence, batched as :func:`plan_batches` says: (L, N, H * d_head)."""
    out: torch.Tensor | None = None
    for index in plan_batches([len(s.ids) for s in seqs], batch_size):
        batch = pad_batch([seqs[i] for i in index], pad_id=pad_id, padding_side=padding_side,
                          position=position)
        rows = capture_batch(model, batch)  # (L, B, W)
        if out is None:
            out = torch.empty(rows.shape[0], len(seqs), rows.shape[2], dtype=rows.dtype)
        out[:, torch.tensor(index)] = rows
    if out is None:
        raise ValueError("no sequences to capture")
    return out

"""Closed-form lost-component compensation: the math (the block driver is in
:mod:`recoup.stages.recovery.training_free`).

RestoreLCC adds a constant ``c_h`` to head ``h``'s slice of the ``o_proj`` input at every
token. The constant that minimises ``sum_t ||z_dense,t - (z_degraded,t + c)||^2`` over the
tokens is the mean shift ``c = mean_t (z_dense,t - z_degraded,t)``: bias correction, as in
data-free quantization. It is computed over *all* real tokens of the calibration sequences
(not only the last prompt token), with the degraded model fed the outputs of its already
compensated blocks, so each block's constant corrects what reaches it in the final model.

No gradient, no optimizer: one forward per block and model. Usable as a method alone
(``lcc-closed``) and as the start of trained compensation (``train.lcc.init: closed_form``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from recoup.stages.lcc.compensation import HeadId
from recoup.stages.lcc.heads import split_heads


def head_shift_sum(z_dense: Tensor, z_degraded: Tensor, keep: Tensor, n_heads: int) -> Tensor:
    """Sum over the kept tokens of ``z_dense - z_degraded`` per head: (n_heads, d_head) float64.

    ``z_dense``, ``z_degraded`` (..., n_heads * d_head) are the ``o_proj`` inputs of the same
    tokens; ``keep`` (...) bool marks real tokens (padding is False). Sums, so micro-batches
    add up; divide by the token count for the mean.
    """
    if z_dense.shape != z_degraded.shape or keep.shape != z_dense.shape[:-1]:
        raise ValueError(f"shapes do not fit: dense {tuple(z_dense.shape)}, degraded "
                         f"{tuple(z_degraded.shape)}, keep {tuple(keep.shape)}")
    delta = (z_dense.double() - z_degraded.double())[keep]  # (tokens, n_heads * d_head)
    return split_heads(delta, n_heads).sum(0)  # (tokens, n_heads, d_head) -> (n_heads, d_head)


def mean_shift(total: Tensor, tokens: int) -> Tensor:
    """The mean from :func:`head_shift_sum` sums: (n_heads, d_head) / tokens."""
    if tokens < 1:
        raise ValueError("no calibration tokens: the mean shift is undefined")
    return total / tokens


def full_vector(shift: Tensor, heads: Sequence[int]) -> Tensor:
    """(n_heads * d_head,): ``shift`` (n_heads, d_head) on ``heads``, zeros on the others;
    the vector added to the ``o_proj`` input."""
    n_heads, d_head = shift.shape
    keep = torch.zeros(n_heads, 1, dtype=shift.dtype, device=shift.device)
    keep[list(heads)] = 1
    return (shift * keep).reshape(n_heads * d_head)  # (n_heads, d_head) -> (n_heads * d_head,)


def components_of(layer: int, shift: Tensor, heads: Sequence[int]) -> dict[HeadId, Tensor]:
    """``{(layer, h): c_h}`` (d_head,) float32 on the CPU for ``heads`` of one layer."""
    return {(layer, int(h)): shift[h].float().cpu() for h in heads}


def identity_directions(heads: Sequence[HeadId], d_head: int) -> dict[HeadId, Tensor]:
    """``V = I`` for every head: ``c = V^T beta + b`` with ``beta = c`` reads the component
    directly (closed-form compensation needs no singular directions)."""
    eye = torch.eye(d_head)
    return {h: eye.clone() for h in heads}


def heads_by_layer(heads: Sequence[HeadId]) -> dict[int, tuple[int, ...]]:
    """(layer, head) pairs grouped by layer, heads ascending."""
    out: dict[int, list[int]] = {}
    for layer, head in sorted(set(heads)):
        out.setdefault(layer, []).append(head)
    return {layer: tuple(hs) for layer, hs in out.items()}


def all_heads(n_layers: int, n_heads: int) -> list[HeadId]:
    return [(layer, h) for layer in range(n_layers) for h in range(n_heads)]


def component_norms(components: Mapping[HeadId, Tensor]) -> dict[str, float]:
    """Largest and mean L2 norm of the components (for the stage's metrics)."""
    norms = torch.stack([c.norm() for c in components.values()]) if components else \
        torch.zeros(1)
    return {"max_norm": float(norms.max()), "mean_norm": float(norms.mean())}


__all__ = ("all_heads", "component_norms", "components_of", "full_vector", "head_shift_sum",
           "heads_by_layer", "identity_directions", "mean_shift")

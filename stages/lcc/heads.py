"""Heads of a Llama-family attention layer: naming, splitting and scoring them.

Heads are always named by ``HeadId = (layer, head)``. A flat index is ``layer * n_heads +
head``; the reference code decoded it with ``n_layers`` instead of ``n_heads``, which is
only right when the two are equal (and wrong for SmolLM2: 30 layers, 9 heads).

Pure: torch and the standard library only. The ``heads.json`` file that stores a
:class:`HeadScores` lives in :mod:`recoup.stages.lcc.heads_file`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

HeadId = tuple[int, int]
"""(layer, head), both zero-based. Never a flat index."""

_F64 = torch.float64


def split_heads(z: Tensor, n_heads: int) -> Tensor:
    """(N, n_heads * d_head) -> (N, n_heads, d_head), the layout of ``o_proj``'s input.

    Llama-family attention reshapes (B, T, n_heads, d_head) to (B, T, n_heads * d_head)
    before ``o_proj``, so head ``h`` owns columns ``h * d_head : (h + 1) * d_head``.
    """
    if z.ndim != 2:
        raise ValueError(f"split_heads expects (N, n_heads * d_head), got shape {tuple(z.shape)}")
    if n_heads < 1 or z.shape[1] % n_heads:
        raise ValueError(f"width {z.shape[1]} is not divisible by n_heads={n_heads}")
    n, width = z.shape
    return z.reshape(n, n_heads, width // n_heads)  # (N, n_heads, d_head)


def merge_heads(z: Tensor) -> Tensor:
    """(N, n_heads, d_head) -> (N, n_heads * d_head); the inverse of :func:`split_heads`."""
    if z.ndim != 3:
        raise ValueError(f"merge_heads expects (N, n_heads, d_head), got shape {tuple(z.shape)}")
    n, n_heads, d_head = z.shape
    return z.reshape(n, n_heads * d_head)  # (N, n_heads * d_head)


def flat_index(head: HeadId, n_heads: int) -> int:
    """(layer, head) -> ``layer * n_heads + head``, the row-major index of a (L, H) grid."""
    layer, h = head
    if not 0 <= h < n_heads or layer < 0:
        raise ValueError(f"head {head} is outside a grid with {n_heads} heads per layer")
    return layer * n_heads + h


def head_from_flat(index: int, n_heads: int) -> HeadId:
    """Row-major flat index -> (layer, head). Divides by ``n_heads``, never ``n_layers``."""
    if index < 0 or n_heads < 1:
        raise ValueError(f"bad flat index {index} or n_heads {n_heads}")
    return divmod(index, n_heads)


@dataclass(frozen=True, eq=False)
class HeadScores:
    """A score for every (layer, head); higher means more worth compensating.

    ``scores`` is (n_layers, n_heads), stored as a float64 CPU copy so that JSON records
    round-trip exactly. Rankings break ties by (layer, head) ascending, so a ranking is a
    function of the scores alone (the ``all`` selector gives every head the same score).
    """

    scores: Tensor  # (n_layers, n_heads)

    def __post_init__(self) -> None:
        if self.scores.ndim != 2 or 0 in self.scores.shape:
            raise ValueError(
                f"HeadScores needs a non-empty (n_layers, n_heads) tensor, "
                f"got shape {tuple(self.scores.shape)}"
            )
        scores = self.scores.detach().to(device="cpu", dtype=_F64).clone()
        if not torch.isfinite(scores).all():
            bad = [
                head_from_flat(int(i), scores.shape[1])
                for i in torch.nonzero(~torch.isfinite(scores.reshape(-1))).flatten()
            ]
            raise ValueError(f"head scores must be finite; not finite at {bad[:5]}")
        object.__setattr__(self, "scores", scores)

    @property
    def n_layers(self) -> int:
        return int(self.scores.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores.shape[1])

    def score(self, head: HeadId) -> float:
        layer, h = head
        return float(self.scores[layer, h])

    def ranked(self) -> list[HeadId]:
        """Every head, best first; ties by (layer, head) ascending."""
        values = self.scores.tolist()
        heads = [(layer, h) for layer in range(self.n_layers) for h in range(self.n_heads)]
        return sorted(heads, key=lambda lh: (-values[lh[0]][lh[1]], lh[0], lh[1]))

    def top(self, fraction: float | None = None, count: int | None = None) -> list[HeadId]:
        """The best heads, by ``count`` or by ``fraction`` of all heads (give exactly one).

        A fraction becomes ``max(1, round_half_up(fraction * n_heads_total))`` heads.
        """
        total = self.n_layers * self.n_heads
        if (fraction is None) == (count is None):
            raise ValueError("give exactly one of fraction or count")
        if fraction is not None:
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"fraction must be in (0, 1], got {fraction}")
            count = max(1, math.floor(fraction * total + 0.5))
        assert count is not None
        if not 1 <= count <= total:
            raise ValueError(f"count must be between 1 and the {total} heads, got {count}")
        return self.ranked()[:count]

    def to_records(self) -> list[dict[str, Any]]:
        """JSON-ready ``[{"layer", "head", "score"}, ...]`` in (layer, head) order."""
        values = self.scores.tolist()
        return [
            {"layer": layer, "head": h, "score": values[layer][h]}
            for layer in range(self.n_layers)
            for h in range(self.n_heads)
        ]

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> HeadScores:
        """Inverse of :meth:`to_records`; the records must cover a full (L, H) grid once."""
        cells: dict[HeadId, float] = {}
        for rec in records:
            key = (int(rec["layer"]), int(rec["head"]))
            if key in cells:
                raise ValueError(f"head {key} appears twice in the score records")
            cells[key] = float(rec["score"])
        if not cells:
            raise ValueError("no head score records")
        n_layers = 1 + max(layer for layer, _ in cells)
        n_heads = 1 + max(h for _, h in cells)
        if min(min(k) for k in cells) < 0 or len(cells) != n_layers * n_heads:
            raise ValueError(
                f"score records do not cover a full {n_layers} x {n_heads} grid "
                f"({len(cells)} records)"
            )
        scores = torch.empty(n_layers, n_heads, dtype=_F64)
        for (layer, h), value in cells.items():
            scores[layer, h] = value
        return cls(scores)

    @classmethod
    def from_flat(cls, flat: Tensor, n_heads: int) -> HeadScores:
        """(n_layers * n_heads,) row-major -> HeadScores (n_layers, n_heads)."""
        if flat.ndim != 1 or n_heads < 1 or flat.numel() % n_heads:
            raise ValueError(f"cannot view {tuple(flat.shape)} scores as rows of {n_heads} heads")
        return cls(flat.reshape(-1, n_heads))  # (n_layers, n_heads)

    def flat(self) -> Tensor:
        """(n_layers * n_heads,) row-major; entry ``flat_index((l, h), n_heads)`` is (l, h)."""
        return self.scores.reshape(-1)  # (n_layers * n_heads,)


__all__ = ("HeadId", "HeadScores", "flat_index", "head_from_flat", "merge_heads", "split_heads")

"""The directions in which a head's activations moved, and the mean shift along them.

Notation (DESIGN.md section 4): ``z`` is the input of ``self_attn.o_proj`` at the last
prompt token, split per head into ``d_head`` vectors. For one (layer, head):

- ``delta`` (N, d_head) = z_dense(q) - z_degraded(q), not centred.
- ``svd_directions(delta) -> (V, S)``: all ``d_head`` right singular vectors as rows of
  ``V`` and the singular values ``S``, descending.
- the lost component ``c = sum_{i<k} mean(U_i) S_i V_i`` with ``U = delta V^T / S``.
  Since ``mean(U_i) S_i = mean(delta) . V_i``, ``c`` is the projection of the mean shift
  onto the top-k directions; with every direction it is exactly ``delta.mean(0)``.

Pure: torch and the standard library only.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_TOP_K_DIRECTIONS = 10
"""Directions summed into the lost component for probing (the paper's K)."""

_F64 = torch.float64


def svd_directions(delta: Tensor) -> tuple[Tensor, Tensor]:
    """Right singular vectors and singular values of ``delta`` (N, d_head), not centred.

    Returns ``V`` (d_head, d_head) whose rows are orthonormal right singular vectors sorted
    by singular value, and ``S`` (min(N, d_head),) descending. All ``d_head`` directions
    are kept even when N < d_head (the rows past N span the null space of ``delta``), so
    the compensation ``V^T beta + b`` always has a full basis. Computed in float64 and
    cast back to ``delta``'s dtype.

    Sign convention: each row of ``V`` is flipped so that its largest-magnitude entry is
    positive. Singular vectors are only defined up to sign, and which sign LAPACK returns
    depends on the BLAS build, thread count and device; without a convention two workers
    (or a rerun) would write different ``V`` for the same data, changing the svd stage's
    checksums and, worse, the meaning of a trained ``beta`` (``c = V^T beta + b``) if ``V``
    were ever recomputed. Directions with equal singular values (and the null space) are
    still only defined up to rotation; no sign rule can fix that.
    """
    if delta.ndim != 2 or 0 in delta.shape:
        raise ValueError(f"delta must be a non-empty (N, d_head) matrix, got {tuple(delta.shape)}")
    n, d_head = delta.shape
    x = delta.detach().to(_F64)
    # The full V needs full_matrices only when N < d_head; otherwise it would build an
    # (N, N) U for nothing.
    _, s, vh = torch.linalg.svd(x, full_matrices=n < d_head)  # vh: (d_head, d_head)
    pivot = vh.abs().argmax(dim=1, keepdim=True)  # (d_head, 1)
    signs = torch.sign(vh.gather(1, pivot))  # (d_head, 1)
    signs[signs == 0] = 1.0
    vh = vh * signs
    return vh.to(delta.dtype), s.to(delta.dtype)


def _effective_rank(s: Tensor, n: int, d_head: int, eps: float) -> int:
    """Singular values above numpy's ``matrix_rank`` tolerance count; the rest are zero.

    ``eps`` is the machine epsilon of the dtype ``S`` was stored in, since a float32 S
    carries float32 rounding even after conversion to float64.
    """
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    tol = float(s[0]) * max(n, d_head) * eps
    return int((s > tol).sum())


def lost_component(delta: Tensor, V: Tensor, S: Tensor, k: int) -> Tensor:
    """The mean shift the degraded model lost, kept to the top-``k`` directions: (d_head,).

    ``c = sum_{i<k} mean(U_i) * S_i * V_i`` with ``U = delta V^T / S`` (the reference
    definition). Because ``mean(U_i) * S_i = mean(delta) . V_i``, this is computed as the
    projection of ``delta.mean(0)`` onto the first ``k`` rows of ``V``: no division, so a
    zero singular value cannot produce NaN. Directions whose singular value is zero (or
    that have none, i >= N) contribute nothing, as in the reference. ``k`` larger than
    ``d_head`` means all directions, and then ``c == delta.mean(0)``. The result does not
    depend on the signs of ``V``'s rows.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be (N, d_head), got {tuple(delta.shape)}")
    n, d_head = delta.shape
    if V.shape != (d_head, d_head):
        raise ValueError(
            f"V must be ({d_head}, {d_head}) for delta {tuple(delta.shape)}, got {tuple(V.shape)}"
        )
    if S.shape != (min(n, d_head),):
        raise ValueError(
            f"S must be ({min(n, d_head)},) for delta {tuple(delta.shape)}, got {tuple(S.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    s = S.detach().to(_F64)
    eps = torch.finfo(S.dtype).eps if S.dtype.is_floating_point else torch.finfo(_F64).eps
    k_eff = min(k, _effective_rank(s, n, d_head, eps))
    if k_eff == 0:
        return torch.zeros(d_head, dtype=delta.dtype, device=delta.device)
    v_k = V.detach().to(_F64)[:k_eff]  # (k, d_head)
    mean_shift = delta.detach().to(_F64).mean(dim=0)  # (d_head,)
    coeff = v_k @ mean_shift  # (k,) = mean(U_i) * S_i
    return (coeff @ v_k).to(delta.dtype)  # (d_head,)


__all__ = ("DEFAULT_TOP_K_DIRECTIONS", "lost_component", "svd_directions")

"""EoRA: training-free low-rank compensation of a compressed linear (the math).

Liu et al. (NVlabs, 2024), "EoRA: Training-free Compensation for Compressed LLM with
Eigenspace Low-Rank Approximation". For a linear with dense weight ``W`` (out, in),
compressed ``W_hat`` and inputs ``X`` (tokens, in), the rank-r correction ``B A`` that
matters minimises the error on the *outputs*, ``||(Delta W - B A) X^T||_F`` with
``Delta W = W - W_hat``, not the error on the weights. With ``C = X^T X = Q Lambda Q^T``,
``||M X^T||_F^2 = ||M Q Lambda^{1/2}||_F^2``, so in the eigenspace the problem is a plain
truncated SVD (Eckart-Young):

    Delta W' = Delta W Q Lambda^{1/2} = U Sigma V^T,
    B = U_r Sigma_r,   A = V_r^T Lambda^{-1/2} Q^T,

and ``B A`` is the best rank-r correction in the activation-weighted norm; at full rank it
is ``Delta W`` itself. Eigen-directions with a (near) zero eigenvalue carry no input, so they
are dropped (``Lambda^{-1/2}`` would blow up there and the error does not see them).

The driver that feeds ``C`` block by block is :mod:`recoup.stages.recovery.training_free`;
the factors become a peft adapter (:func:`peft_factors`) for the ``eora`` method or the
start of trained LoRA (``train.lora.init: eora``). Pure torch, float64 for the
decompositions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

EIG_RTOL = 1e-10
"""Eigenvalues of ``C`` below ``EIG_RTOL * max eigenvalue`` are treated as zero (dropped)."""


@dataclass(frozen=True)
class Eigenbasis:
    """The kept eigen-directions of one input covariance: ``Q`` (in, k) and ``sqrt_lam``
    (k,), float64. Linears that read the same input (q/k/v, gate/up) share one, so the
    ``eigh`` (the expensive part: seconds for a 1536-wide ``down_proj`` input on a CPU) runs
    once per input, not once per linear."""

    Q: Tensor
    sqrt_lam: Tensor


def eigenbasis(cov: Tensor, *, eig_rtol: float = EIG_RTOL) -> Eigenbasis:
    """``C = Q Lambda Q^T`` with directions below ``eig_rtol * max eigenvalue`` dropped."""
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"eora needs a square input covariance, got {tuple(cov.shape)}")
    C = cov.double()
    C = (C + C.T) / 2  # symmetric up to rounding of the accumulation
    lam, Q = torch.linalg.eigh(C)  # ascending; Q (in, in)
    top = float(lam.max()) if lam.numel() else 0.0
    if top <= 0:
        raise ValueError("the input covariance is zero: the linear saw no input")
    keep = lam > eig_rtol * top
    return Eigenbasis(Q=Q[:, keep], sqrt_lam=lam[keep].sqrt())  # (in, k), (k,)


def factors_in(delta: Tensor, basis: Eigenbasis, rank: int) -> tuple[Tensor, Tensor]:
    """(B (out, rank), A (rank, in)) float64 minimising ``||(delta - B A) X^T||_F`` for the
    inputs whose covariance gave ``basis``. When fewer than ``rank`` directions carry
    signal, the remaining columns of ``B`` and rows of ``A`` are 0."""
    if delta.ndim != 2 or basis.Q.shape[0] != delta.shape[1]:
        raise ValueError(f"eora needs delta (out, in) matching the covariance's {basis.Q.shape[0]} "
                         f"inputs; got {tuple(delta.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    Q, sqrt_lam = basis.Q, basis.sqrt_lam
    projected = (delta.double() @ Q) * sqrt_lam  # Delta W Q Lambda^{1/2}: (out, k)
    U, S, Vh = torch.linalg.svd(projected, full_matrices=False)  # (out, m), (m,), (m, k)
    r = min(rank, S.numel())
    B = U[:, :r] * S[:r]  # (out, r)
    A = (Vh[:r] / sqrt_lam) @ Q.T  # V_r^T Lambda^{-1/2} Q^T: (r, in)
    if r < rank:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)
    return B, A


def eora_factors(delta: Tensor, cov: Tensor, rank: int, *, eig_rtol: float = EIG_RTOL,
                 ) -> tuple[Tensor, Tensor]:
    """(B (out, rank), A (rank, in)) float64 minimising ``||(delta - B A) X^T||_F``.

    ``delta`` (out, in) is ``W - W_hat``; ``cov`` (in, in) is ``X^T X`` of the linear's
    inputs (any positive scale: the result does not depend on it). When fewer than
    ``rank`` directions carry signal, the remaining columns of ``B`` and rows of ``A`` are 0.
    """
    if delta.ndim != 2 or cov.shape != (delta.shape[1], delta.shape[1]):
        raise ValueError(f"eora needs delta (out, in) and cov (in, in); got "
                         f"{tuple(delta.shape)} and {tuple(cov.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    return factors_in(delta, eigenbasis(cov, eig_rtol=eig_rtol), rank)


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Plain rank-r truncated SVD of ``delta`` (the baseline EoRA improves on): B, A."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank]


def weighted_error(delta: Tensor, B: Tensor, A: Tensor, cov: Tensor) -> float:
    """``||(delta - B A) X^T||_F^2 = tr(E C E^T)`` with ``E = delta - B A``, ``C = X^T X``."""
    E = delta.double() - B.double() @ A.double()  # (out, in)
    return float(((E @ cov.double()) * E).sum())


def peft_factors(B: Tensor, A: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """peft's ``(lora_A (r, in), lora_B (out, r))`` with ``scale * lora_B @ lora_A == B @ A``.

    peft scales its update by ``alpha / r``; dividing it out keeps the product. Each rank
    component is also balanced (equal norms in ``lora_A`` and ``lora_B``), which leaves the
    product unchanged and gives both factors gradients of a useful size when LoRA trains
    from here (``B = U Sigma`` alone would put all the scale in ``lora_B``).
    """
    if scale <= 0:
        raise ValueError(f"LoRA scale must be positive, got {scale}")
    nb = B.double().norm(dim=0)  # (r,)
    na = A.double().norm(dim=1)  # (r,)
    d = torch.where((nb > 0) & (na > 0), (nb / na.clamp_min(1e-300)).sqrt(),
                    torch.ones_like(nb))
    root = scale ** 0.5
    return (A.double() * d[:, None] / root, B.double() / d / root)


__all__ = ("EIG_RTOL", "Eigenbasis", "eigenbasis", "eora_factors", "factors_in", "peft_factors",
           "svd_factors", "weighted_error")

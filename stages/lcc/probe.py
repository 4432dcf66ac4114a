"""The contrastive probe: can a head's activations tell the right response from a wrong one?

The probe reads ``concat[z_degraded(q) + c, z_dense(q + r)]`` and tells r+ (label 1) from
r- (label 0) with an L2-regularised logistic regression; a head's score is its held-out
accuracy. Pure: torch and the standard library only; every setting is an argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_TRAIN_FRACTION = 0.7
"""Probe train share of the samples (the reference's 70/30 split)."""
DEFAULT_PROBE_STEPS = 100
"""Most Newton iterations per probe; convergence usually takes under 15."""
DEFAULT_PROBE_L2 = 1e-2
"""L2 penalty on the probe weights (not the bias), on standardised features, per sample."""
_PROBE_GRAD_TOL = 1e-10
"""Gradient norm at which a probe fit counts as converged."""

_F64 = torch.float64


def probe_features(z_degraded_q: Tensor, c: Tensor, z_dense_qr: Tensor) -> Tensor:
    """``concat[z_degraded(q) + c, z_dense(q + r)]``: (N, d_head) x2 and (d_head,) -> (N, 2 d_head).

    The first half is the same for a sample's r+ and r-; the probe can only use it as a
    per-sample reference point for reading the second half.
    """
    if z_degraded_q.ndim != 2 or z_degraded_q.shape != z_dense_qr.shape:
        raise ValueError(
            f"z_degraded_q {tuple(z_degraded_q.shape)} and z_dense_qr "
            f"{tuple(z_dense_qr.shape)} must both be (N, d_head)"
        )
    if c.shape != (z_degraded_q.shape[1],):
        raise ValueError(f"c must be ({z_degraded_q.shape[1]},), got {tuple(c.shape)}")
    return torch.cat([z_degraded_q + c, z_dense_qr], dim=1)  # (N, 2 * d_head)


def split_samples(n_samples: int, train_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split of sample indices into (train, held-out), both non-empty and sorted.

    The same ``seed`` gives the same split for every head and layer, so head scores are
    accuracies on the same held-out samples and compare fairly.
    """
    n_train = round(train_fraction * n_samples)
    if not 1 <= n_train <= n_samples - 1:
        raise ValueError(
            f"train_fraction={train_fraction} of {n_samples} samples leaves an empty side; "
            "the probe needs at least 2 samples"
        )
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_samples, generator=gen)
    return perm[:n_train].sort().values, perm[n_train:].sort().values


def _logistic_loss(xa: Tensor, y: Tensor, theta: Tensor, reg: Tensor) -> Tensor:
    z = xa @ theta
    return torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * (reg * theta**2).sum()


def fit_logistic(x: Tensor, y: Tensor, *, l2: float, steps: int) -> Tensor:
    """L2-regularised logistic regression by damped Newton steps: returns ``[w, b]`` (F + 1,).

    Minimises ``mean(BCE) + l2 / 2 * |w|^2`` (bias unpenalised) over ``x`` (n, F), ``y`` in
    {0, 1}. The problem is strictly convex for ``l2 > 0``, so Newton with backtracking finds
    its unique optimum: the fit is deterministic and does not depend on a learning rate or
    an iteration budget the way the reference's 200 Adam steps did.
    """
    if l2 <= 0:
        raise ValueError(f"l2 must be positive for a unique probe fit, got {l2}")
    n, f = x.shape
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)  # (n, F + 1)
    reg = torch.full((f + 1,), l2, dtype=x.dtype)
    reg[-1] = 0.0
    theta = torch.zeros(f + 1, dtype=x.dtype)
    eye = torch.eye(f + 1, dtype=x.dtype)
    for _ in range(steps):
        p = torch.sigmoid(xa @ theta)  # (n,)
        grad = xa.T @ (p - y) / n + reg * theta  # (F + 1,)
        if float(grad.norm()) < _PROBE_GRAD_TOL:
            break
        hess = (xa.T * (p * (1 - p))) @ xa / n + torch.diag(reg) + 1e-12 * eye
        direction = torch.linalg.solve(hess, grad)
        loss0 = _logistic_loss(xa, y, theta, reg)
        slope = float(grad @ direction)
        t = 1.0
        while True:
            candidate = theta - t * direction
            if _logistic_loss(xa, y, candidate, reg) <= loss0 - 1e-4 * t * slope:
                break
            t *= 0.5
            if t < 1e-10:  # no descent left at machine precision: this is the optimum
                return theta
        theta = candidate
    return theta


def probe_accuracy(
    X_pos: Tensor,
    X_neg: Tensor,
    *,
    seed: int,
    train_fraction: float = DEFAULT_TRAIN_FRACTION,
    steps: int = DEFAULT_PROBE_STEPS,
    l2: float = DEFAULT_PROBE_L2,
) -> float:
    """Held-out accuracy of a logistic probe telling positives (label 1) from negatives (0).

    Row ``i`` of ``X_pos`` and of ``X_neg`` (both (N, F)) come from the same sample. The
    split is by sample, so a sample's positive and negative land on the same side: they
    share the prompt (and here the whole first half of the features), and splitting them
    would let the probe score by recognising the prompt, not the response (leakage).
    Features are standardised with train statistics only; constant features become zero.
    A logit of exactly 0 counts as positive.
    """
    if X_pos.ndim != 2 or X_pos.shape != X_neg.shape:
        raise ValueError(
            f"X_pos {tuple(X_pos.shape)} and X_neg {tuple(X_neg.shape)} must be equal (N, F)"
        )
    train, held = split_samples(X_pos.shape[0], train_fraction, seed)
    pos, neg = X_pos.detach().to(_F64), X_neg.detach().to(_F64)

    def stack(idx: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.cat([pos[idx], neg[idx]], dim=0)  # (2 n, F)
        y = torch.cat([torch.ones(len(idx), dtype=_F64), torch.zeros(len(idx), dtype=_F64)])
        return x, y

    x_train, y_train = stack(train)
    x_held, y_held = stack(held)
    mu = x_train.mean(dim=0)
    sd = x_train.std(dim=0, unbiased=False)
    sd = torch.where(sd > torch.finfo(_F64).eps * mu.abs().clamp_min(1.0), sd, torch.ones_like(sd))
    theta = fit_logistic((x_train - mu) / sd, y_train, l2=l2, steps=steps)
    logits = ((x_held - mu) / sd) @ theta[:-1] + theta[-1]
    return float(((logits >= 0).to(_F64) == y_held).to(_F64).mean())


__all__ = (
    "DEFAULT_PROBE_L2",
    "DEFAULT_PROBE_STEPS",
    "DEFAULT_TRAIN_FRACTION",
    "fit_logistic",
    "probe_accuracy",
    "probe_features",
    "split_samples",
)

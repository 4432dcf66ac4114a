"""Pruning and fake-quantization math for the `degrade` stage.

Pure tensor functions: no I/O, no model code. Every weight matrix follows the
`torch.nn.Linear` layout, shape (out_features, in_features); "rows" are output
channels and "columns" are input channels. Masks are boolean KEEP masks the shape
of the weight (True = the weight stays, False = it is set to zero).

The block-by-block driver that feeds these functions with calibration statistics
lives in `recoup.stages.compress.blockwise`.
"""

from __future__ import annotations

import torch

# Statistics are summed over every calibration token (up to millions of rows). float64
# keeps the running sum of squares / outer products exact to ~1e-16 relative, where a
# float32 sum drifts by ~sqrt(n_tokens) * 6e-8 and can make a near-singular Hessian
# indefinite. The memory is small next to one block's weights except for the widest
# layer (a 13824-wide Hessian is 1.5 GB in float64); pass float32 where that matters.
DEFAULT_STAT_DTYPE = torch.float64

# SparseGPT defaults from the paper and its reference code.
DEFAULT_SPARSEGPT_BLOCKSIZE = 128
DEFAULT_PERCDAMP = 0.01

MIN_BITS = 2
MAX_BITS = 8


# ----------------------------------------------------------------------------- validation


def _check_matrix(W: torch.Tensor, what: str = "weight") -> None:
    if W.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D (out_features, in_features) matrix, got shape {tuple(W.shape)}."
        )


def check_sparsity(sparsity: float) -> None:
    """Raise ValueError unless 0 < sparsity < 1."""
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity must be strictly between 0 and 1, got {sparsity}.")


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """Raise ValueError unless n:m is a valid pattern (and tiles in_features, when given)."""
    if m < 1 or n < 1:
        raise ValueError(f"N:M needs positive n and m, got n={n}, m={m}.")
    if n >= m:
        raise ValueError(f"N:M keeps n of every m weights, so n must be below m; got {n}:{m}.")
    if in_features is not None and in_features % m != 0:
        raise ValueError(
            f"in_features={in_features} is not divisible by m={m}, so {n}:{m} groups do not tile "
            "the rows."
        )


def check_bits(bits: int) -> None:
    """Raise ValueError unless MIN_BITS <= bits <= MAX_BITS."""
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be between {MIN_BITS} and {MAX_BITS}, got {bits}.")


def _pruned_count(total: int, sparsity: float) -> int:
    """Number of weights to prune out of `total`: the nearest whole number to total*sparsity.

    Rounding (not flooring) keeps e.g. 0.29 * 100 = 28.999... at 29.
    """
    return round(total * sparsity)


# ----------------------------------------------------------------------------- scores


def magnitude_scores(W: torch.Tensor) -> torch.Tensor:
    """|W|: the importance used by magnitude pruning. Returned in float32."""
    _check_matrix(W)
    return W.float().abs()


def wanda_scores(W: torch.Tensor, x_sq_sum: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Wanda importance |W_ij| * ||x_j||, returned in float32, shape of W.

    `x_sq_sum[j]` is the sum over calibration tokens of x_j^2 for input channel j, so
    ||x_j||_2 = sqrt(x_sq_sum[j]). We divide by `n_tokens` inside the root (an RMS rather
    than a norm) so the scores do not grow with the amount of calibration data; this is a
    positive constant factor for the whole matrix and leaves every mask unchanged.
    """
    _check_matrix(W)
    if x_sq_sum.shape != (W.shape[1],):
        raise ValueError(
            f"x_sq_sum must have one entry per input channel ({W.shape[1]}), "
            f"got shape {tuple(x_sq_sum.shape)}."
        )
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}.")
    x_rms = torch.sqrt(x_sq_sum.double() / n_tokens).float()  # (in,)
    return W.float().abs() * x_rms.unsqueeze(0)  # (out, in) * (1, in)


# ----------------------------------------------------------------------------- masks


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """KEEP mask that prunes the lowest-scoring weights.

    per_row=True (Wanda) prunes exactly round(in_features * sparsity) weights in every
    output row, so each row reaches the target; per_row=False (magnitude) ranks the whole
    matrix at once and prunes round(numel * sparsity) weights in total. The counts are exact
    even with tied scores (ties are broken by position via topk).
    """
    _check_matrix(scores, "scores")
    check_sparsity(sparsity)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if per_row:
        k = _pruned_count(scores.shape[1], sparsity)
        if k > 0:
            drop = torch.topk(scores, k, dim=1, largest=False).indices  # (out, k)
            keep.scatter_(1, drop, False)
        return keep
    k = _pruned_count(scores.numel(), sparsity)
    if k > 0:
        drop = torch.topk(scores.flatten(), k, largest=False).indices  # (k,)
        keep.view(-1)[drop] = False
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """KEEP mask with exactly n kept weights in every group of m consecutive input columns.

    "2:4" keeps the 2 highest-scoring of each 4 (50% sparsity, the Ampere sparse-tensor-core
    pattern); "4:8" keeps 4 of 8.
    """
    _check_matrix(scores, "scores")
    out_features, in_features = scores.shape
    check_nm(n, m, in_features)
    grouped = scores.reshape(out_features, in_features // m, m)  # (out, in/m, m)
    top = torch.topk(grouped, n, dim=-1).indices  # (out, in/m, n)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, top, True)
    return keep.reshape(out_features, in_features)  # (out, in)


def sparsity_of(W: torch.Tensor) -> float:
    """Fraction of exactly-zero entries."""
    return float((W == 0).sum().item()) / W.numel()


def nm_valid(W: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of m consecutive input columns holds at most n nonzeros."""
    _check_matrix(W)
    out_features, in_features = W.shape
    check_nm(n, m, in_features)
    nonzero = (W != 0).reshape(out_features, in_features // m, m)  # (out, in/m, m)
    return bool((nonzero.sum(dim=-1) <= n).all().item())


# ----------------------------------------------------------------------------- statistics


class InputNormAccumulator:
    """Running per-input-channel sum of squares for Wanda.

    Feed it the inputs of one linear layer, batch by batch, in any leading shape
    (..., in_features); it keeps sum_t x_tj^2 and the token count in `dtype`.
    """

    def __init__(
        self,
        in_features: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = DEFAULT_STAT_DTYPE,
    ) -> None:
        self.sq_sum = torch.zeros(in_features, device=device, dtype=dtype)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.sq_sum.shape[0]:
            raise ValueError(
                f"expected inputs with {self.sq_sum.shape[0]} features, got {x.shape[-1]}."
            )
        flat = x.reshape(-1, x.shape[-1]).to(self.sq_sum.dtype)  # (tokens, in)
        self.sq_sum += flat.square().sum(dim=0)
        self.n_tokens += flat.shape[0]

    def nbytes(self) -> int:
        return self.sq_sum.numel() * self.sq_sum.element_size()


class HessianAccumulator:
    """Running H = 2/n X X^T over calibration tokens, for SparseGPT.

    X is (in_features, n_tokens); batches arrive as (..., in_features). We keep the raw
    sum X X^T and the token count and scale only in `hessian()`, so adding batches needs no
    rescaling of the running sum. See DEFAULT_STAT_DTYPE for why float64 is the default.
    """

    def __init__(
        self,
        in_features: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = DEFAULT_STAT_DTYPE,
    ) -> None:
        self.xxt = torch.zeros(in_features, in_features, device=device, dtype=dtype)
        self.n_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.xxt.shape[0]:
            raise ValueError(
                f"expected inputs with {self.xxt.shape[0]} features, got {x.shape[-1]}."
            )
        flat = x.reshape(-1, x.shape[-1]).to(self.xxt.dtype)  # (tokens, in)
        self.xxt.addmm_(flat.T, flat)  # (in, tokens) @ (tokens, in)
        self.n_tokens += flat.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n_tokens == 0:
            raise ValueError("HessianAccumulator has seen no tokens; add calibration inputs first.")
        return self.xxt * (2.0 / self.n_tokens)

    def nbytes(self) -> int:
        return self.xxt.numel() * self.xxt.element_size()


# ----------------------------------------------------------------------------- SparseGPT


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H), in float64.

    Float64 because it is a one-off O(d^3) step whose result drives every OBS update. Works
    on a private float64 copy in place and drops each intermediate as soon as the next one
    exists, so at most two (d, d) float64 matrices live at once (for d = 13824 each is 1.5 GB).
    """
    H64 = H.to(torch.float64, copy=True)  # (in, in)
    diag = H64.diagonal()
    diag.add_(percdamp * diag.mean())
    L, info = torch.linalg.cholesky_ex(H64)
    del H64, diag
    if int(info) != 0:
        raise ValueError(
            f"The damped Hessian is not positive definite (percdamp={percdamp}); raise percdamp "
            "or calibrate on more tokens."
        )
    H_inv = torch.cholesky_inverse(L)
    del L
    return torch.linalg.cholesky(H_inv, upper=True)


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    blocksize: int = DEFAULT_SPARSEGPT_BLOCKSIZE,
    percdamp: float = DEFAULT_PERCDAMP,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh, 2023): prune W and update the kept weights to
    compensate, minimising ||W X - W' X||^2 with H = 2/n X X^T.

    Give either `sparsity` (unstructured) or both `n` and `m` (keep n of every m
    consecutive input columns). Columns are processed left to right in blocks of
    `blocksize`; the mask is chosen adaptively by w^2 / [H^-1]_cc^2 (c the column's
    diagonal entry of the upper Cholesky factor of H^-1) from weights already updated by
    earlier columns: per block over all rows for unstructured (exact count
    round(rows * block_cols * sparsity)), per group of m columns for N:M.

    Input channels that never fired (zero diagonal in H) are treated like the reference:
    their diagonal is set to 1 and their weight column zeroed, so they are pruned first and
    never receive updates.

    Returns (W_new, keep_mask): W_new in W's dtype, zero wherever keep_mask is False
    (and also in dead columns). H is not modified.
    """
    _check_matrix(W)
    rows, cols = W.shape
    if H.shape != (cols, cols):
        raise ValueError(
            f"H must be ({cols}, {cols}) for a weight with {cols} inputs, got {tuple(H.shape)}."
        )
    nm = n is not None or m is not None
    if nm == (sparsity is not None):
        raise ValueError(
            "sparsegpt_prune needs either sparsity or both n and m, not both and not neither; "
            f"got sparsity={sparsity}, n={n}, m={m}."
        )
    if nm:
        if n is None or m is None:
            raise ValueError(f"N:M pruning needs both n and m, got n={n}, m={m}.")
        check_nm(n, m, cols)
        if blocksize % m != 0:
            raise ValueError(f"blocksize={blocksize} must be a multiple of m={m}.")
    elif sparsity is not None:
        check_sparsity(sparsity)
    if blocksize < 1:
        raise ValueError(f"blocksize must be at least 1, got {blocksize}.")
    if percdamp < 0:
        raise ValueError(f"percdamp must be non-negative, got {percdamp}.")

    dead = torch.diag(H) == 0  # (in,)
    if dead.any():
        H = H.clone()
        H[dead, dead] = 1
    work = W.detach().float().clone()  # (out, in), OBS arithmetic in float32 as the reference
    work[:, dead] = 0
    H_inv = _inverse_hessian_cholesky(H, percdamp).to(work.dtype)  # (in, in), upper triangular

    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = work[:, i1:i2].clone()  # (out, b)
        H_inv1 = H_inv[i1:i2, i1:i2]  # (b, b)
        d1 = torch.diag(H_inv1)  # (b,)
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        if sparsity is not None:
            keep1 = unstructured_mask(W1.square() / d1.square(), sparsity, per_row=False)
        for i in range(i2 - i1):
            if n is not None and m is not None and i % m == 0:
                group = W1[:, i : i + m].square() / d1[i : i + m].square()  # (out, m)
                keep1[:, i : i + m] = nm_mask(group, n, m)
            w = W1[:, i]  # (out,)
            q = torch.where(keep1[:, i], w, torch.zeros_like(w))
            Q1[:, i] = q
            err = (w - q) / d1[i]  # (out,)
            W1[:, i:] -= err.unsqueeze(1) @ H_inv1[i, i:].unsqueeze(0)  # (out, 1) @ (1, b - i)
            Err1[:, i] = err
        work[:, i1:i2] = Q1
        keep[:, i1:i2] = keep1
        work[:, i2:] -= Err1 @ H_inv[i1:i2, i2:]  # (out, b) @ (b, in - i2)
    return work.to(W.dtype), keep


# ----------------------------------------------------------------------------- RTN quantization


def rtn_fake_quantize(W: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Round-to-nearest asymmetric fake quantization: quantize and dequantize.

    Each group of `group_size` consecutive input columns of a row (the whole row when
    group_size is None or -1) gets scale = (max - min) / (2^bits - 1) and an integer zero
    point, with the range widened to include 0 (as GPTQ's quantizer does) so exact zeros,
    e.g. pruned weights, stay exactly zero. Every weight then moves by at most scale / 2.
    Arithmetic in float32; returns W's dtype and shape.
    """
    _check_matrix(W)
    check_bits(bits)
    rows, cols = W.shape
    if group_size is None or group_size == -1:
        group_size = cols
    if group_size < 1:
        raise ValueError(
            f"group_size={group_size} must be positive (or -1/None for one group per row)."
        )
    # in_features need not be a multiple of group_size (SmolLM2: 576 = 4.5 x 128): the
    # last group of each row is then shorter, as in GPTQ-style quantizers.
    full = cols - cols % group_size
    Wf = W.float()
    parts = []
    if full:
        parts.append(_rtn_groups(Wf[:, :full], bits, group_size))
    if full < cols:
        parts.append(_rtn_groups(Wf[:, full:], bits, cols - full))
    return torch.cat(parts, dim=1).to(W.dtype)  # (out, in)


def _rtn_groups(Wf: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN of a float32 (out, in) block whose in is a multiple of group_size."""
    rows, cols = Wf.shape
    max_q = 2**bits - 1
    grouped = Wf.reshape(rows, cols // group_size, group_size)  # (out, in/g, g)
    lo = grouped.amin(dim=-1, keepdim=True).clamp(max=0)  # (out, in/g, 1)
    hi = grouped.amax(dim=-1, keepdim=True).clamp(min=0)  # (out, in/g, 1)
    scale = (hi - lo) / max_q
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups stay zero
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(grouped / scale) + zero, 0, max_q)
    return ((q - zero) * scale).reshape(rows, cols)  # (out, in)

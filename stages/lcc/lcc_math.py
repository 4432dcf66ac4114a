"""The math of the ``svd`` and ``select`` stages: pure tensors in, tensors out.

Nothing here reads files, imports Ray or touches a model. The stages wrap these functions
with I/O and run one task per layer, so every per-layer result below depends only on that
layer's inputs and the config, never on which other layers were scored or in what order.

Notation (DESIGN.md section 4): ``z`` is the input of ``self_attn.o_proj`` at the last
prompt token, split per head into ``d_head`` vectors. For one (layer, head):

- ``delta`` (N, d_head) = z_dense(q) - z_degraded(q), not centred.
- ``svd_directions(delta) -> (V, S)``: all ``d_head`` right singular vectors as rows of
  ``V`` and the singular values ``S``, descending.
- the lost component ``c = sum_{i<k} mean(U_i) S_i V_i`` with ``U = delta V^T / S``.
  Since ``mean(U_i) S_i = mean(delta) . V_i``, ``c`` is the projection of the mean shift
  onto the top-k directions; with every direction it is exactly ``delta.mean(0)``.
- the probe reads ``concat[z_degraded(q) + c, z_dense(q + r)]`` and tells r+ from r-.

Heads are always named by ``HeadId = (layer, head)``. A flat index is ``layer * n_heads +
head``; the reference code decoded it with ``n_layers`` instead of ``n_heads``, which is
only right when the two are equal (and wrong for SmolLM2: 30 layers, 9 heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from recoup.orchestrator.config import StrictModel

HeadId = tuple[int, int]
"""(layer, head), both zero-based. Never a flat index."""

DEFAULT_TOP_K_DIRECTIONS = 10
"""Directions summed into the lost component for probing (the paper's K)."""
DEFAULT_TOP_FRACTION = 0.25
"""Share of heads compensated; the paper uses 10-25%."""
DEFAULT_TRAIN_FRACTION = 0.7
"""Probe train share of the samples (the reference's 70/30 split)."""
DEFAULT_PROBE_STEPS = 100
"""Most Newton iterations per probe; convergence usually takes under 15."""
DEFAULT_PROBE_L2 = 1e-2
"""L2 penalty on the probe weights (not the bias), on standardised features, per sample."""
_PROBE_GRAD_TOL = 1e-10
"""Gradient norm at which a probe fit counts as converged."""
_MIX_SEED = 1_000_003
"""Prime that mixes (seed, layer) into one generator seed for the random selector."""

_F64 = torch.float64


# --------------------------------------------------------------------------- heads


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


# --------------------------------------------------------------------------- svd


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


# --------------------------------------------------------------------------- probe


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


# --------------------------------------------------------------------------- config

EXTERNAL_SELECTORS: frozenset[str] = frozenset({"kl"})
"""Selector names the config accepts but this module does not register: ``kl`` needs the
models (it scores a head by how much compensating it moves the logits), so the select stage
dispatches it itself instead of through :func:`score_layer`."""


class SelectorConfig(StrictModel):
    """How the select stage scores heads and how many it keeps."""

    method: str = Field("probe", description="head selector: probe, mse, random, all or kl")
    top_k_directions: int = Field(
        DEFAULT_TOP_K_DIRECTIONS, ge=1, description="singular directions summed into c"
    )
    top_fraction: float | None = Field(
        DEFAULT_TOP_FRACTION, gt=0.0, le=1.0, description="share of heads kept"
    )
    top_count: int | None = Field(
        None, ge=1, description="number of heads kept; replaces top_fraction"
    )
    seed: int = Field(0, ge=0, description="seeds the probe split and the random selector")
    train_fraction: float = Field(
        DEFAULT_TRAIN_FRACTION, gt=0.0, lt=1.0, description="probe train share of samples"
    )
    probe_steps: int = Field(DEFAULT_PROBE_STEPS, ge=1, description="most Newton steps")
    probe_l2: float = Field(DEFAULT_PROBE_L2, gt=0.0, description="probe L2 on weights")

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        names = sorted(set(_SELECTORS) | EXTERNAL_SELECTORS)
        if value not in names:
            raise ValueError(f"method {value!r} is not a head selector; known: {', '.join(names)}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_size_rule(cls, data: Any) -> Any:
        """``top_count`` replaces the default ``top_fraction``; setting both is an error."""
        if isinstance(data, Mapping) and data.get("top_count") is not None:
            if data.get("top_fraction") is not None:
                raise ValueError("set top_fraction or top_count, not both")
            data = {**data, "top_fraction": None}
        return data

    @model_validator(mode="after")
    def _has_size_rule(self) -> SelectorConfig:
        if self.top_count is None and self.top_fraction is None:
            raise ValueError("set one of top_fraction or top_count")
        return self

    def choose(self, scores: HeadScores) -> list[HeadId]:
        """The heads to compensate: ``top_count`` if set, else ``top_fraction``."""
        if self.top_count is not None:
            return scores.top(count=self.top_count)
        return scores.top(fraction=self.top_fraction)


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True, eq=False)
class LayerInputs:
    """Everything a selector needs to score the heads of one layer.

    Activations are (N, n_heads, d_head) with row ``i`` the same sample in all four:
    ``z_dense_q`` / ``z_degraded_q`` on the prompt, ``z_dense_pos`` / ``z_dense_neg`` on
    the prompt followed by r+ / r-. ``V`` (n_heads, d_head, d_head) and ``S`` (n_heads,
    min(N_svd, d_head)) come from the svd stage, one :func:`svd_directions` per head.
    """

    layer: int
    z_dense_q: Tensor  # (N, n_heads, d_head)
    z_degraded_q: Tensor  # (N, n_heads, d_head)
    z_dense_pos: Tensor  # (N, n_heads, d_head)
    z_dense_neg: Tensor  # (N, n_heads, d_head)
    V: Tensor  # (n_heads, d_head, d_head)
    S: Tensor  # (n_heads, r)

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        shape = tuple(self.z_dense_q.shape)
        if len(shape) != 3 or 0 in shape:
            raise ValueError(
                f"layer {self.layer}: z_dense_q must be (N, n_heads, d_head), got {shape}"
            )
        for name in ("z_degraded_q", "z_dense_pos", "z_dense_neg"):
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"layer {self.layer}: {name} is {got}, z_dense_q is {shape}")
        _, n_heads, d_head = shape
        if tuple(self.V.shape) != (n_heads, d_head, d_head):
            raise ValueError(
                f"layer {self.layer}: V must be ({n_heads}, {d_head}, {d_head}), "
                f"got {tuple(self.V.shape)}"
            )
        if self.S.ndim != 2 or self.S.shape[0] != n_heads:
            raise ValueError(
                f"layer {self.layer}: S must be ({n_heads}, r), got {tuple(self.S.shape)}"
            )

    @property
    def n_heads(self) -> int:
        return int(self.z_dense_q.shape[1])

    def delta(self, head: int) -> Tensor:
        """(N, d_head) dense minus degraded on the prompt, float64."""
        return self.z_dense_q[:, head].to(_F64) - self.z_degraded_q[:, head].to(_F64)


@dataclass(frozen=True, eq=False)
class SelectorInputs:
    """The inputs of every layer, ``layers[i].layer == i``; all layers share n_heads."""

    layers: tuple[LayerInputs, ...]

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("SelectorInputs needs at least one layer")
        for i, item in enumerate(self.layers):
            if item.layer != i:
                raise ValueError(f"layers[{i}] holds layer {item.layer}; order them 0..L-1")
        heads = {item.n_heads for item in self.layers}
        if len(heads) != 1:
            raise ValueError(f"layers disagree on n_heads: {sorted(heads)}")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        return self.layers[0].n_heads


# --------------------------------------------------------------------------- selectors

LayerScorer = Callable[[LayerInputs, SelectorConfig], Tensor]
"""Scores the heads of one layer: (inputs, cfg) -> (n_heads,)."""

_SELECTORS: dict[str, LayerScorer] = {}


def register_selector(name: str) -> Callable[[LayerScorer], LayerScorer]:
    """Decorator that registers a layer scorer under ``name``; a name can be taken once."""

    def add(fn: LayerScorer) -> LayerScorer:
        if name in _SELECTORS:
            raise ValueError(f"head selector {name!r} is already registered")
        _SELECTORS[name] = fn
        return fn

    return add


def selector_names() -> tuple[str, ...]:
    return tuple(sorted(_SELECTORS))


def get_selector(name: str) -> LayerScorer:
    if name in _SELECTORS:
        return _SELECTORS[name]
    if name in EXTERNAL_SELECTORS:
        raise ValueError(f"head selector {name!r} needs the models; the select stage runs it")
    raise ValueError(f"unknown head selector {name!r}; known: {', '.join(selector_names())}")


def score_layer(layer_inputs: LayerInputs, cfg: SelectorConfig) -> Tensor:
    """Scores of one layer's heads under ``cfg.method``: (n_heads,) float64.

    The unit of work of the select stage (one Ray task per layer); it depends on this
    layer's inputs and ``cfg`` only.
    """
    scores = get_selector(cfg.method)(layer_inputs, cfg)
    if scores.shape != (layer_inputs.n_heads,):
        raise ValueError(
            f"selector {cfg.method!r} returned {tuple(scores.shape)} scores for "
            f"{layer_inputs.n_heads} heads"
        )
    return scores.to(_F64)


def assemble_scores(per_layer: Mapping[int, Tensor], n_layers: int) -> HeadScores:
    """Per-layer (n_heads,) scores keyed by layer index -> HeadScores (n_layers, n_heads)."""
    missing = sorted(set(range(n_layers)) - set(per_layer))
    extra = sorted(set(per_layer) - set(range(n_layers)))
    if missing or extra:
        raise ValueError(f"layer scores missing for {missing}, unexpected for {extra}")
    return HeadScores(torch.stack([per_layer[i].to(_F64) for i in range(n_layers)]))


def score_heads(inputs: SelectorInputs, cfg: SelectorConfig) -> HeadScores:
    """Scores of every head: :func:`score_layer` per layer, assembled by layer index."""
    per_layer = {item.layer: score_layer(item, cfg) for item in inputs.layers}
    return assemble_scores(per_layer, inputs.n_layers)


def _head_component(inputs: LayerInputs, head: int, k: int) -> tuple[Tensor, Tensor]:
    """(delta (N, d_head), c (d_head,)) for one head, float64."""
    delta = inputs.delta(head)
    c = lost_component(delta, inputs.V[head].to(_F64), inputs.S[head].to(_F64), k)
    return delta, c


@register_selector("probe")
def _score_probe(inputs: LayerInputs, cfg: SelectorConfig) -> Tensor:
    """Held-out accuracy of a contrastive probe per head (the paper's selector).

    Note: ``c`` is one constant vector per head, so it shifts the first feature half of
    every sample equally and the train-mean centring in :func:`probe_accuracy` removes it;
    with a linear probe the score does not depend on ``c`` (nor on ``top_k_directions``).
    It is kept so the features match the paper's definition.
    """
    scores = torch.empty(inputs.n_heads, dtype=_F64)
    for h in range(inputs.n_heads):
        _, c = _head_component(inputs, h, cfg.top_k_directions)
        z_deg = inputs.z_degraded_q[:, h].to(_F64)  # (N, d_head)
        x_pos = probe_features(z_deg, c, inputs.z_dense_pos[:, h].to(_F64))  # (N, 2 d_head)
        x_neg = probe_features(z_deg, c, inputs.z_dense_neg[:, h].to(_F64))  # (N, 2 d_head)
        scores[h] = probe_accuracy(
            x_pos,
            x_neg,
            seed=cfg.seed,
            train_fraction=cfg.train_fraction,
            steps=cfg.probe_steps,
            l2=cfg.probe_l2,
        )
    return scores


@register_selector("mse")
def _score_mse(inputs: LayerInputs, cfg: SelectorConfig) -> Tensor:
    """L2 norm of the lost component c per head: heads whose mean shifted most go first."""
    return torch.stack(
        [_head_component(inputs, h, cfg.top_k_directions)[1].norm() for h in range(inputs.n_heads)]
    )


@register_selector("random")
def _score_random(inputs: LayerInputs, cfg: SelectorConfig) -> Tensor:
    """Uniform scores from a generator seeded by (seed, layer), so order does not matter."""
    gen = torch.Generator().manual_seed((cfg.seed * _MIX_SEED + inputs.layer) % 2**63)
    return torch.rand(inputs.n_heads, generator=gen, dtype=_F64)


@register_selector("all")
def _score_all(inputs: LayerInputs, cfg: SelectorConfig) -> Tensor:
    """Every head scores 1 (rank ties go to (layer, head) order); use with top_fraction 1."""
    return torch.ones(inputs.n_heads, dtype=_F64)


__all__ = (
    "EXTERNAL_SELECTORS",
    "HeadId",
    "HeadScores",
    "LayerInputs",
    "LayerScorer",
    "SelectorConfig",
    "SelectorInputs",
    "assemble_scores",
    "fit_logistic",
    "flat_index",
    "get_selector",
    "head_from_flat",
    "lost_component",
    "merge_heads",
    "probe_accuracy",
    "probe_features",
    "register_selector",
    "score_heads",
    "score_layer",
    "selector_names",
    "split_heads",
    "split_samples",
    "svd_directions",
)

"""Degrade methods by name: what the block-by-block driver does to each linear.

A method maps (weight, input statistic, spec) to (new weight, KEEP mask or None); it is
one decorated function (``register_method``) on the one :class:`Registry`. The degrade
stage looks its ``degrade.method`` up here; the driver
(:mod:`recoup.stages.compress.blockwise`) calls the method on every linear of every
block. The math itself lives in :mod:`recoup.stages.compress.pruning`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from recoup.orchestrator.registry import Registry
from recoup.stages.compress.pruning import (
    DEFAULT_PERCDAMP,
    DEFAULT_SPARSEGPT_BLOCKSIZE,
    DEFAULT_STAT_DTYPE,
    HessianAccumulator,
    InputNormAccumulator,
    check_bits,
    check_nm,
    check_sparsity,
    magnitude_scores,
    nm_mask,
    rtn_fake_quantize,
    sparsegpt_prune,
    unstructured_mask,
    wanda_scores,
)


class InputStatistic(Protocol):
    """What a method accumulates from a linear layer's inputs (..., in_features)."""

    def add(self, x: torch.Tensor) -> None: ...

    def nbytes(self) -> int: ...


MethodKind = Literal["prune", "quantize"]
StatisticFactory = Callable[[int, torch.device, torch.dtype], InputStatistic]


@dataclass(frozen=True, kw_only=True)
class DegradeSpec:
    """What to do to every linear of every decoder block.

    Pruning methods (magnitude, wanda, sparsegpt) take either `sparsity` (unstructured,
    fraction of weights set to zero) or `n` and `m` (keep n of every m consecutive input
    weights, e.g. 2:4). Quantization (rtn) takes `bits` and `group_size` (input columns per
    scale; None or -1 = one scale per row). `blocksize`/`percdamp` are SparseGPT's column
    block width and Hessian damping (fraction of the mean diagonal); `stat_dtype` is the
    accumulation dtype of calibration statistics.
    """

    method: str
    sparsity: float | None = None
    n: int | None = None
    m: int | None = None
    bits: int | None = None
    group_size: int | None = None
    blocksize: int = DEFAULT_SPARSEGPT_BLOCKSIZE
    percdamp: float = DEFAULT_PERCDAMP
    stat_dtype: torch.dtype = DEFAULT_STAT_DTYPE

    def __post_init__(self) -> None:
        method = get_method(self.method)
        if method.kind == "prune":
            if self.bits is not None or self.group_size is not None:
                raise ValueError(
                    f"'{self.method}' prunes; bits={self.bits} and group_size={self.group_size} "
                    "belong to the quantization method 'rtn'."
                )
            has_nm = self.n is not None or self.m is not None
            if has_nm == (self.sparsity is not None):
                raise ValueError(
                    f"'{self.method}' needs either sparsity or n and m (N:M), exactly one of "
                    f"them; got sparsity={self.sparsity}, n={self.n}, m={self.m}."
                )
            if self.sparsity is not None:
                check_sparsity(self.sparsity)
            elif self.n is None or self.m is None:
                raise ValueError(f"N:M pruning needs both n and m, got n={self.n}, m={self.m}.")
            else:
                check_nm(self.n, self.m)
                if self.blocksize % self.m != 0:
                    raise ValueError(
                        f"blocksize={self.blocksize} must be a multiple of m={self.m} so that "
                        "SparseGPT's column blocks hold whole N:M groups."
                    )
            if self.blocksize < 1:
                raise ValueError(f"blocksize must be at least 1, got {self.blocksize}.")
            if self.percdamp < 0:
                raise ValueError(f"percdamp must be non-negative, got {self.percdamp}.")
        else:
            if self.bits is None:
                raise ValueError(f"'{self.method}' quantizes and needs bits (e.g. 8, 4 or 3).")
            check_bits(self.bits)
            if self.sparsity is not None or self.n is not None or self.m is not None:
                raise ValueError(
                    f"'{self.method}' quantizes; sparsity={self.sparsity}, n={self.n}, "
                    f"m={self.m} belong to the pruning methods."
                )


LinearFn = Callable[
    [torch.Tensor, InputStatistic | None, DegradeSpec], tuple[torch.Tensor, torch.Tensor | None]
]


@dataclass(frozen=True)
class DegradeMethod:
    """A registered method: its kind, the statistic it needs (None: no calibration) and the
    per-linear function (weight, statistic, spec) -> (new weight, KEEP mask or None)."""

    name: str
    kind: MethodKind
    statistic: StatisticFactory | None
    apply: LinearFn


_METHODS: Registry[DegradeMethod] = Registry(
    "degrade method", unknown="Unknown degrade method {name!r}; choose one of: {known}.")


def register_method(
    name: str, *, kind: MethodKind, statistic: StatisticFactory | None = None
) -> Callable[[LinearFn], LinearFn]:
    """Decorator registering a per-linear degrade function under `name`; refuses duplicates."""

    def decorator(fn: LinearFn) -> LinearFn:
        _METHODS.add(name, DegradeMethod(name=name, kind=kind, statistic=statistic, apply=fn))
        return fn

    return decorator


def available_methods() -> tuple[str, ...]:
    return _METHODS.names()


def get_method(name: str) -> DegradeMethod:
    return _METHODS.get(name)


# ----------------------------------------------------------------------------- methods


def _prune_mask(scores: torch.Tensor, spec: DegradeSpec, *, per_row: bool) -> torch.Tensor:
    if spec.n is not None and spec.m is not None:
        return nm_mask(scores, spec.n, spec.m)
    if spec.sparsity is None:
        raise ValueError(f"'{spec.method}' needs sparsity or n and m.")
    return unstructured_mask(scores, spec.sparsity, per_row=per_row)


def _norm_statistic(in_features: int, device: torch.device, dtype: torch.dtype) -> InputStatistic:
    return InputNormAccumulator(in_features, device=device, dtype=dtype)


def _hessian_statistic(
    in_features: int, device: torch.device, dtype: torch.dtype
) -> InputStatistic:
    return HessianAccumulator(in_features, device=device, dtype=dtype)


@register_method("magnitude", kind="prune")
def _magnitude(
    weight: torch.Tensor, stat: InputStatistic | None, spec: DegradeSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prune the smallest |W| over the whole matrix (or per N:M group)."""
    keep = _prune_mask(magnitude_scores(weight), spec, per_row=False)
    return weight * keep, keep


@register_method("wanda", kind="prune", statistic=_norm_statistic)
def _wanda(
    weight: torch.Tensor, stat: InputStatistic | None, spec: DegradeSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prune the smallest |W| * ||x|| within each output row (or per N:M group)."""
    if not isinstance(stat, InputNormAccumulator):
        raise TypeError(f"wanda needs an InputNormAccumulator, got {type(stat).__name__}.")
    keep = _prune_mask(wanda_scores(weight, stat.sq_sum, stat.n_tokens), spec, per_row=True)
    return weight * keep, keep


@register_method("sparsegpt", kind="prune", statistic=_hessian_statistic)
def _sparsegpt(
    weight: torch.Tensor, stat: InputStatistic | None, spec: DegradeSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OBS pruning with weight updates from the layer-input Hessian."""
    if not isinstance(stat, HessianAccumulator):
        raise TypeError(f"sparsegpt needs a HessianAccumulator, got {type(stat).__name__}.")
    return sparsegpt_prune(
        weight,
        stat.hessian(),
        sparsity=spec.sparsity,
        n=spec.n,
        m=spec.m,
        blocksize=spec.blocksize,
        percdamp=spec.percdamp,
    )


@register_method("rtn", kind="quantize")
def _rtn(
    weight: torch.Tensor, stat: InputStatistic | None, spec: DegradeSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest fake quantization; keeps no mask."""
    if spec.bits is None:
        raise ValueError("rtn needs bits.")
    return rtn_fake_quantize(weight, spec.bits, spec.group_size), None

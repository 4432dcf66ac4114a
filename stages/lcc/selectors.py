"""Head selectors: score every head of one layer, looked up by name.

A selector is a function ``(LayerInputs, ScoreParams) -> (n_heads,)`` registered on
:data:`SELECTORS`; adding one is one decorated function. Every per-layer result depends
only on that layer's inputs and the parameters, never on which other layers were scored or
in what order, so the select stage runs one task per layer. The settings arrive as a plain
frozen :class:`ScoreParams`; the pydantic config that fills it belongs to the select stage.

Selectors here: ``probe`` (the paper's contrastive probe), ``mse``, ``random``, ``all``
(ablations). The ``kl`` selector needs the models and lives with the select stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from recoup.orchestrator.registry import Registry
from recoup.stages.lcc.directions import DEFAULT_TOP_K_DIRECTIONS, lost_component
from recoup.stages.lcc.heads import HeadScores
from recoup.stages.lcc.probe import (
    DEFAULT_PROBE_L2,
    DEFAULT_PROBE_STEPS,
    DEFAULT_TRAIN_FRACTION,
    probe_accuracy,
    probe_features,
)

_MIX_SEED = 1_000_003
"""Prime that mixes (seed, layer) into one generator seed for the random selector."""

_F64 = torch.float64


@dataclass(frozen=True, kw_only=True)
class ScoreParams:
    """The settings a selector reads (the select stage's config fills them)."""

    #: singular directions summed into the lost component c
    top_k_directions: int = DEFAULT_TOP_K_DIRECTIONS
    #: seeds the probe split and the random selector
    seed: int = 0
    #: probe train share of the samples
    train_fraction: float = DEFAULT_TRAIN_FRACTION
    #: most Newton steps of a probe fit
    probe_steps: int = DEFAULT_PROBE_STEPS
    #: probe L2 on its weights
    probe_l2: float = DEFAULT_PROBE_L2


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

LayerScorer = Callable[[LayerInputs, ScoreParams], Tensor]
"""Scores the heads of one layer: (inputs, params) -> (n_heads,)."""

SELECTORS: Registry[LayerScorer] = Registry(
    "head selector",
    unknown="unknown head selector {name!r}; known: {known} (and kl, which needs the models: "
    "the select stage runs it)")


def register_selector(name: str) -> Callable[[LayerScorer], LayerScorer]:
    """Decorator that registers a layer scorer under ``name``; a name can be taken once."""

    def add(fn: LayerScorer) -> LayerScorer:
        return SELECTORS.add(name, fn)

    return add


def selector_names() -> tuple[str, ...]:
    return SELECTORS.names()


def get_selector(name: str) -> LayerScorer:
    return SELECTORS.get(name)


def score_layer(layer_inputs: LayerInputs, method: str, params: ScoreParams) -> Tensor:
    """Scores of one layer's heads under selector ``method``: (n_heads,) float64.

    The unit of work of the select stage (one Ray task per layer); it depends on this
    layer's inputs and ``params`` only.
    """
    scores = get_selector(method)(layer_inputs, params)
    if scores.shape != (layer_inputs.n_heads,):
        raise ValueError(
            f"selector {method!r} returned {tuple(scores.shape)} scores for "
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


def score_heads(inputs: SelectorInputs, method: str, params: ScoreParams) -> HeadScores:
    """Scores of every head: :func:`score_layer` per layer, assembled by layer index."""
    per_layer = {item.layer: score_layer(item, method, params) for item in inputs.layers}
    return assemble_scores(per_layer, inputs.n_layers)


def _head_component(inputs: LayerInputs, head: int, k: int) -> tuple[Tensor, Tensor]:
    """(delta (N, d_head), c (d_head,)) for one head, float64."""
    delta = inputs.delta(head)
    c = lost_component(delta, inputs.V[head].to(_F64), inputs.S[head].to(_F64), k)
    return delta, c


@register_selector("probe")
def _score_probe(inputs: LayerInputs, params: ScoreParams) -> Tensor:
    """Held-out accuracy of a contrastive probe per head (the paper's selector).

    Note: ``c`` is one constant vector per head, so it shifts the first feature half of
    every sample equally and the train-mean centring in :func:`probe_accuracy` removes it;
    with a linear probe the score does not depend on ``c`` (nor on ``top_k_directions``).
    It is kept so the features match the paper's definition.
    """
    scores = torch.empty(inputs.n_heads, dtype=_F64)
    for h in range(inputs.n_heads):
        _, c = _head_component(inputs, h, params.top_k_directions)
        z_deg = inputs.z_degraded_q[:, h].to(_F64)  # (N, d_head)
        x_pos = probe_features(z_deg, c, inputs.z_dense_pos[:, h].to(_F64))  # (N, 2 d_head)
        x_neg = probe_features(z_deg, c, inputs.z_dense_neg[:, h].to(_F64))  # (N, 2 d_head)
        scores[h] = probe_accuracy(
            x_pos,
            x_neg,
            seed=params.seed,
            train_fraction=params.train_fraction,
            steps=params.probe_steps,
            l2=params.probe_l2,
        )
    return scores


@register_selector("mse")
def _score_mse(inputs: LayerInputs, params: ScoreParams) -> Tensor:
    """L2 norm of the lost component c per head: heads whose mean shifted most go first."""
    k = params.top_k_directions
    return torch.stack([_head_component(inputs, h, k)[1].norm() for h in range(inputs.n_heads)])


@register_selector("random")
def _score_random(inputs: LayerInputs, params: ScoreParams) -> Tensor:
    """Uniform scores from a generator seeded by (seed, layer), so order does not matter."""
    gen = torch.Generator().manual_seed((params.seed * _MIX_SEED + inputs.layer) % 2**63)
    return torch.rand(inputs.n_heads, generator=gen, dtype=_F64)


@register_selector("all")
def _score_all(inputs: LayerInputs, params: ScoreParams) -> Tensor:
    """Every head scores 1 (rank ties go to (layer, head) order); use with top_fraction 1."""
    return torch.ones(inputs.n_heads, dtype=_F64)


__all__ = (
    "SELECTORS",
    "LayerInputs",
    "LayerScorer",
    "ScoreParams",
    "SelectorInputs",
    "assemble_scores",
    "get_selector",
    "register_selector",
    "score_heads",
    "score_layer",
    "selector_names",
)

"""Unit tests for the head selectors: planted heads, per-layer independence, the registry."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.lcc.directions import svd_directions
from recoup.stages.lcc.heads import HeadId, HeadScores
from recoup.stages.lcc.probe import probe_accuracy, probe_features
from recoup.stages.lcc.selectors import (
    LayerInputs,
    ScoreParams,
    SelectorInputs,
    assemble_scores,
    get_selector,
    register_selector,
    score_heads,
    score_layer,
)
from recoup.stages.select import SelectorConfig

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer_inputs(
    layer: int,
    z_deg: torch.Tensor,
    z_dense: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
) -> LayerInputs:
    """Bundles one layer's (N, H, d) activations with the SVD of their difference."""
    vs = [svd_directions(z_dense[:, h] - z_deg[:, h]) for h in range(z_dense.shape[1])]
    return LayerInputs(
        layer=layer,
        z_dense_q=z_dense,
        z_degraded_q=z_deg,
        z_dense_pos=z_pos,
        z_dense_neg=z_neg,
        V=torch.stack([v for v, _ in vs]),  # (H, d, d)
        S=torch.stack([s for _, s in vs]),  # (H, r)
    )


def _synthetic(
    n_layers: int = 4,
    n_heads: int = 6,
    d: int = 8,
    n: int = 200,
    planted: tuple[HeadId, ...] = ((0, 3), (2, 0), (3, 5)),
    seed: int = 0,
) -> tuple[SelectorInputs, torch.Tensor]:
    """Planted heads: r+ and r- move the dense activation by +/- s along a direction w on
    which z_dense(q) itself varies a lot, so z_dense(q + r) alone separates them poorly and
    the (compensated) degraded activation is needed as a reference. Other heads: noise.
    Every head's degraded activation misses a mean shift of planted size ``shift_norm``."""
    g = _gen(seed)
    shift_norm = torch.randperm(n_layers * n_heads, generator=g).to(F64).reshape(n_layers, n_heads)
    layers = []
    for layer in range(n_layers):
        z_deg = torch.randn(n, n_heads, d, generator=g, dtype=F64)  # (N, H, d)
        mu = torch.nn.functional.normalize(torch.randn(n_heads, d, generator=g, dtype=F64), dim=1)
        delta = 0.5 * shift_norm[layer][:, None] * mu + 0.05 * torch.randn(
            n, n_heads, d, generator=g, dtype=F64
        )
        z_dense = z_deg + delta  # (N, H, d)
        z_pos = torch.randn(n, n_heads, d, generator=g, dtype=F64)
        z_neg = torch.randn(n, n_heads, d, generator=g, dtype=F64)
        for pl, ph in planted:
            if pl != layer:
                continue
            w = torch.zeros(d, dtype=F64)
            w[0] = 1.0
            noise = 0.2 * torch.randn(2, n, d, generator=g, dtype=F64)
            z_pos[:, ph] = z_dense[:, ph] + 0.5 * w + noise[0]
            z_neg[:, ph] = z_dense[:, ph] - 0.5 * w + noise[1]
        layers.append(_layer_inputs(layer, z_deg, z_dense, z_pos, z_neg))
    return SelectorInputs(tuple(layers)), shift_norm


def test_probe_selector_finds_planted_heads() -> None:
    planted = ((0, 3), (2, 0), (3, 5))
    inputs, _ = _synthetic(planted=planted)
    scores = score_heads(inputs, "probe", ScoreParams())
    assert set(scores.top(count=3)) == set(planted)
    assert min(scores.score(h) for h in planted) > 0.9
    others = [h for h in scores.ranked() if h not in planted]
    assert max(scores.score(h) for h in others) < 0.75


def test_mse_selector_ranks_by_planted_shift() -> None:
    inputs, shift_norm = _synthetic(planted=())
    scores = score_heads(inputs, "mse", ScoreParams())
    expected = HeadScores(shift_norm).ranked()
    assert scores.ranked() == expected
    torch.testing.assert_close(scores.scores, 0.5 * shift_norm, rtol=0, atol=0.05)


@pytest.mark.parametrize("method", ["probe", "mse", "random", "all"])
def test_layers_scored_alone_in_any_order_match_all_together(method: str) -> None:
    inputs, _ = _synthetic(n=60)
    params = ScoreParams(seed=5)
    together = score_heads(inputs, method, params)
    per_layer = {i: score_layer(inputs.layers[i], method, params) for i in (3, 1, 0, 2)}
    alone = assemble_scores(per_layer, inputs.n_layers)
    assert torch.equal(alone.scores, together.scores)


def test_random_selector_is_seeded() -> None:
    inputs, _ = _synthetic(n=10)
    a = score_heads(inputs, "random", ScoreParams(seed=1))
    b = score_heads(inputs, "random", ScoreParams(seed=1))
    c = score_heads(inputs, "random", ScoreParams(seed=2))
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)
    assert not torch.equal(a.scores[0], a.scores[1])  # layers draw different streams


def test_all_selector_and_choose() -> None:
    inputs, _ = _synthetic(n=10)
    scores = score_heads(inputs, "all", ScoreParams())
    assert torch.equal(scores.scores, torch.ones(4, 6, dtype=F64))
    assert SelectorConfig(method="all", top_fraction=1.0).choose(scores) == scores.ranked()
    assert "all", ScoreParams().choose(scores) == [(0, h) for h in range(6)]


def test_head_indexing_through_a_selector() -> None:
    n_layers, n_heads, d, n = 30, 9, 4, 12
    g = _gen(9)
    layers = []
    for layer in range(n_layers):
        z_deg = torch.randn(n, n_heads, d, generator=g, dtype=F64)
        z_dense = z_deg + 0.01 * torch.randn(n, n_heads, d, generator=g, dtype=F64)
        if layer == 27:
            z_dense[:, 4] += 5.0
        layers.append(_layer_inputs(layer, z_deg, z_dense, z_dense, z_dense))
    scores = score_heads(SelectorInputs(tuple(layers)), "mse", ScoreParams())
    assert scores.scores.shape == (30, 9)
    assert scores.top(count=1) == [(27, 4)]


def test_selector_inputs_check_layers() -> None:
    inputs, _ = _synthetic(n_layers=2, n=10)
    with pytest.raises(ValueError, match="order them"):
        SelectorInputs((inputs.layers[1], inputs.layers[0]))
    item = inputs.layers[0]
    with pytest.raises(ValueError, match="z_dense_pos"):
        LayerInputs(
            layer=0,
            z_dense_q=item.z_dense_q,
            z_degraded_q=item.z_degraded_q,
            z_dense_pos=item.z_dense_pos[:5],
            z_dense_neg=item.z_dense_neg,
            V=item.V,
            S=item.S,
        )


def test_registry_refuses_duplicates_and_names_known() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_selector("probe")(lambda inputs, params: torch.ones(1))
    with pytest.raises(ValueError, match="all, mse, probe, random"):
        get_selector("nope")
    with pytest.raises(ValueError, match="select stage"):
        get_selector("kl")
    assert SelectorConfig(method="kl").method == "kl"


def test_probe_needs_the_degraded_reference() -> None:
    """The planted signal is weak in z_dense(q + r) alone: the first half does the work."""
    inputs, _ = _synthetic(planted=((0, 3),))
    item = inputs.layers[0]
    pos, neg = item.z_dense_pos[:, 3], item.z_dense_neg[:, 3]  # (N, d)
    alone = probe_accuracy(pos, neg, seed=0)
    zero = torch.zeros(pos.shape[1], dtype=F64)
    deg = item.z_degraded_q[:, 3]
    paired = probe_accuracy(
        probe_features(deg, zero, pos), probe_features(deg, zero, neg), seed=0
    )
    assert alone < 0.8 < 0.95 < paired

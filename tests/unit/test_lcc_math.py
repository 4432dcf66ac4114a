"""Unit tests for the svd / select math: tiny float64 tensors against direct formulas."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from recoup.stages.lcc import lcc_math as lm
from recoup.stages.lcc.lcc_math import (
    HeadScores,
    LayerInputs,
    SelectorConfig,
    SelectorInputs,
)

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full_rank_delta(n: int = 40, d: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, d) with well-separated singular values, so V is unique up to sign."""
    g = _gen(seed)
    q_left, _ = torch.linalg.qr(torch.randn(n, d, generator=g, dtype=F64))  # (n, d)
    q_right, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))  # (d, d)
    s = torch.linspace(10.0, 1.0, d, dtype=F64)
    return q_left @ torch.diag(s) @ q_right.T


# --------------------------------------------------------------------------- svd


@pytest.mark.parametrize("n", [40, 3])
def test_svd_orthonormal_descending_and_reconstructs(n: int) -> None:
    d = 6
    delta = torch.randn(n, d, generator=_gen(1), dtype=F64)
    V, S = lm.svd_directions(delta)
    assert V.shape == (d, d) and S.shape == (min(n, d),)
    torch.testing.assert_close(V @ V.T, torch.eye(d, dtype=F64))
    assert torch.all(S[:-1] >= S[1:]) and torch.all(S >= 0)
    r = S.numel()
    U = delta @ V[:r].T / S  # (n, r)
    torch.testing.assert_close(U.T @ U, torch.eye(r, dtype=F64))  # S pairs with V
    torch.testing.assert_close(U @ torch.diag(S) @ V[:r], delta)


def test_svd_sign_convention_and_row_permutation() -> None:
    delta = _full_rank_delta()
    V, S = lm.svd_directions(delta)
    pivots = V.gather(1, V.abs().argmax(dim=1, keepdim=True))
    assert torch.all(pivots > 0)
    perm = torch.randperm(delta.shape[0], generator=_gen(2))
    V2, S2 = lm.svd_directions(delta[perm])
    torch.testing.assert_close(V2, V, rtol=0, atol=1e-10)
    torch.testing.assert_close(S2, S, rtol=0, atol=1e-10)
    V3, _ = lm.svd_directions(-delta)  # the sign of the data cannot flip V either
    torch.testing.assert_close(V3, V, rtol=0, atol=1e-10)


def test_svd_keeps_dtype() -> None:
    V, S = lm.svd_directions(torch.randn(10, 4, generator=_gen(3)))
    assert V.dtype == torch.float32 and S.dtype == torch.float32


# --------------------------------------------------------------------------- lost component


@pytest.mark.parametrize("n", [40, 3])
def test_lost_component_full_rank_is_the_mean(n: int) -> None:
    delta = torch.randn(n, 6, generator=_gen(4), dtype=F64) + 2.0
    V, S = lm.svd_directions(delta)
    for k in (6, 100):
        torch.testing.assert_close(
            lm.lost_component(delta, V, S, k), delta.mean(0), rtol=0, atol=1e-12
        )


def test_lost_component_matches_reference_formula() -> None:
    delta = torch.randn(30, 5, generator=_gen(5), dtype=F64) + 1.0
    V, S = lm.svd_directions(delta)
    U = delta @ V.T / S  # (N, d): the reference's U
    for k in (1, 2, 4):
        expected = sum(U[:, i].mean() * S[i] * V[i] for i in range(k))
        torch.testing.assert_close(lm.lost_component(delta, V, S, k), expected)
        flipped = V * torch.tensor([-1.0, 1, -1, 1, 1], dtype=F64)[:, None]
        torch.testing.assert_close(lm.lost_component(delta, flipped, S, k), expected)


def test_lost_component_k1_by_hand() -> None:
    # delta^T delta = diag(18, 1): S = (sqrt 18, 1), V = I. U_1 = (3, 0, 3) / sqrt 18, so
    # mean(U_1) S_1 V_1 = (6 / 3 / sqrt 18) * sqrt 18 * (1, 0) = (2, 0).
    delta = torch.tensor([[3.0, 0.0], [0.0, 1.0], [3.0, 0.0]], dtype=F64)
    V, S = lm.svd_directions(delta)
    torch.testing.assert_close(S, torch.tensor([18.0**0.5, 1.0], dtype=F64))
    torch.testing.assert_close(
        lm.lost_component(delta, V, S, 1), torch.tensor([2.0, 0.0], dtype=F64)
    )
    torch.testing.assert_close(
        lm.lost_component(delta, V, S, 2), torch.tensor([2.0, 1.0 / 3.0], dtype=F64)
    )


def test_lost_component_zero_delta_is_zero_not_nan() -> None:
    delta = torch.zeros(5, 4, dtype=F64)
    V, S = lm.svd_directions(delta)
    c = lm.lost_component(delta, V, S, 3)
    assert torch.equal(c, torch.zeros(4, dtype=F64))


# --------------------------------------------------------------------------- probe


def test_split_heads_layout() -> None:
    z = torch.arange(2 * 3 * 4, dtype=F64).reshape(2, 12)  # (N, n_heads * d_head)
    heads = lm.split_heads(z, 3)
    assert heads.shape == (2, 3, 4)
    assert torch.equal(heads[:, 1], z[:, 4:8])
    assert torch.equal(lm.merge_heads(heads), z)
    with pytest.raises(ValueError, match="not divisible"):
        lm.split_heads(z, 5)


def test_probe_features_layout() -> None:
    zq, zr = torch.randn(3, 2, dtype=F64), torch.randn(3, 2, dtype=F64)
    c = torch.tensor([1.0, -1.0], dtype=F64)
    x = lm.probe_features(zq, c, zr)
    assert torch.equal(x, torch.cat([zq + c, zr], dim=1))


def test_split_samples_is_seeded_and_disjoint() -> None:
    train, held = lm.split_samples(10, 0.7, seed=3)
    assert len(train) == 7 and len(held) == 3
    assert set(train.tolist()).isdisjoint(held.tolist())
    assert sorted(train.tolist() + held.tolist()) == list(range(10))
    again = lm.split_samples(10, 0.7, seed=3)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    with pytest.raises(ValueError, match="empty side"):
        lm.split_samples(2, 0.9, seed=0)


def test_probe_accuracy_extremes() -> None:
    g = _gen(6)
    x = torch.randn(50, 4, generator=g, dtype=F64)
    shift = torch.tensor([3.0, 0, 0, 0], dtype=F64)
    assert lm.probe_accuracy(x + shift, x - shift, seed=0) == 1.0
    assert lm.probe_accuracy(x, x.clone(), seed=0) == 0.5  # nothing to tell apart
    assert lm.probe_accuracy(x + shift, x - shift, seed=0) == lm.probe_accuracy(
        x + shift, x - shift, seed=0
    )


def test_probe_ignores_a_constant_shift_of_features() -> None:
    """Documents that a constant c cannot change a standardised linear probe's score."""
    g = _gen(7)
    base = torch.randn(80, 3, generator=g, dtype=F64)
    pos = torch.randn(80, 3, generator=g, dtype=F64) + 0.3 * base
    neg = torch.randn(80, 3, generator=g, dtype=F64)
    c = torch.tensor([5.0, -2.0, 0.5], dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    plain = lm.probe_accuracy(
        lm.probe_features(base, zero, pos), lm.probe_features(base, zero, neg), seed=1
    )
    shifted = lm.probe_accuracy(
        lm.probe_features(base, c, pos), lm.probe_features(base, c, neg), seed=1
    )
    assert plain == shifted


# --------------------------------------------------------------------------- selectors


def _layer_inputs(
    layer: int,
    z_deg: torch.Tensor,
    z_dense: torch.Tensor,
    z_pos: torch.Tensor,
    z_neg: torch.Tensor,
) -> LayerInputs:
    """Bundles one layer's (N, H, d) activations with the SVD of their difference."""
    vs = [lm.svd_directions(z_dense[:, h] - z_deg[:, h]) for h in range(z_dense.shape[1])]
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
    planted: tuple[lm.HeadId, ...] = ((0, 3), (2, 0), (3, 5)),
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
    scores = lm.score_heads(inputs, SelectorConfig(method="probe", top_count=3))
    assert set(scores.top(count=3)) == set(planted)
    assert min(scores.score(h) for h in planted) > 0.9
    others = [h for h in scores.ranked() if h not in planted]
    assert max(scores.score(h) for h in others) < 0.75


def test_probe_needs_the_degraded_reference() -> None:
    """The planted signal is weak in z_dense(q + r) alone: the first half does the work."""
    inputs, _ = _synthetic(planted=((0, 3),))
    item = inputs.layers[0]
    pos, neg = item.z_dense_pos[:, 3], item.z_dense_neg[:, 3]  # (N, d)
    alone = lm.probe_accuracy(pos, neg, seed=0)
    zero = torch.zeros(pos.shape[1], dtype=F64)
    deg = item.z_degraded_q[:, 3]
    paired = lm.probe_accuracy(
        lm.probe_features(deg, zero, pos), lm.probe_features(deg, zero, neg), seed=0
    )
    assert alone < 0.8 < 0.95 < paired


def test_mse_selector_ranks_by_planted_shift() -> None:
    inputs, shift_norm = _synthetic(planted=())
    scores = lm.score_heads(inputs, SelectorConfig(method="mse"))
    expected = HeadScores(shift_norm).ranked()
    assert scores.ranked() == expected
    torch.testing.assert_close(scores.scores, 0.5 * shift_norm, rtol=0, atol=0.05)


@pytest.mark.parametrize("method", ["probe", "mse", "random", "all"])
def test_layers_scored_alone_in_any_order_match_all_together(method: str) -> None:
    inputs, _ = _synthetic(n=60)
    cfg = SelectorConfig(method=method, seed=5)
    together = lm.score_heads(inputs, cfg)
    per_layer = {i: lm.score_layer(inputs.layers[i], cfg) for i in (3, 1, 0, 2)}
    alone = lm.assemble_scores(per_layer, inputs.n_layers)
    assert torch.equal(alone.scores, together.scores)


def test_random_selector_is_seeded() -> None:
    inputs, _ = _synthetic(n=10)
    a = lm.score_heads(inputs, SelectorConfig(method="random", seed=1))
    b = lm.score_heads(inputs, SelectorConfig(method="random", seed=1))
    c = lm.score_heads(inputs, SelectorConfig(method="random", seed=2))
    assert torch.equal(a.scores, b.scores)
    assert not torch.equal(a.scores, c.scores)
    assert not torch.equal(a.scores[0], a.scores[1])  # layers draw different streams


def test_all_selector_and_choose() -> None:
    inputs, _ = _synthetic(n=10)
    scores = lm.score_heads(inputs, SelectorConfig(method="all"))
    assert torch.equal(scores.scores, torch.ones(4, 6, dtype=F64))
    assert SelectorConfig(method="all", top_fraction=1.0).choose(scores) == scores.ranked()
    assert SelectorConfig(method="all").choose(scores) == [(0, h) for h in range(6)]


# --------------------------------------------------------------------------- head indexing


def test_head_indexing_with_30_layers_and_9_heads() -> None:
    n_layers, n_heads = 30, 9  # SmolLM2-135M
    flat = torch.rand(n_layers * n_heads, generator=_gen(8), dtype=F64) * 0.5
    target = (27, 4)
    index = lm.flat_index(target, n_heads)
    assert index == 27 * 9 + 4
    flat[index] = 10.0
    scores = HeadScores.from_flat(flat, n_heads)
    assert scores.scores.shape == (30, 9)
    assert scores.top(count=1) == [target]
    assert scores.score(target) == 10.0
    assert lm.head_from_flat(index, n_heads) == target
    assert divmod(index, n_layers) != target  # the reference's decoding would miss it
    assert torch.equal(scores.flat(), flat)
    for i in (0, 8, 9, 100, 269):
        assert lm.flat_index(lm.head_from_flat(i, n_heads), n_heads) == i
    back = HeadScores.from_records(json.loads(json.dumps(scores.to_records())))
    assert torch.equal(back.scores, scores.scores)


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
    scores = lm.score_heads(SelectorInputs(tuple(layers)), SelectorConfig(method="mse"))
    assert scores.scores.shape == (30, 9)
    assert scores.top(count=1) == [(27, 4)]


def test_head_scores_ranking_and_records() -> None:
    scores = HeadScores(torch.tensor([[0.5, 0.9], [0.9, 0.1]]))
    assert scores.ranked() == [(0, 1), (1, 0), (0, 0), (1, 1)]  # tie -> (layer, head)
    assert scores.top(fraction=0.5) == [(0, 1), (1, 0)]
    assert scores.top(fraction=0.01) == [(0, 1)]  # at least one head
    with pytest.raises(ValueError, match="exactly one"):
        scores.top(fraction=0.5, count=1)
    with pytest.raises(ValueError, match="between 1 and"):
        scores.top(count=5)
    recs = scores.to_records()
    assert recs[1] == {"layer": 0, "head": 1, "score": pytest.approx(0.9)}
    with pytest.raises(ValueError, match="full"):
        HeadScores.from_records(recs[:3])
    with pytest.raises(ValueError, match="twice"):
        HeadScores.from_records([*recs, recs[0]])
    with pytest.raises(ValueError, match="finite"):
        HeadScores(torch.tensor([[0.0, float("nan")]]))


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


# --------------------------------------------------------------------------- registry, config


def test_registry_refuses_duplicates_and_names_known() -> None:
    with pytest.raises(ValueError, match="already registered"):
        lm.register_selector("probe")(lambda inputs, cfg: torch.ones(1))
    with pytest.raises(ValueError, match="all, mse, probe, random"):
        lm.get_selector("nope")
    with pytest.raises(ValueError, match="select stage"):
        lm.get_selector("kl")
    assert SelectorConfig(method="kl").method == "kl"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"method": "nope"}, "method"),
        ({"top_k_directions": 0}, "top_k_directions"),
        ({"top_fraction": 1.5}, "top_fraction"),
        ({"top_fraction": 0.0}, "top_fraction"),
        ({"top_count": 0}, "top_count"),
        ({"seed": -1}, "seed"),
        ({"train_fraction": 1.0}, "train_fraction"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"probe_l2": 0.0}, "probe_l2"),
        ({"top_fraction": 0.1, "top_count": 3}, "top_fraction or top_count"),
        ({"top_fraction": None}, "top_fraction or top_count"),
        ({"topk": 3}, "topk"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        SelectorConfig(**kwargs)


def test_config_defaults_and_frozen() -> None:
    cfg = SelectorConfig()
    assert (cfg.method, cfg.top_k_directions, cfg.top_fraction, cfg.train_fraction) == (
        "probe",
        10,
        0.25,
        0.7,
    )
    assert SelectorConfig(top_count=3).top_fraction is None
    with pytest.raises(ValidationError):
        cfg.seed = 3  # type: ignore[misc]

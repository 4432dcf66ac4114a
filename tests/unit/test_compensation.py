"""RestoreLCC compensation math against direct formulas, on tiny tensors and a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recoup.stages.lcc.compensation import (
    Compensation,
    LayerCompensation,
    attach,
    beta_from_component,
    fold_bias,
    o_proj_modules,
)
from recoup.stages.lcc.directions import svd_directions
from recoup.stages.model.modelio import TinyLlamaConfig, build_tiny_llama

N_HEADS, D_HEAD = 4, 8


def _orthonormal(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    V, _ = svd_directions(torch.randn(32, D_HEAD, generator=g))
    return V  # (d, d), rows orthonormal


def _comp(chosen: list[tuple[int, int]], seed: int = 0, std: float = 0.5) -> Compensation:
    V = {h: _orthonormal(i) for i, h in enumerate(chosen)}
    return Compensation.create(chosen, V, n_heads=N_HEADS, std=std,
                               generator=torch.Generator().manual_seed(seed))


def test_component_is_beta_times_rows_of_v_plus_b() -> None:
    V = torch.stack([_orthonormal(1), _orthonormal(2)])  # (2, d, d)
    beta, b = torch.randn(2, D_HEAD), torch.randn(2, D_HEAD)
    m = LayerCompensation(layer=0, heads=[3, 1], n_heads=N_HEADS, V=V, beta=beta, b=b)
    c = m.components()
    for k in range(2):
        direct = V[k].T @ beta[k] + b[k]  # c = V^T beta + b, V rows = directions
        torch.testing.assert_close(c[k], direct)


def test_forward_adds_c_to_the_chosen_head_slices_only() -> None:
    comp = _comp([(0, 1), (0, 3)])
    layer = comp.layers["0"]
    z = torch.randn(2, 5, N_HEADS * D_HEAD)  # (B, T, n_heads * d_head)
    out = layer(z)
    diff = (out - z).reshape(2, 5, N_HEADS, D_HEAD)  # (B, T, n_heads, d_head)
    c = layer.components()  # heads (1, 3)
    torch.testing.assert_close(diff[:, :, 1], c[0].expand(2, 5, D_HEAD))
    torch.testing.assert_close(diff[:, :, 3], c[1].expand(2, 5, D_HEAD))
    assert diff[:, :, [0, 2]].abs().max() == 0


def test_fold_bias_is_w_times_c_and_matches_shifted_input() -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(N_HEADS * D_HEAD, 12, bias=False)
    c = torch.randn(N_HEADS * D_HEAD, generator=g)
    z = torch.randn(3, N_HEADS * D_HEAD, generator=g)
    bias = fold_bias(lin.weight, c)
    torch.testing.assert_close(bias, lin.weight.detach() @ c)
    torch.testing.assert_close(lin(z + c), lin(z) + bias)


def test_fold_bias_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="fold_bias"):
        fold_bias(torch.zeros(4, 6), torch.zeros(5))


def test_lost_component_init_starts_at_the_lost_component() -> None:
    chosen = [(0, 0), (1, 2)]
    V = {h: _orthonormal(i) for i, h in enumerate(chosen)}
    lost = {h: torch.randn(D_HEAD) for h in chosen}
    comp = Compensation.create(chosen, V, n_heads=N_HEADS, init="lost_component", lost=lost)
    for key, m in comp.layers.items():
        for i, h in enumerate(m.heads):
            torch.testing.assert_close(m.components()[i], lost[(int(key), h)], atol=1e-5,
                                       rtol=1e-5)
            assert m.b[i].abs().max() == 0


def test_beta_from_component_inverts_beta_times_v() -> None:
    V = torch.stack([_orthonormal(5)])  # (1, d, d)
    beta = torch.randn(1, D_HEAD)
    c = torch.einsum("kd,kde->ke", beta, V)
    torch.testing.assert_close(beta_from_component(c, V), beta, atol=1e-5, rtol=1e-5)


def test_state_round_trip_and_head_bookkeeping() -> None:
    comp = _comp([(1, 2), (0, 3), (1, 0)])
    assert comp.chosen == [(0, 3), (1, 0), (1, 2)]
    again = Compensation.from_state(comp.state_tensors(), n_heads=N_HEADS)
    assert again.chosen == comp.chosen
    for layer, vec in comp.full_vectors().items():
        torch.testing.assert_close(again.full_vectors()[layer], vec)


def test_create_refuses_bad_head_lists() -> None:
    V = {(0, 0): _orthonormal(0)}
    with pytest.raises(ValueError, match="repeat"):
        Compensation.create([(0, 0), (0, 0)], V, n_heads=N_HEADS)
    with pytest.raises(ValueError, match="no V"):
        Compensation.create([(0, 1)], V, n_heads=N_HEADS)
    with pytest.raises(ValueError, match="no heads"):
        Compensation.create([], V, n_heads=N_HEADS)
    with pytest.raises(ValueError, match="lost component"):
        Compensation.create([(0, 0)], V, n_heads=N_HEADS, init="lost_component")


def test_only_beta_and_b_are_trainable() -> None:
    comp = _comp([(0, 1)])
    names = {n for n, p in comp.named_parameters() if p.requires_grad}
    assert names == {"layers.0.beta", "layers.0.b"}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    model, _ = build_tiny_llama(TinyLlamaConfig(layers=2, hidden=32, heads=N_HEADS, kv_heads=2,
                                                intermediate=64), torch.float32)
    return model


def test_hooks_equal_a_folded_bias_and_detach_cleanly(tiny: nn.Module) -> None:
    comp = _comp([(0, 2), (1, 1)])
    ids = torch.randint(0, 200, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = tiny(input_ids=ids).logits
        hooks = attach(tiny, comp)
        hooked = tiny(input_ids=ids).logits
        hooks.remove()
        assert not torch.equal(plain, hooked)
        torch.testing.assert_close(tiny(input_ids=ids).logits, plain)
        # The same shift as an o_proj bias W_o c gives the same logits.
        o_projs = o_proj_modules(tiny)
        for layer, vec in comp.full_vectors().items():
            o_projs[layer].bias = nn.Parameter(fold_bias(o_projs[layer].weight, vec))
        folded = tiny(input_ids=ids).logits
        for o in o_projs:
            o.bias = None
    torch.testing.assert_close(folded, hooked, atol=1e-5, rtol=1e-5)


def test_gradient_reaches_beta_and_b_through_the_hook(tiny: nn.Module) -> None:
    comp = _comp([(1, 3)], std=1e-3)
    tiny.requires_grad_(False)
    hooks = attach(tiny, comp)
    try:
        ids = torch.randint(0, 200, (1, 6), generator=torch.Generator().manual_seed(4))
        tiny(input_ids=ids).logits.sum().backward()
    finally:
        hooks.remove()
    m = comp.layers["1"]
    assert m.beta.grad is not None and m.beta.grad.abs().sum() > 0
    assert m.b.grad is not None and m.b.grad.abs().sum() > 0
    # c = beta @ V + b, so d/dbeta = V d/dc = V d/db
    torch.testing.assert_close(m.beta.grad[0], m.V[0] @ m.b.grad[0], atol=1e-6, rtol=1e-5)

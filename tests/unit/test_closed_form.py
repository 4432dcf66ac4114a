"""Closed-form lost-component compensation: the math on tiny tensors, and the block driver
on a tiny random Llama against a direct end-to-end computation."""

from __future__ import annotations

import copy

import pytest
import torch

from recoup.stages.lcc.compensation import Compensation, attach
from recoup.stages.model import modelio
from recoup.stages.recovery import closed_form
from recoup.stages.recovery.training_free import FitPlan, fit_blockwise


def test_mean_shift_over_real_tokens_only() -> None:
    z_d = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)  # (b, T, 2 heads x 2)
    z_g = torch.zeros_like(z_d)
    keep = torch.tensor([[True, True, False], [True, False, False]])
    total = closed_form.head_shift_sum(z_d, z_g, keep, n_heads=2)
    assert total.shape == (2, 2) and total.dtype == torch.float64
    expected = (z_d[0, 0] + z_d[0, 1] + z_d[1, 0]).double().reshape(2, 2)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(closed_form.mean_shift(total, 3), expected / 3)
    with pytest.raises(ValueError, match="no calibration tokens"):
        closed_form.mean_shift(total, 0)


def test_mean_shift_minimises_the_squared_error() -> None:
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(50, 8, generator=gen) + 0.5
    c = closed_form.mean_shift(closed_form.head_shift_sum(
        delta, torch.zeros_like(delta), torch.ones(50, dtype=torch.bool), 2), 50).reshape(-1)
    best = float(((delta - c.float()) ** 2).sum())
    for _ in range(5):
        other = c.float() + 0.01 * torch.randn(8, generator=gen)
        assert float(((delta - other) ** 2).sum()) > best


def test_full_vector_keeps_only_the_chosen_heads() -> None:
    shift = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    assert closed_form.full_vector(shift, [0, 2]).tolist() == [0, 1, 0, 0, 4, 5]


def test_identity_directions_make_the_component_the_compensation() -> None:
    heads = [(0, 1), (1, 0)]
    c = {(0, 1): torch.tensor([1.0, -2.0]), (1, 0): torch.tensor([0.5, 0.25])}
    comp = Compensation.create(heads, closed_form.identity_directions(heads, 2), n_heads=2,
                               init="lost_component", lost=c)
    got = comp.full_vectors()
    assert got[0].tolist() == [0, 0, 1, -2] and got[1].tolist() == [0.5, 0.25, 0, 0]


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    dense, _ = modelio.build_tiny_llama(modelio.TinyLlamaConfig(), torch.float32)
    degraded = copy.deepcopy(dense)
    with torch.no_grad():
        for name, p in degraded.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_((torch.rand(p.shape) > 0.5).float())
    return dense.eval(), degraded.eval()


@torch.no_grad()
def _o_proj_inputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    caught: list[torch.Tensor] = []
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
        lambda _m, a: caught.append(a[0])) for layer in model.model.layers]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return caught


def test_blockwise_fit_equals_the_end_to_end_mean_shift_of_the_compensated_model() -> None:
    """Block by block, with earlier blocks compensated, the fitted ``c`` of each layer is
    the mean shift that the compensated model (run end to end) shows at that layer before
    its own compensation; sequences of different lengths, padding left out."""
    dense, degraded = _pair()
    n_layers = len(dense.model.layers)
    n_heads = dense.config.num_attention_heads
    gen = torch.Generator().manual_seed(1)
    samples = [tuple(torch.randint(1, 200, (n,), generator=gen).tolist()) for n in (7, 12, 5)]
    heads = {layer: tuple(range(n_heads)) for layer in range(n_layers)}
    fit = fit_blockwise(dense, degraded, samples, FitPlan(heads=heads), pad_id=0,
                        device="cpu", micro_batch=2, progress=False)
    assert fit.tokens == 24 and len(fit.components) == n_layers * n_heads
    chosen = sorted(fit.components)
    d_head = dense.config.hidden_size // n_heads
    for layer in range(n_layers):
        # compensate layers < `layer` with the fitted c, then measure the shift at `layer`
        earlier = [h for h in chosen if h[0] < layer]
        hooks = None
        if earlier:
            comp = Compensation.create(earlier, closed_form.identity_directions(earlier, d_head),
                                       n_heads=n_heads, init="lost_component",
                                       lost={h: fit.components[h] for h in earlier})
            hooks = attach(degraded, comp)
        total = torch.zeros(n_heads, d_head, dtype=torch.float64)
        for s in samples:
            ids = torch.tensor([s])
            z_d = _o_proj_inputs(dense, ids)[layer][0]
            z_g = _o_proj_inputs(degraded, ids)[layer][0]
            total += closed_form.head_shift_sum(z_d, z_g, torch.ones(len(s), dtype=torch.bool),
                                                n_heads)
        if hooks is not None:
            hooks.remove()
        expected = total / 24
        for h in range(n_heads):
            torch.testing.assert_close(fit.components[(layer, h)], expected[h].float(),
                                       atol=1e-5, rtol=1e-4)


def test_compensation_lowers_the_hidden_state_error() -> None:
    dense, degraded = _pair()
    n_heads = dense.config.num_attention_heads
    gen = torch.Generator().manual_seed(2)
    samples = [tuple(torch.randint(1, 200, (16,), generator=gen).tolist()) for _ in range(6)]
    heads = {layer: tuple(range(n_heads)) for layer in range(len(dense.model.layers))}
    fit = fit_blockwise(dense, degraded, samples, FitPlan(heads=heads), pad_id=0,
                        device="cpu", progress=False)
    ids = torch.tensor(samples)
    with torch.no_grad():
        ref = dense(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        before = degraded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        d_head = dense.config.hidden_size // n_heads
        chosen = sorted(fit.components)
        comp = Compensation.create(chosen, closed_form.identity_directions(chosen, d_head),
                                   n_heads=n_heads, init="lost_component", lost=fit.components)
        hooks = attach(degraded, comp)
        after = degraded(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        hooks.remove()
    assert float((after - ref).pow(2).mean()) < float((before - ref).pow(2).mean())


def test_the_fit_read_from_files_block_by_block_equals_the_fit_in_memory(tmp_path) -> None:
    """fit_starts reads both models from their files one block at a time (neither whole in
    memory): the closed-form components and the EoRA factors equal the fit of the same
    models held in memory, and the in-memory models are left unchanged."""
    from recoup.stages.recovery.eora import EIG_RTOL
    from recoup.stages.recovery.inits import fit_starts
    from recoup.stages.recovery.masked_lora import keep_masks, linear_weights

    dense, degraded = _pair()
    tok = modelio.byte_tokenizer()
    modelio.save_model(dense, tok, tmp_path / "dense")
    modelio.save_model(degraded, tok, tmp_path / "degraded")
    n_heads = dense.config.num_attention_heads
    gen = torch.Generator().manual_seed(4)
    samples = [tuple(torch.randint(1, 200, (n,), generator=gen).tolist()) for n in (9, 6, 11)]
    heads = [(0, 1), (1, 0), (1, n_heads - 1)]
    paths = ("self_attn.q_proj", "mlp.down_proj")
    before = {n: p.clone() for n, p in degraded.named_parameters()}
    weights = linear_weights(degraded)
    adapted = {n: w for n, w in weights.items()
               if n.startswith("model.layers.1.") and n.rsplit(".", 2)[-2] in ("q_proj",
                                                                                 "down_proj")}
    memory = fit_blockwise(dense, degraded, samples, FitPlan(
        heads=closed_form.heads_by_layer(heads), eora={1: paths}, rank=2,
        masks=keep_masks(None, adapted)), pad_id=0, device="cpu", micro_batch=2,
        progress=False)
    files = fit_starts(dense_dir=tmp_path / "dense", degraded_dir=tmp_path / "degraded",
                       dtype="float32", heads=heads, eora_layers=[1], targets=("q_proj",
                                                                             "down_proj"),
                       rank=2, alpha=2.0, masks_file=None, calibration=samples, pad_id=0,
                       device="cpu", micro_batch=2, offload=False, eig_rtol=EIG_RTOL,
                       progress=False)
    assert files.lost is not None and sorted(files.lost) == sorted(memory.components)
    for h, c in memory.components.items():
        torch.testing.assert_close(files.lost[h], c, rtol=1e-5, atol=1e-7)
    assert files.lora_init is not None and sorted(files.lora_init) == sorted(memory.factors)
    # read from files the weights are parameters that require grad: a factor computed with
    # grad on kept its autograd graph, and with it the block's float64 difference, its
    # eigenbasis and both blocks' weights, per adapted linear (at 1.5 GB, +0.4 GB per
    # adapted block, found by benchmarks/memory_scaling.py)
    assert all(t.grad_fn is None and not t.requires_grad
               for pair in files.lora_init.values() for t in pair)
    for name, (B, A) in memory.factors.items():  # peft's layout at alpha / r = 1
        torch.testing.assert_close(files.lora_init[name][1] @ files.lora_init[name][0],
                                   B @ A, rtol=1e-4, atol=1e-6)
    for n, p in degraded.named_parameters():
        assert torch.equal(p, before[n]), n



def test_the_fit_reads_the_stored_masks_one_at_a_time(tmp_path) -> None:
    """With the degrade stage's masks file, fit_starts reads one linear's mask as it reaches
    it (StoredMasks: nothing read up front) and fits what the in-memory fit does with every
    mask at hand; unmasked (an unmerged adapter), what it does with all-ones masks. Block
    0's correction under its mask feeds block 1, so block 1's factors tell the three masks
    (the file's, which keeps fewer weights than are non-zero, and all-ones) apart."""
    from safetensors.torch import save_file

    from recoup.stages.recovery.eora import EIG_RTOL
    from recoup.stages.recovery.inits import fit_starts
    from recoup.stages.recovery.masked_lora import StoredMasks, keep_masks, linear_weights

    dense, degraded = _pair()
    tok = modelio.byte_tokenizer()
    modelio.save_model(dense, tok, tmp_path / "dense")
    modelio.save_model(degraded, tok, tmp_path / "degraded")
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]
    weights = {n: linear_weights(degraded)[n] for n in names}
    gen = torch.Generator().manual_seed(1)
    stored_keep = {n: (w != 0) & (torch.rand(w.shape, generator=gen) > 0.3)
                   for n, w in weights.items()}
    masks_file = tmp_path / "masks.safetensors"
    save_file(stored_keep, str(masks_file))
    stored = StoredMasks(masks_file)
    assert sorted(stored) == names and torch.equal(stored[names[0]], stored_keep[names[0]])
    assert stored.get("model.layers.0.mlp.up_proj.weight") is None
    assert len(StoredMasks(tmp_path / "absent.safetensors")) == 0

    samples = [tuple(torch.randint(1, 200, (n,), generator=gen).tolist()) for n in (9, 6, 11)]
    block1 = {}
    for masked in (True, False):
        masks = keep_masks(masks_file, weights) if masked \
            else {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
        memory = fit_blockwise(dense, degraded, samples, FitPlan(
            eora={0: ("mlp.down_proj",), 1: ("mlp.down_proj",)}, rank=2, masks=masks),
            pad_id=0, device="cpu", micro_batch=2, progress=False)
        files = fit_starts(dense_dir=tmp_path / "dense", degraded_dir=tmp_path / "degraded",
                           dtype="float32", heads=None, eora_layers=[0, 1],
                           targets=("down_proj",), rank=2, alpha=2.0, masks_file=masks_file,
                           masked=masked, calibration=samples, pad_id=0, device="cpu",
                           micro_batch=2, offload=False, eig_rtol=EIG_RTOL, progress=False)
        assert files.lora_init is not None
        for name, (B, A) in memory.factors.items():
            a, b = files.lora_init[name]
            torch.testing.assert_close(b @ a, B @ A, rtol=1e-4, atol=1e-6)
        a, b = files.lora_init["model.layers.1.mlp.down_proj"]
        block1[masked] = b @ a
    assert (block1[True] - block1[False]).abs().max() > 1e-4

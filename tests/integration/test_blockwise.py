"""The block-by-block degrade driver on a tiny random Llama (2 layers, hidden 64).

The norm weights of the tiny model are drawn log-normal rather than left at 1: with the
default init every input channel has about the same scale, so Wanda's |W| * ||x|| ranks
like |W| per row and "wanda beats magnitude" is a coin toss (we measured it both ways over
seeds). Real LLMs have outlier channels, which is what Wanda exploits; the log-normal norms
give the tiny model such channels.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from recoup.stages.compress.blockwise import (
    LINEAR_NAMES,
    PEAK_FROM_ACCOUNTING,
    BlockRunner,
    degrade_blockwise,
    embed_calibration,
)
from recoup.stages.compress.methods import DegradeSpec, available_methods, register_method
from recoup.stages.compress.pruning import nm_valid, sparsity_of

CPU = torch.device("cpu")
N_LAYERS = 2
HIDDEN = 64
VOCAB = 256
N_SAMPLES = 8
SEQ = 32
MICRO_BATCH = 3  # does not divide N_SAMPLES, so the ragged last micro-batch is exercised


def _tiny_llama(seed: int = 0, attn: str = "sdpa") -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    model.config._attn_implementation = attn
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(torch.exp(torch.randn(HIDDEN)))
    return model


@pytest.fixture(scope="module")
def dense() -> LlamaForCausalLM:
    return _tiny_llama()


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, VOCAB, (N_SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))


def _run(
    dense: LlamaForCausalLM, calib: torch.Tensor, **spec: object
) -> tuple[LlamaForCausalLM, object]:
    model = copy.deepcopy(dense)
    result = degrade_blockwise(
        model, calib, DegradeSpec(**spec), device=CPU, micro_batch=MICRO_BATCH, progress=False
    )
    return model, result


def _linear_keys() -> list[str]:
    return [f"model.layers.{i}.{name}.weight" for i in range(N_LAYERS) for name in LINEAR_NAMES]


def _logit_mse(model: LlamaForCausalLM, dense: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(ids).logits - dense(ids).logits).square().mean())


# ----------------------------------------------------------------------------- block inputs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_block_inputs_and_outputs_match_full_forward(attn: str, calib: torch.Tensor) -> None:
    """Block-0 inputs equal hidden_states[0]; running blocks with our rotary embeddings and
    causal mask reproduces hidden_states[1..] (the last one before the final norm)."""
    model = _tiny_llama(attn=attn)
    with torch.no_grad():
        states = model(calib, output_hidden_states=True).hidden_states
    inputs = embed_calibration(model, calib, device=CPU, micro_batch=MICRO_BATCH)
    torch.testing.assert_close(inputs.hidden, states[0], rtol=0, atol=0)
    runner = BlockRunner(model.config, inputs, CPU, MICRO_BATCH)
    for index, block in enumerate(model.model.layers[:-1]):
        runner.run(block, write_back=True)
        torch.testing.assert_close(inputs.hidden, states[index + 1])
    if attn == "eager":
        assert runner.mask_bytes() > 0  # a materialised mask, cached per micro-batch size


# ----------------------------------------------------------------------------- methods

PRUNE_CASES = [
    {"method": "magnitude", "sparsity": 0.5},
    {"method": "wanda", "sparsity": 0.6},
    {"method": "sparsegpt", "sparsity": 0.5},
    {"method": "magnitude", "n": 2, "m": 4},
    {"method": "wanda", "n": 2, "m": 4},
    {"method": "sparsegpt", "n": 4, "m": 8},
]


def test_registry_lists_the_four_methods() -> None:
    assert available_methods() == ("magnitude", "rtn", "sparsegpt", "wanda")


@pytest.mark.parametrize("case", PRUNE_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_pruning_methods(case: dict, dense: LlamaForCausalLM, calib: torch.Tensor) -> None:
    model, result = _run(dense, calib, **case)
    after = model.state_dict()
    keys = _linear_keys()
    assert sorted(result.masks) == sorted(keys)
    assert len(result.seconds_per_block) == N_LAYERS
    assert result.peak_source == PEAK_FROM_ACCOUNTING and result.peak_device_bytes > 0

    for key, before in dense.state_dict().items():
        if key not in keys:
            assert torch.equal(after[key], before), f"{key} changed"
    for key in keys:
        W, keep = after[key], result.masks[key]
        assert not torch.equal(W, dense.state_dict()[key])
        assert torch.all(W[~keep] == 0) and torch.all(W[keep] != 0)
        assert result.sparsity[key] == pytest.approx(sparsity_of(W))
        if "n" in case:
            assert nm_valid(W, case["n"], case["m"])
            assert sparsity_of(W) == pytest.approx(1 - case["n"] / case["m"])
        elif case["method"] == "wanda":  # exact per output row
            assert torch.all((W == 0).sum(dim=1) == round(W.shape[1] * case["sparsity"]))
        else:  # exact per matrix (SparseGPT: one 128-column block covers each matrix here)
            assert int((W == 0).sum()) == round(W.numel() * case["sparsity"])


def test_rtn_int8_close_and_no_masks(dense: LlamaForCausalLM, calib: torch.Tensor) -> None:
    model, result = _run(dense, None, method="rtn", bits=8, group_size=None)
    assert result.masks == {}
    with torch.no_grad():
        ref = dense(calib).logits
        got = model(calib).logits
    assert torch.linalg.norm(got - ref) / torch.linalg.norm(ref) < 0.02
    for key, before in dense.state_dict().items():
        changed = not torch.equal(model.state_dict()[key], before)
        assert changed == (key in _linear_keys()), key


def test_rtn_int3_groups_is_worse_than_int8(dense: LlamaForCausalLM, calib: torch.Tensor) -> None:
    int8, _ = _run(dense, None, method="rtn", bits=8, group_size=16)
    int3, _ = _run(dense, None, method="rtn", bits=3, group_size=16)
    assert _logit_mse(int8, dense, calib) < _logit_mse(int3, dense, calib)


@pytest.mark.parametrize("pattern", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_calibrated_methods_beat_magnitude(
    pattern: dict, dense: LlamaForCausalLM, calib: torch.Tensor
) -> None:
    """Logit error vs dense on the calibration data (a held-out batch behaves the same on
    this model, see the module docstring)."""
    errors = {
        method: _logit_mse(_run(dense, calib, method=method, **pattern)[0], dense, calib)
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["wanda"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_micro_batch_and_offload_do_not_change_the_result(
    dense: LlamaForCausalLM, calib: torch.Tensor
) -> None:
    spec = DegradeSpec(method="wanda", sparsity=0.5)
    results = []
    for micro_batch, offload in [(1, False), (N_SAMPLES, False), (MICRO_BATCH, True)]:
        model = copy.deepcopy(dense)
        result = degrade_blockwise(
            model,
            calib,
            spec,
            device=CPU,
            micro_batch=micro_batch,
            offload_activations=offload,
            progress=False,
        )
        results.append(result)
    for key in _linear_keys():
        assert torch.equal(results[0].masks[key], results[1].masks[key])
        assert torch.equal(results[0].masks[key], results[2].masks[key])
    # offloading keeps two micro-batches of activations on the device instead of all of them
    assert results[2].accounted_peak_bytes < results[1].accounted_peak_bytes


# ----------------------------------------------------------------------------- errors


def test_errors_are_sentences(dense: LlamaForCausalLM, calib: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="Unknown degrade method 'obs'; choose one of"):
        DegradeSpec(method="obs", sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity=None, n=None, m=None"):
        DegradeSpec(method="wanda")
    with pytest.raises(ValueError, match="got 1.5"):
        DegradeSpec(method="wanda", sparsity=1.5)
    with pytest.raises(ValueError, match="3:2"):
        DegradeSpec(method="sparsegpt", n=3, m=2)
    with pytest.raises(ValueError, match="blocksize=6 must be a multiple of m=4"):
        DegradeSpec(method="sparsegpt", n=2, m=4, blocksize=6)
    with pytest.raises(ValueError, match="needs bits"):
        DegradeSpec(method="rtn")
    with pytest.raises(ValueError, match="sparsity=0.5"):
        DegradeSpec(method="rtn", bits=4, sparsity=0.5)
    with pytest.raises(ValueError, match="calib_ids is None"):
        degrade_blockwise(
            copy.deepcopy(dense), None, DegradeSpec(method="wanda", sparsity=0.5), device=CPU
        )
    with pytest.raises(ValueError, match=r"got shape \(32,\)"):
        degrade_blockwise(
            copy.deepcopy(dense),
            calib[0],
            DegradeSpec(method="wanda", sparsity=0.5),
            device=CPU,
            progress=False,
        )
    with pytest.raises(ValueError, match="registered twice"):
        register_method("wanda", kind="prune")(lambda weight, stat, spec: (weight, None))

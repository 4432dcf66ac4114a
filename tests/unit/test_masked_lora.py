"""LoRA under the sparsity mask: the masked merge keeps zeros, and the masked forward is the
merged model."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.recovery.job import LoraSpec
from recoup.stages.recovery.masked_lora import keep_masks, lora_layers, masked_lora_merge
from recoup.stages.recovery.recovery_model import add_lora
from tests.conftest import tiny_pruned_llama


def test_masked_merge_keeps_pruned_weights_zero_and_refuses_non_finite() -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g)
    mask = torch.rand(6, 5, generator=g) > 0.5
    W = W * mask
    A, B = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    merged = masked_lora_merge(W, A, B, 0.5, mask)
    assert (merged[~mask] == 0).all()
    torch.testing.assert_close(merged[mask], (W + 0.5 * B @ A)[mask])
    with pytest.raises(ValueError, match="not finite"):
        masked_lora_merge(W, A, B * float("inf"), 1.0, mask)


def test_masked_lora_forward_is_the_masked_merge() -> None:
    """Training runs ``W_hat + M * scale B A``: the exported (masked-merged) model's output,
    and the mask holds: zeros stay zeros, even with non-zero B."""
    import copy

    model = tiny_pruned_llama()
    plain = copy.deepcopy(model)
    cfg = LoraSpec(rank=2, alpha=4.0, dropout=0.0, targets=("q_proj", "down_proj"))
    wrapped = add_lora(model, cfg, [1], masked=True)
    with torch.no_grad():
        for m in lora_layers(wrapped).values():
            for a in m.lora_B:
                m.lora_B[a].weight.normal_()
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        trained = wrapped(input_ids=ids).logits
        masks = keep_masks(None, {n: p for n, p in plain.named_parameters()
                                  if n.endswith("proj.weight")})
        params = dict(plain.named_parameters())
        for name, m in lora_layers(wrapped).items():
            w = params[f"{name}.weight"]
            w.copy_(masked_lora_merge(w, m.lora_A["default"].weight, m.lora_B["default"].weight,
                                      m.scaling["default"], masks[f"{name}.weight"]))
            assert (w[~masks[f"{name}.weight"]] == 0).all()
        merged = plain(input_ids=ids).logits
    torch.testing.assert_close(trained, merged, atol=1e-5, rtol=1e-5)
    # unmasked LoRA would be a different model
    unmasked = add_lora(copy.deepcopy(tiny_pruned_llama()), cfg, [1])
    with torch.no_grad():
        for name, m in lora_layers(unmasked).items():
            src = lora_layers(wrapped)[name]
            m.lora_A["default"].weight.copy_(src.lora_A["default"].weight)
            m.lora_B["default"].weight.copy_(src.lora_B["default"].weight)
        assert (unmasked(input_ids=ids).logits - trained).abs().max() > 1e-3

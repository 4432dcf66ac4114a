"""The Llama layout: decoder layers, attention, o_proj and linear names, also through PEFT."""

from __future__ import annotations

import pytest
import torch

from recoup.stages.model import layout
from recoup.stages.model.modelio import TinyLlamaConfig, build_tiny_llama


def test_lookups_find_every_layer_in_order() -> None:
    model, _ = build_tiny_llama(TinyLlamaConfig(layers=3), torch.float32)
    layers = layout.decoder_layers(model)
    assert layout.decoder(model) is model.model and layout.num_layers(model) == 3
    assert layout.o_proj_modules(model) == [layer.self_attn.o_proj for layer in layers]
    assert layout.attention_modules(model) == [layer.self_attn for layer in layers]
    assert layout.decoder_layers(model.model) is layers  # the decoder itself
    names = layout.linear_weight_names(model)
    assert len(names) == 3 * len(layout.LINEAR_NAMES)
    assert "model.layers.2.self_attn.o_proj.weight" in names
    assert set(names) <= set(model.state_dict())
    assert layout.LINEAR_TARGETS[:4] == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_a_wrapper_is_walked_and_other_layouts_are_one_sentence() -> None:
    model, _ = build_tiny_llama(TinyLlamaConfig(layers=2), torch.float32)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.base_model = inner

    assert layout.o_proj_modules(Wrapper(model)) == layout.o_proj_modules(model)
    with pytest.raises(ValueError, match="has no decoder layers"):
        layout.decoder_layers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="has no model.model.embed_tokens"):
        layout.llama_decoder(torch.nn.Linear(2, 2))

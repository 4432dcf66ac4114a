"""Where things are in a Llama-family model: the one place that knows the module layout.

recoup works on Hugging Face Llama-layout causal LMs (Llama, SmolLM2, Mistral, Qwen2...):
``model.model`` is the decoder with ``embed_tokens``, ``layers`` and ``rotary_emb``; each
layer has ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``. Every lookup of a
decoder layer, attention module, ``o_proj`` or linear name goes through here, so a model
with another layout fails in one place with one sentence.

A model may be wrapped (PEFT's ``PeftModel`` -> ``LoraModel`` -> the causal LM): the
lookups walk ``base_model`` / ``model`` down to the module that holds ``layers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Linears of a Llama decoder block, grouped by the tensor they read: members of a group see
#: the same input (so they can share one input statistic).
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
#: Every linear of a block, by its path inside the block.
LINEAR_NAMES: tuple[str, ...] = tuple(name for group in LINEAR_GROUPS for name in group)
#: The same linears by their own name (what PEFT's ``target_modules`` matches).
LINEAR_TARGETS: tuple[str, ...] = tuple(name.rsplit(".", 1)[1] for name in LINEAR_NAMES)
#: The decoder attributes a block-by-block forward needs.
DECODER_PARTS = ("embed_tokens", "layers", "rotary_emb")


def decoder(model: Any) -> Any:
    """The decoder (``LlamaModel``, the module holding ``layers``) of a causal LM, a PEFT
    wrapper of one, or the decoder itself."""
    base = model
    seen = 0
    while not hasattr(base, "layers"):
        inner = getattr(base, "model", None)
        if inner is None:
            inner = getattr(base, "base_model", None)
        if inner is None or inner is base or seen > 8:
            raise ValueError(f"{type(model).__name__} has no decoder layers (expected a Llama-"
                             "layout model with model.layers[i].self_attn.o_proj)")
        base, seen = inner, seen + 1
    return base


def llama_decoder(model: Any) -> Any:
    """The decoder of a causal LM with every part a block-by-block forward needs
    (:data:`DECODER_PARTS`); a sentence naming the missing part otherwise."""
    inner = getattr(model, "model", None)
    for attr in DECODER_PARTS:
        if inner is None or not hasattr(inner, attr):
            raise ValueError(
                "The blockwise driver needs a Llama-family causal LM with "
                f"model.model.{{embed_tokens, layers, rotary_emb}}; {type(model).__name__} "
                f"has no model.model.{attr}."
            )
    return inner


def decoder_layers(model: Any) -> Sequence[nn.Module]:
    """The decoder layers (blocks), in order."""
    return decoder(model).layers  # type: ignore[no-any-return]


def num_layers(model: Any) -> int:
    return len(decoder_layers(model))


def attention_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention module (``self_attn``)."""
    try:
        return layer.self_attn  # type: ignore[return-value]
    except AttributeError:
        raise ValueError(f"{type(layer).__name__}: a decoder layer has no self_attn "
                         "(recoup hooks into Llama-layout attention)") from None


def o_proj_of(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention output projection (``self_attn.o_proj``)."""
    attn = attention_of(layer)
    try:
        return attn.o_proj  # type: ignore[return-value]
    except AttributeError:
        raise ValueError(f"{type(layer).__name__}: a decoder layer has no self_attn.o_proj "
                         "(recoup hooks into Llama-layout attention)") from None


def attention_modules(model: Any) -> list[nn.Module]:
    """Every decoder layer's ``self_attn``, in layer order."""
    return [attention_of(layer) for layer in decoder_layers(model)]


def o_proj_modules(model: Any) -> list[nn.Module]:
    """Every decoder layer's ``self_attn.o_proj``, in layer order."""
    return [o_proj_of(layer) for layer in decoder_layers(model)]


def attention_projections(layer: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(q_proj, k_proj, v_proj, o_proj) of one decoder layer."""
    attn = attention_of(layer)
    return attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj  # type: ignore[return-value]


def linear_weight_names(model: Any) -> list[str]:
    """Parameter names of the decoder blocks' linear weights: the matrices recoup degrades
    (``model.layers.{i}.{path}.weight``, as in the checkpoint of a causal LM)."""
    names = []
    for i, layer in enumerate(decoder_layers(model)):
        for mod_name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                names.append(f"model.layers.{i}.{mod_name}.weight")
    return names


__all__ = (
    "DECODER_PARTS",
    "LINEAR_GROUPS",
    "LINEAR_NAMES",
    "LINEAR_TARGETS",
    "attention_modules",
    "attention_of",
    "attention_projections",
    "decoder",
    "decoder_layers",
    "linear_weight_names",
    "llama_decoder",
    "num_layers",
    "o_proj_modules",
    "o_proj_of",
)

"""Which decoder layers the degradation damaged most: the ranking behind ``lora.layers: auto``
and the sensitivity stage (Recover-LoRA's choice of layers).

Each layer is measured on its own: the degraded layer is fed the *dense* model's input to
that layer (:func:`local_layer_io`), so a late layer is not blamed for the error it
inherits from earlier ones. The error terms are sums over real tokens, so batches pool
before the division (:func:`rank_layers`). Model loading is the caller's
(:mod:`recoup.stages.model.layer_errors`); this module only runs forwards with hooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recoup.stages.model import layout


def layer_error_terms(dense_out: Sequence[Tensor], degraded_out: Sequence[Tensor],
                      mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per layer ``(sum ||d - g||^2, sum ||d||^2)`` over tokens: two (n_layers,) float64.

    ``dense_out[i]`` and ``degraded_out[i]`` (B, T, hidden) are layer ``i``'s outputs on
    the same input; ``mask`` (B, T) keeps real tokens. Sums, so batches add up.
    """
    if len(dense_out) != len(degraded_out) or not dense_out:
        raise ValueError("need the outputs of the same non-empty list of layers from both models")
    num, den = [], []
    for d, g in zip(dense_out, degraded_out, strict=True):
        d, g = d.double(), g.double()
        w = torch.ones(d.shape[:-1], dtype=torch.float64) if mask is None else mask.double()
        num.append((((d - g) ** 2).sum(-1) * w).sum())
        den.append(((d**2).sum(-1) * w).sum())
    return torch.stack(num), torch.stack(den)


def layer_output_errors(dense_out: Sequence[Tensor], degraded_out: Sequence[Tensor],
                        mask: Tensor | None = None) -> Tensor:
    """Relative output error of each layer, ``sum ||d - g||^2 / sum ||d||^2``: (n_layers,)."""
    num, den = layer_error_terms(dense_out, degraded_out, mask)
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


def top_layers(errors: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest errors, ascending; ties go to the lower index."""
    if not 1 <= k <= errors.numel():
        raise ValueError(f"cannot pick {k} of {errors.numel()} layers")
    order = sorted(range(errors.numel()), key=lambda i: (-float(errors[i]), i))
    return sorted(order[:k])


def layer_output(output: Any) -> Tensor:
    """A decoder layer's hidden states, whether it returns them alone or in a tuple."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def local_layer_io(dense: nn.Module, degraded: nn.Module, batch: Mapping[str, Tensor],
                   ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Each decoder layer's dense input, and its output in both models fed that input.

    Feeding the dense input to the degraded layer measures the damage of that layer
    alone; comparing end-to-end outputs would favour late layers, which inherit every
    earlier layer's error.
    """
    inputs: list[Tensor] = []
    dense_out: list[Tensor] = []
    deg_out: list[Tensor] = []
    handles = []
    for layer in layout.decoder_layers(dense):
        def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            inputs.append(args[0] if args else kwargs["hidden_states"])
            dense_out.append(layer_output(out))
        handles.append(layer.register_forward_hook(grab, with_kwargs=True))
    try:
        dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    handles = []
    for i, layer in enumerate(layout.decoder_layers(degraded)):
        def swap(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 i: int = i) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (inputs[i],) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs[i]}

        def keep(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            deg_out.append(layer_output(out))
        handles.append(layer.register_forward_pre_hook(swap, with_kwargs=True))
        handles.append(layer.register_forward_hook(keep))
    try:
        degraded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return inputs, dense_out, deg_out


def local_layer_outputs(dense: nn.Module, degraded: nn.Module, batch: Mapping[str, Tensor],
                        ) -> tuple[list[Tensor], list[Tensor]]:
    """Each decoder layer's output in both models, both fed the DENSE model's input."""
    _, dense_out, deg_out = local_layer_io(dense, degraded, batch)
    return dense_out, deg_out


#: What a layer's squared output error is divided by (see :func:`rank_layers`).
Normalize = Literal["output", "update", "none"]


def normalized_error_terms(inputs: Sequence[Tensor], dense_out: Sequence[Tensor],
                           degraded_out: Sequence[Tensor], mask: Tensor,
                           normalize: Normalize) -> tuple[Tensor, Tensor]:
    """Per layer, on one batch, the sums whose ratio :func:`rank_layers` reports: (sum
    ||d - g||^2, what ``normalize`` divides it by), two (n_layers,) float64. Layer ``i``'s
    dense input is ``inputs[i]``, its outputs ``dense_out[i]`` and ``degraded_out[i]``
    (B, T, hidden); ``mask`` (B, T) keeps real tokens."""
    num, den = layer_error_terms(dense_out, degraded_out, mask)
    if normalize == "update":  # the layer's own contribution
        _, den = layer_error_terms([d - x for d, x in zip(dense_out, inputs, strict=True)],
                                   dense_out, mask)
    elif normalize == "none":
        den = torch.full_like(den, float(mask.sum()))
    return num, den


def rank_layers(dense: nn.Module, degraded: nn.Module, batches: Sequence[Mapping[str, Tensor]],
                normalize: Normalize = "output") -> Tensor:
    """(n_layers,) output errors over all ``batches`` (sums pooled, then divided).

    ``normalize`` is what ``sum ||dense - degraded||^2`` of a layer is divided by:
    ``output``: ``sum ||dense output||^2``, which includes the residual stream, so layers
    carrying massive activations look undamaged; ``update``: ``sum ||dense output - input||^2``,
    the layer's own contribution; ``none``: the token count (plain mean squared error).
    """
    num = den = None
    for batch in batches:
        x, d, g = local_layer_io(dense, degraded, batch)
        n, m = normalized_error_terms(x, d, g, batch["attention_mask"], normalize)
        num = n if num is None else num + n
        den = m if den is None else den + m
    if num is None or den is None:
        raise ValueError("no calibration batches to rank layers on")
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


__all__ = (
    "Normalize",
    "layer_error_terms",
    "layer_output_errors",
    "local_layer_io",
    "local_layer_outputs",
    "rank_layers",
    "top_layers",
)

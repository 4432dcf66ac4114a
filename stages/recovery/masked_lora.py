"""LoRA under the sparsity mask: the delta that is trained is the delta that is exported.

A pruned weight ``W_hat`` keeps its zeros only if its LoRA delta is merged under the keep
mask ``M``: ``W_hat + M * (scale * B A)``. If training ran the plain ``W_hat x + scale B A x``
the exported (masked-merged) model would not be the trained one. So training runs the
masked delta in the forward pass, through peft's LoRA-variant hook (:class:`MaskedLora`):
``y = W_hat x + (M * scale B A) x``, and the export's masked merge
(:func:`masked_lora_merge`) gives exactly that model, zeros included.

The mask of every linear comes from one rule, used by training and export alike
(:func:`keep_masks`): the degrade stage's ``masks.safetensors`` when it wrote one (pruning),
else the weight's own non-zero pattern (fake quantization, where a weight that rounded to
zero must stay zero too). Materialising ``M * B A`` costs one (out, in) matrix per adapted
linear per forward; that is the price of training what is exported.

Under DeepSpeed ZeRO-3 a module's parameters are gathered when that module is called; the
masked forward reads ``lora_A``/``lora_B`` weights without calling them, so training marks
each masked LoRA layer a ZeRO-3 *leaf* (:func:`zero3_leaves`): all of its parameters are
gathered on its own call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from recoup.stages.model import layout
from recoup.stages.model.partitioned import full_shape, gathered

KEEP_BUFFER = "recoup_keep"
"""Name of the (out, in) bool keep-mask buffer on a masked LoRA layer (not saved)."""
_PEFT_PREFIX = "base_model.model."


def masked_lora_merge(W: Tensor, A: Tensor, B: Tensor, scale: float, mask: Tensor) -> Tensor:
    """``W + mask * (B @ A) * scale``: (out, in), computed in float32 or wider.

    ``A`` (r, in), ``B`` (out, r), ``mask`` (out, in) bool keep-mask. Raises if the result
    is not finite (an overflowing adapter must not reach a checkpoint, as peft's
    ``safe_merge``).
    """
    if mask.shape != W.shape or A.shape[1] != W.shape[1] or B.shape[0] != W.shape[0]:
        raise ValueError(f"shapes do not fit: W {tuple(W.shape)}, A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, mask {tuple(mask.shape)}")
    work = torch.promote_types(W.dtype, torch.float32)
    delta = (B.to(work) @ A.to(work)) * scale  # (out, in)
    merged = W.to(work) + delta * mask.to(work)
    if not torch.isfinite(merged).all():
        raise ValueError("the merged LoRA weight is not finite; refusing to export it")
    return merged.to(W.dtype)


class StoredMasks(Mapping[str, Tensor]):
    """The degrade stage's keep masks (``masks.safetensors``), each read when asked for.

    :func:`keep_masks` reads the file through it; a fit that visits one block at a time
    passes it instead of :func:`keep_masks`' dict, and so holds one linear's mask, not
    every adapted linear's (a 70B model's masks are 64 GB as bool). A name the file does
    not list (or no file: nothing was pruned) is missing, and the caller falls back to the
    weight's non-zero pattern, as :func:`keep_masks` does.
    """

    def __init__(self, masks_file: Path | None):
        self.file = masks_file if masks_file is not None and masks_file.is_file() else None
        self._names: dict[str, None] = {}  # ordered, with set lookups
        if self.file is not None:
            with safe_open(str(self.file), "pt") as f:
                self._names = dict.fromkeys(f.keys())

    def __getitem__(self, name: str) -> Tensor:
        if self.file is None or name not in self._names:
            raise KeyError(name)
        with safe_open(str(self.file), "pt") as f:
            return f.get_tensor(name).bool()

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def keep_masks(masks_file: Path | None, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Keep mask (bool, on each weight's device) of each of ``weights``, by parameter name
    (``model.layers.{i}.self_attn.q_proj.weight``).

    ``masks_file``: the degrade stage's ``masks.safetensors`` (None or absent: no pruning
    mask was written); a weight it does not list keeps its own non-zero pattern (read
    gathered when ZeRO-3 partitioned it, a collective: every rank passes the same weights).
    """
    stored = StoredMasks(masks_file)
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        keep = stored.get(name)
        if keep is None:
            with gathered([w]):  # a ZeRO-3 partitioned weight: whole for this one read
                keep = w.detach() != 0
        elif keep.shape != full_shape(w):
            raise ValueError(f"{masks_file}: mask of {name} is {tuple(keep.shape)}, "
                             f"the weight {tuple(full_shape(w))}")
        out[name] = keep.to(w.device)
    return out


def linear_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every decoder linear weight of a plain causal LM, by parameter name."""
    params = dict(model.named_parameters())
    return {n: params[n] for n in layout.linear_weight_names(model)}


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of ``model`` by the name of the linear they wrap in the plain model
    (``model.layers.3.self_attn.q_proj``)."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(_PEFT_PREFIX): m for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def _masked_delta(module: Any, adapter: str) -> Tensor:
    """(out, in): ``keep * scale * B @ A`` of one adapter of one LoRA layer."""
    A = module.lora_A[adapter].weight  # (r, in)
    B = module.lora_B[adapter].weight  # (out, r)
    keep = getattr(module, KEEP_BUFFER)
    return (B @ A) * module.scaling[adapter] * keep.to(A.dtype)


def _peft_lora_variant() -> type:
    from peft.tuners.lora.layer import LoraVariant

    class MaskedLora(LoraVariant):
        """peft LoRA variant whose delta is ``keep * scale * B A`` (forward and merges)."""

        @staticmethod
        def init(module: Any, adapter_name: str, **kwargs: Any) -> None:
            pass

        @staticmethod
        def forward(module: Any, active_adapter: str, x: Tensor, result: Tensor,
                    **kwargs: Any) -> Tensor:
            delta = _masked_delta(module, active_adapter)  # (out, in)
            dropped = module.lora_dropout[active_adapter](x)  # (..., in)
            return result + F.linear(dropped, delta.to(dropped.dtype))

        @staticmethod
        def merge_safe(module: Any, active_adapter: str, orig_weight: Tensor) -> Tensor:
            merged = orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)
            if not torch.isfinite(merged).all():
                raise ValueError("the merged LoRA weight is not finite")
            return merged

        @staticmethod
        def merge_unsafe(module: Any, active_adapter: str, orig_weight: Tensor) -> None:
            orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

        @staticmethod
        def unmerge(module: Any, active_adapter: str, orig_weight: Tensor) -> Tensor:
            return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)

    return MaskedLora


def lora_base_weights(model: nn.Module) -> dict[str, Tensor]:
    """The base weight under each LoRA layer of a peft-wrapped model, by the parameter name
    it has in the plain model (the name the masks and the export use)."""
    return {f"{name}.weight": m.get_base_layer().weight for name, m in lora_layers(model).items()}


def mask_lora(model: nn.Module, masks_file: Path | None,
              weights: Mapping[str, Tensor] | None = None) -> int:
    """Run every LoRA layer of the peft-wrapped ``model`` under its keep mask
    (:func:`keep_masks`); returns how many layers were masked. A layer whose mask keeps
    every weight stays plain LoRA (same result, no (out, in) matrix per forward).
    ``weights``: the adapted linears' base weights by plain parameter name, when the
    model does not hold them (a streamed base: read one at a time from the checkpoint,
    :class:`recoup.stages.model.streamed.CheckpointTensors`)."""
    variant = _peft_lora_variant()()
    masks = keep_masks(masks_file, lora_base_weights(model) if weights is None else weights)
    masked = 0
    for name, module in lora_layers(model).items():
        keep = masks[f"{name}.weight"]
        if bool(keep.all()):
            continue
        module.register_buffer(KEEP_BUFFER, keep.bool(), persistent=False)
        for adapter in module.lora_A:
            module.lora_variant[adapter] = variant
        masked += 1
    return masked


def zero3_leaves(model: nn.Module) -> None:
    """Mark masked LoRA layers ZeRO-3 leaves (their forward reads A and B directly).

    Call inside a training worker, where DeepSpeed is loaded for the right accelerator.
    """
    from deepspeed.utils import set_z3_leaf_module

    for module in lora_layers(model).values():
        if hasattr(module, KEEP_BUFFER):
            set_z3_leaf_module(module, True)


__all__ = ("KEEP_BUFFER", "StoredMasks", "keep_masks", "linear_weights", "lora_base_weights",
           "lora_layers", "mask_lora", "masked_lora_merge", "zero3_leaves")

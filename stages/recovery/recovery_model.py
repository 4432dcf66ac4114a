"""The trainable recovery model: the degraded model with its LoRA adapters and compensation.

One :class:`RecoveryModel` is what training optimises, what a training-free fit saves and,
loaded back (:func:`load_recovered`), what the export checks its merged checkpoint
against. It owns the on-disk form of the recovery parameters (``lcc.safetensors``, the peft
folder ``lora/``), so saving and loading cannot drift apart. LoRA is attached through peft
(:func:`add_lora`) and, for everything trained or exported, under the sparsity mask
(:mod:`recoup.stages.recovery.masked_lora`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from recoup.stages.lcc.compensation import Compensation, attach
from recoup.stages.model import layout
from recoup.stages.recovery.job import LoraSpec
from recoup.stages.recovery.masked_lora import lora_layers, mask_lora

LCC_FILE = "lcc.safetensors"
LORA_DIR = "lora"


class RecoveryModel(nn.Module):
    """The degraded model (possibly PEFT-wrapped) plus the compensation, as one module.

    One module so that DeepSpeed sees and shards every parameter; the compensation is
    applied by forward pre-hooks on ``o_proj`` (see :func:`compensation.attach`).
    """

    def __init__(self, base: nn.Module, lcc: Compensation | None = None):
        super().__init__()
        self.base = base
        self.lcc = lcc
        self._hooks = attach(base, lcc) if lcc is not None else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits  # (B, T, V)

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.base, PeftModel)

    def param_groups(self, lr: float, lcc_lr: float | None = None) -> list[dict[str, Any]]:
        """AdamW parameter groups: the LoRA (and any other) trainable parameters at ``lr``,
        the compensation's beta and b at ``lcc_lr`` (``lr`` when None); empty groups left
        out. The schedule multiplies every group's lr alike."""
        lcc_ids = {id(p) for p in self.lcc.parameters()} if self.lcc is not None else set()
        trainable = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if id(p) not in lcc_ids], "lr": lr},
                  {"params": [p for p in trainable if id(p) in lcc_ids],
                   "lr": lr if lcc_lr is None else lcc_lr}]
        return [g for g in groups if g["params"]]

    def save(self, folder: Path) -> dict[str, Any]:
        """``lcc.safetensors`` and/or the PEFT adapter folder ``lora/``; call with the
        parameters gathered (ZeRO-3)."""
        saved: dict[str, Any] = {}
        if self.lcc is not None:
            tensors = {k: v.float().contiguous() for k, v in self.lcc.state_tensors().items()}
            # one metadata key: safetensors writes several in hash-map order, which would
            # make the file's bytes (and its sha256 in the manifest) differ run to run
            save_file(tensors, str(folder / LCC_FILE),
                      metadata={"n_heads": str(self.lcc.n_heads)})
            saved["lcc_heads"] = len(self.lcc.chosen)
        if self.has_lora:
            self.base.save_pretrained(str(folder / LORA_DIR), safe_serialization=True)
            saved["lora"] = True
        return saved


def add_lora(model: nn.Module, spec: LoraSpec, layers: Sequence[int], *,
             init: Mapping[str, tuple[Tensor, Tensor]] | None = None, masked: bool = False,
             masks_file: Path | None = None) -> nn.Module:
    """Wrap ``model`` with ``peft`` LoRA adapters on ``spec.targets`` of ``layers``.

    ``init``: linear module name -> (lora_A, lora_B) to start from (every adapted linear
    must have one); ``masked``: the adapters run under the keep masks of ``masks_file``
    (or the weights' non-zero pattern), see :func:`masked_lora.mask_lora`.
    """
    from peft import LoraConfig, get_peft_model

    if not layers:
        raise ValueError("LoRA needs at least one layer")
    n_layers = layout.num_layers(model)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"train.lora.layers {bad} are outside the model's {n_layers} layers")
    peft_cfg = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=list(spec.targets), layers_to_transform=sorted(layers),
        layers_pattern="layers", bias="none", task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_cfg)
    if init is not None:
        _start_lora(wrapped, init)
    if masked:
        mask_lora(wrapped, masks_file)
    return wrapped


def _start_lora(model: nn.Module, init: Mapping[str, tuple[Tensor, Tensor]]) -> None:
    """Copy the start factors into every LoRA layer of ``model``."""
    adapted = lora_layers(model)
    missing = sorted(set(adapted) - set(init))
    if missing:
        raise ValueError(f"no LoRA start factors for {missing[:3]}")
    with torch.no_grad():
        for name, module in adapted.items():
            A, B = init[name]
            for adapter in module.lora_A:
                a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
                if a.shape != A.shape or b.shape != B.shape:
                    raise ValueError(f"{name}: start factors {tuple(A.shape)}, {tuple(B.shape)}"
                                     f" do not fit the adapter's {tuple(a.shape)}, "
                                     f"{tuple(b.shape)}")
                a.copy_(A.to(a))
                b.copy_(B.to(b))


def load_recovered(base: nn.Module, params: Path, *, n_heads: int,
                   masks_file: Path | None, masked: bool = True) -> RecoveryModel:
    """The trained model again: the degraded ``base`` with the recovery parameters saved in
    ``params`` (``lcc.safetensors``, ``lora/``) attached as training ran them, the
    compensation by hooks and the adapters unmerged, under the sparsity mask (``masked``
    False: without it, as ``train.lora.merge: none`` trains them). The export compares its
    checkpoint with this model."""
    from peft import PeftModel

    comp = None
    if (params / LCC_FILE).is_file():
        comp = Compensation.from_state(load_file(str(params / LCC_FILE)), n_heads=n_heads)
    model = base
    if (params / LORA_DIR).is_dir():
        model = PeftModel.from_pretrained(base, str(params / LORA_DIR))
        if masked:
            mask_lora(model, masks_file)
    return RecoveryModel(model, comp).eval()


__all__ = ("LCC_FILE", "LORA_DIR", "RecoveryModel", "add_lora", "load_recovered")

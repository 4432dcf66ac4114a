"""Recovery methods: what is trained on the degraded model, and the training task.

A method is registered by name with what it needs and one builder function:

- ``lcc``: RestoreLCC compensation on the chosen heads (:mod:`recoup.stages.lcc.compensation`);
  needs the svd and select stages.
- ``lora``: LoRA adapters through ``peft`` on selected layers (a list, or ``auto``: the
  layers whose outputs the degradation moved most, :func:`layer_output_errors`).
- ``lcc+lora``: both, trained jointly.

:func:`build_task` turns a :class:`TrainJob` (plain data, picklable, built by the train
stage on the driver) into the task a DeepSpeed worker trains
(:class:`recoup.cluster.train.TrainTask`): the degraded model with the trainable parts,
its tokenised samples, the loss, and how the trained parameters are saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from safetensors.torch import save_file
from torch import Tensor, nn

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.registry import Registry
from recoup.stages.lcc.compensation import (
    DEFAULT_INIT_STD,
    Compensation,
    HeadId,
    attach,
)
from recoup.stages.model import modelio
from recoup.stages.recovery.losses import LossConfig, recovery_loss, response_target_mask

LCC_FILE = "lcc.safetensors"
LORA_DIR = "lora"
SUMMARY_FILE = "recovery.json"
LINEAR_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-layout decoder block: the LoRA targets to choose from."""


# --------------------------------------------------------------------------- configs


class LccConfig(StrictModel):
    """The compensation vectors ``c = V^T beta + b`` of the chosen heads."""

    init: Literal["normal", "lost_component"] = Field(
        "normal",
        description="'normal': beta, b ~ N(0, init_std) (the reference); 'lost_component': "
        "start at the mean lost component of each head (from the collect stage's activations).",
    )
    init_std: float = Field(DEFAULT_INIT_STD, gt=0, description="Std of the 'normal' init.")
    init_directions: int = Field(
        10, ge=1, description="'lost_component': singular directions kept in the mean shift."
    )


class LoraAdapterConfig(StrictModel):
    """LoRA adapters (``peft``) on some decoder layers."""

    layers: tuple[int, ...] | Literal["auto"] = Field(
        "auto",
        description="Decoder layers that get adapters: a list of indices, or 'auto' = the "
        "`auto_layers` layers whose outputs differ most between dense and degraded (from "
        "the sensitivity stage when it is in the pipeline, else measured on the first "
        "`auto_samples` training samples).",
    )
    auto_layers: int = Field(4, ge=1, description="'auto': how many layers.")
    auto_samples: int = Field(
        16, ge=1, description="'auto': training samples run through both models to rank layers."
    )
    targets: tuple[str, ...] = Field(
        LINEAR_TARGETS, min_length=1, description="Linear layers of a block that get adapters."
    )
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [t for t in v if t not in LINEAR_TARGETS]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {', '.join(LINEAR_TARGETS)}")
        return v


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Encoded:
    """One tokenised sample: ``ids`` = prompt tokens then response tokens (+ EOS)."""

    ids: tuple[int, ...]
    prompt_len: int


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    """Everything a training worker needs, as plain data (it travels to Ray workers)."""

    method: str
    degraded_dir: Path
    dense_dir: Path
    dtype: str
    samples: tuple[Encoded, ...]
    pad_id: int
    loss: LossConfig
    n_heads: int
    lcc: LccConfig | None = None
    chosen: tuple[HeadId, ...] = ()
    V: Mapping[HeadId, Tensor] = field(default_factory=dict)
    lost: Mapping[HeadId, Tensor] | None = None
    lora: LoraAdapterConfig | None = None
    lora_layers: tuple[int, ...] = ()


def encode_sample(tokenizer: Any, prompt: str, response: str, max_len: int) -> Encoded:
    """Prompt and response tokenised apart (so the boundary is exact), EOS after a
    non-empty response, cut to ``max_len`` tokens."""
    p = list(tokenizer(prompt)["input_ids"])
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) if response else []
    if r and tokenizer.eos_token_id is not None:
        r.append(int(tokenizer.eos_token_id))
    ids = (p + r)[:max_len]
    return Encoded(ids=tuple(int(i) for i in ids), prompt_len=min(len(p), len(ids)))


def collate(samples: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``target_mask`` (B, T_max)."""
    lengths = torch.tensor([len(s.ids) for s in samples])
    t = int(lengths.max())
    ids = torch.full((len(samples), t), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.ids)] = torch.tensor(s.ids, dtype=torch.long)
    pos = torch.arange(t)[None, :]  # (1, T)
    attention = (pos < lengths[:, None]).long()  # (B, T)
    prompt = torch.tensor([s.prompt_len for s in samples])
    return {"input_ids": ids, "attention_mask": attention,
            "target_mask": response_target_mask(prompt, lengths, t)}


# --------------------------------------------------------------------------- the model


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


def add_lora(model: nn.Module, cfg: LoraAdapterConfig, layers: Sequence[int]) -> nn.Module:
    """Wrap ``model`` with ``peft`` LoRA adapters on ``cfg.targets`` of ``layers``."""
    from peft import LoraConfig, get_peft_model

    if not layers:
        raise ValueError("LoRA needs at least one layer")
    n_layers = len(model.model.layers)
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"train.lora.layers {bad} are outside the model's {n_layers} layers")
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets), layers_to_transform=sorted(layers),
        layers_pattern="layers", bias="none", task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_cfg)


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True, kw_only=True)
class RecoveryMethod:
    name: str
    #: needs chosen heads and their V (the svd and select stages)
    needs_heads: bool
    #: trains LoRA adapters (needs LoRA layers)
    uses_lora: bool
    build: Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel]


_METHODS: Registry[RecoveryMethod] = Registry(
    "recovery method", unknown="train.method {name!r} is unknown; choose one of {known}")


def register_method(name: str, *, needs_heads: bool, uses_lora: bool) -> Callable[
        [Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel]],
        Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel]]:
    """Register a recovery method's builder; a second registration of a name is an error."""

    def deco(fn: Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel],
             ) -> Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel]:
        _METHODS.add(name, RecoveryMethod(name=name, needs_heads=needs_heads,
                                          uses_lora=uses_lora, build=fn))
        return fn

    return deco


def get_method(name: str) -> RecoveryMethod:
    return _METHODS.get(name)


def method_names() -> tuple[str, ...]:
    return _METHODS.names()


def _compensation(job: TrainJob, gen: torch.Generator) -> Compensation:
    if job.lcc is None or not job.chosen:
        raise ValueError(f"method {job.method!r} needs chosen heads and the lcc settings")
    return Compensation.create(list(job.chosen), job.V, n_heads=job.n_heads, init=job.lcc.init,
                               std=job.lcc.init_std, lost=job.lost, generator=gen)


@register_method("lcc", needs_heads=True, uses_lora=False)
def _lcc(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    return RecoveryModel(model, _compensation(job, gen))


@register_method("lora", needs_heads=False, uses_lora=True)
def _lora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    assert job.lora is not None
    return RecoveryModel(add_lora(model, job.lora, job.lora_layers))


@register_method("lcc+lora", needs_heads=True, uses_lora=True)
def _lcc_lora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    assert job.lora is not None
    comp = _compensation(job, gen)
    return RecoveryModel(add_lora(model, job.lora, job.lora_layers), comp)


# --------------------------------------------------------------------------- auto layers


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


def _layer_of(output: Any) -> Tensor:
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
    for layer in dense.model.layers:
        def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            inputs.append(args[0] if args else kwargs["hidden_states"])
            dense_out.append(_layer_of(out))
        handles.append(layer.register_forward_hook(grab, with_kwargs=True))
    try:
        dense(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    handles = []
    for i, layer in enumerate(degraded.model.layers):
        def swap(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 i: int = i) -> tuple[tuple[Any, ...], dict[str, Any]]:
            if args:
                return (inputs[i],) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": inputs[i]}

        def keep(_m: nn.Module, _args: tuple[Any, ...], out: Any) -> None:
            deg_out.append(_layer_of(out))
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
        mask = batch["attention_mask"]
        if normalize == "update":
            n, _ = layer_error_terms(d, g, mask)
            _, m = layer_error_terms([a - b for a, b in zip(d, x, strict=True)], d, mask)
        else:
            n, m = layer_error_terms(d, g, mask)
            if normalize == "none":
                m = torch.full_like(m, float(mask.sum()))
        num = n if num is None else num + n
        den = m if den is None else den + m
    if num is None or den is None:
        raise ValueError("no calibration batches to rank layers on")
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


# --------------------------------------------------------------------------- the task


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts, before DeepSpeed partitions anything."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


class RecoveryTask:
    """A :class:`recoup.cluster.train.TrainTask` for a :class:`TrainJob`."""

    def __init__(self, job: TrainJob, device: torch.device):
        dtype = modelio.DTYPES[job.dtype]
        method = get_method(job.method)
        base = modelio.load_model(job.degraded_dir, dtype, str(device))
        base.requires_grad_(False)
        self.base_params = sum(p.numel() for p in base.parameters())
        gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**63))
        self.module: RecoveryModel = method.build(base, job, gen).to(device)
        self.module.train()
        self.trainable_params, _ = count_parameters(self.module)
        self.teacher = None
        if job.loss.kl_weight:
            self.teacher = modelio.load_model(job.dense_dir, dtype, str(device))
            self.teacher.requires_grad_(False)
        self.job = job

    def num_samples(self) -> int:
        return len(self.job.samples)

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        b = collate([self.job.samples[i] for i in indices], self.job.pad_id)
        return {k: v.to(device) for k, v in b.items()}

    def loss(self, engine: Any, batch: Mapping[str, Tensor],
             ) -> tuple[Tensor, dict[str, float], int]:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
        loss, parts = recovery_loss(self.job.loss, logits, batch["input_ids"],
                                    batch["target_mask"], batch["attention_mask"], teacher)
        return loss, parts, int(batch["attention_mask"].sum())

    def save(self, folder: Path) -> dict[str, Any]:
        saved = self.module.save(folder)
        summary = {
            "method": self.job.method,
            "chosen": [list(h) for h in self.job.chosen],
            "lora_layers": list(self.job.lora_layers),
            "n_heads": self.job.n_heads,
            "trainable_params": self.trainable_params,
            "base_params": self.base_params,
            "trainable_fraction": self.trainable_params / self.base_params,
        }
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return {**saved, **summary}


def build_task(job: TrainJob, device: torch.device) -> RecoveryTask:
    """The task factory handed to :func:`recoup.cluster.train.run_training`."""
    return RecoveryTask(job, device)


__all__ = (
    "Encoded",
    "LccConfig",
    "LoraAdapterConfig",
    "RecoveryMethod",
    "RecoveryModel",
    "RecoveryTask",
    "TrainJob",
    "add_lora",
    "build_task",
    "collate",
    "count_parameters",
    "encode_sample",
    "get_method",
    "layer_error_terms",
    "layer_output_errors",
    "local_layer_outputs",
    "method_names",
    "rank_layers",
    "register_method",
    "top_layers",
)

"""Recovery methods: what is trained (or fitted) on the degraded model, registered by name.

A method is registered with what it needs and one builder function that turns the degraded
model and a :class:`recoup.stages.recovery.job.TrainJob` into a
:class:`recoup.stages.recovery.recovery_model.RecoveryModel`:

- ``lcc``: RestoreLCC compensation on the chosen heads (:mod:`recoup.stages.lcc.compensation`);
  needs the svd and select stages.
- ``lora``: LoRA adapters through ``peft`` on selected layers (a list, or ``auto``: the
  layers whose outputs the degradation moved most,
  :func:`recoup.stages.recovery.layer_ranking.layer_output_errors`).
- ``lcc+lora``: both, trained jointly.

Training-free methods (no optimizer, no DeepSpeed; fitted block by block in the train
stage's process by :mod:`recoup.stages.recovery.training_free`, saved in the same files):

- ``lcc-closed``: each compensated head's ``c`` is the mean over all calibration tokens of
  ``z_dense - z_degraded`` at its ``o_proj`` input (the chosen heads, or every head);
- ``eora``: EoRA low-rank adapters (:mod:`recoup.stages.recovery.eora`) on the LoRA layers;
- ``lcc-closed+eora``: both, EoRA fitted on the compensated model.

The same fits start the trained methods: ``train.lcc.init: closed_form`` and
``train.lora.init: eora``.

LoRA always runs under the degraded model's sparsity mask (``W_hat + M * scale B A``,
:mod:`recoup.stages.recovery.masked_lora`), in training and in the training-free fit
alike, so the export's masked merge is exactly the model that was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recoup.orchestrator.registry import Registry
from recoup.stages.lcc.compensation import Compensation
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.recovery_model import RecoveryModel, add_lora

#: A method's builder: the degraded model, the job and a seeded generator -> the model to train.
Builder = Callable[[nn.Module, TrainJob, torch.Generator], RecoveryModel]


@dataclass(frozen=True, kw_only=True)
class RecoveryMethod:
    """A registered method: what it needs from the pipeline and how it is built."""

    name: str
    #: needs chosen heads and their V (the svd and select stages)
    needs_heads: bool
    #: trains LoRA adapters (needs LoRA layers)
    uses_lora: bool
    build: Builder
    #: has compensation vectors (lcc.safetensors)
    uses_lcc: bool = False
    #: fitted in closed form (no optimizer, no DeepSpeed): compensation and/or EoRA
    training_free: bool = False


_METHODS: Registry[RecoveryMethod] = Registry(
    "recovery method", unknown="train.method {name!r} is unknown; choose one of {known}")


def register_method(name: str, *, needs_heads: bool, uses_lora: bool, uses_lcc: bool = False,
                    training_free: bool = False) -> Callable[[Builder], Builder]:
    """Register a recovery method's builder; a second registration of a name is an error."""

    def deco(fn: Builder) -> Builder:
        _METHODS.add(name, RecoveryMethod(name=name, needs_heads=needs_heads,
                                          uses_lora=uses_lora, build=fn,
                                          uses_lcc=uses_lcc or needs_heads,
                                          training_free=training_free))
        return fn

    return deco


def get_method(name: str) -> RecoveryMethod:
    return _METHODS.get(name)


def method_names() -> tuple[str, ...]:
    return _METHODS.names()


def _compensation(job: TrainJob, gen: torch.Generator) -> Compensation:
    """The compensation of ``job.chosen``; ``job.lost`` (when given) is where it starts:
    the collected lost component or the closed-form mean shift (``beta @ V = c``, b = 0)."""
    if job.lcc is None or not job.chosen:
        raise ValueError(f"method {job.method!r} needs chosen heads and the lcc settings")
    init = "lost_component" if job.lost is not None else job.lcc.init
    if init == "closed_form":
        raise ValueError("init 'closed_form' needs the fitted components (TrainJob.lost)")
    return Compensation.create(list(job.chosen), job.V, n_heads=job.n_heads, init=init,
                               std=job.lcc.init_std, lost=job.lost, generator=gen)


def _adapters(model: nn.Module, job: TrainJob) -> nn.Module:
    """The job's LoRA adapters on ``model``, started at ``job.lora_init`` when given, run
    under the sparsity mask (what the export merges) unless ``train.lora.merge: none``."""
    if job.lora is None:
        raise ValueError(f"method {job.method!r} needs the lora settings")
    return add_lora(model, job.lora, job.lora_layers, init=job.lora_init,
                    masked=job.lora.masked, masks_file=job.masks_file)


@register_method("lcc", needs_heads=True, uses_lora=False)
def _lcc(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    return RecoveryModel(model, _compensation(job, gen))


@register_method("lora", needs_heads=False, uses_lora=True)
def _lora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    return RecoveryModel(_adapters(model, job))


@register_method("lcc+lora", needs_heads=True, uses_lora=True)
def _lcc_lora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    comp = _compensation(job, gen)
    return RecoveryModel(_adapters(model, job), comp)


@register_method("lcc-closed", needs_heads=False, uses_lora=False, uses_lcc=True,
                 training_free=True)
def _lcc_closed(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    return RecoveryModel(model, _compensation(job, gen))


@register_method("eora", needs_heads=False, uses_lora=True, training_free=True)
def _eora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    return RecoveryModel(_adapters(model, job))


@register_method("lcc-closed+eora", needs_heads=False, uses_lora=True, uses_lcc=True,
                 training_free=True)
def _lcc_closed_eora(model: nn.Module, job: TrainJob, gen: torch.Generator) -> RecoveryModel:
    comp = _compensation(job, gen)
    return RecoveryModel(_adapters(model, job), comp)


__all__ = ("Builder", "RecoveryMethod", "get_method", "method_names", "register_method")

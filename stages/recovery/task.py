"""The training task a DeepSpeed worker runs for a :class:`~recoup.stages.recovery.job.TrainJob`.

:func:`build_task` is the factory handed to :func:`recoup.cluster.train.run_training`: on
each worker it builds the degraded model the way the engine will hold it (partitioned from
construction under ZeRO-3, :mod:`recoup.stages.model.partitioned`; whole under ZeRO 0-2),
attaches the method's trainable parts (:func:`build_model`), batches the job's samples and
computes the loss (:mod:`recoup.stages.recovery.losses`). With the KL on, the dense teacher
runs once before the student is built and training reads its top-k per position
(:mod:`recoup.stages.recovery.teacher`); ``teacher_top_k: 0`` keeps the exact KL with the
whole dense model resident instead. Saving is shared with the training-free methods
(:func:`save_recovered`, :func:`save_training_free`), so a fitted model is written exactly
as a trained one and the export reads both alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recoup.cluster.train import PARAMS as PARAMS_DIR
from recoup.cluster.train import RESULT as TRAIN_RESULT
from recoup.cluster.train_task import WorkerSetup
from recoup.orchestrator.store import atomic_write_json, commit_path, tmp_path_for
from recoup.stages.model import modelio
from recoup.stages.model.partitioned import full_numel, load_partitioned, place_unpartitioned
from recoup.stages.model.streamed import (
    CheckpointTensors,
    StreamedWeights,
    real_rotary,
    streamed_model,
)
from recoup.stages.recovery.batching import collate, topk_of
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.losses import recovery_loss
from recoup.stages.recovery.masked_lora import lora_base_weights, mask_lora, zero3_leaves
from recoup.stages.recovery.methods import get_method
from recoup.stages.recovery.recovery_model import RecoveryModel
from recoup.stages.recovery.teacher import TopKStore, cache_teacher, teacher_dtype

SUMMARY_FILE = "recovery.json"


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts of the whole parameters (partitioned or not)."""
    trainable = sum(full_numel(p) for p in module.parameters() if p.requires_grad)
    frozen = sum(full_numel(p) for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def _as_setup(where: WorkerSetup | torch.device | str) -> WorkerSetup:
    return where if isinstance(where, WorkerSetup) else WorkerSetup.local(where)


def build_model(job: TrainJob, where: WorkerSetup | torch.device | str,
                ) -> tuple[RecoveryModel, int]:
    """The degraded model with the job's method attached (its init included) and the base
    model's parameter count. What training optimises, what a training-free method saves
    and (with saved parameters loaded) the trained model.

    ``where``: a training worker's setup (under ZeRO-3 the frozen base is built partitioned
    and only the parts the method adds are ordinary parameters; with ``streamed`` it is not
    held at all but read block by block, :func:`_build_streamed`; activation checkpointing
    of the base's blocks when asked), or a bare device for a whole model in one process.
    """
    setup = _as_setup(where)
    if setup.streamed:
        return _build_streamed(job, setup)
    method = get_method(job.method)
    if setup.zero_init is not None:
        base = load_partitioned(job.degraded_dir, setup.zero_init)
    else:
        base = modelio.load_model(job.degraded_dir, modelio.DTYPES[job.dtype], str(setup.device))
    base.requires_grad_(False)
    if setup.activation_checkpointing:
        _checkpoint_blocks(base)
    base_params = sum(full_numel(p) for p in base.parameters())
    return place_unpartitioned(method.build(base, job, _generator()), setup.device), base_params


def _generator() -> torch.Generator:
    """The trainable init's generator, seeded from torch's seed (the engine's, per run)."""
    return torch.Generator().manual_seed(int(torch.initial_seed()) % (2**63))


def _checkpoint_blocks(base: nn.Module) -> None:
    """Activation checkpointing of the decoder blocks, non-reentrant: gradients reach
    adapters and compensation inside a block whose input needs none (the frozen
    embeddings'); transformers < 5.24 has the old name."""
    enable = getattr(base, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _unmasked(job: TrainJob) -> TrainJob:
    """``job`` with its adapters built without the sparsity mask, for a model built on a
    weightless stand-in, whose zeros would mask every weight (the caller reads the mask
    from the checkpoint where it is needed)."""
    return job if job.lora is None else replace(job, lora=replace(job.lora, masked=False))


def _build_streamed(job: TrainJob, setup: WorkerSetup) -> tuple[RecoveryModel, int]:
    """:func:`build_model` with the frozen base left in its checkpoint
    (:mod:`recoup.stages.model.streamed`): the method is built on a weightless stand-in of
    the degraded model (its adapters and compensation are real), the keep masks are read
    from the checkpoint one adapted linear at a time, and then every frozen parameter is
    taken off the module and read around its module's call. The blocks are always
    checkpointed (the backward would keep every block's weights otherwise)."""
    dtype = setup.compute_dtype or modelio.DTYPES[job.dtype]
    base = modelio.weightless_model(job.degraded_dir, dtype)
    real_rotary(base, "cpu")
    base_params = sum(p.numel() for p in base.parameters())
    module = get_method(job.method).build(base, _unmasked(job), _generator())
    if job.lora is not None and job.lora.masked:  # the stand-ins' zeros are no mask
        mask_lora(module.base, job.masks_file,
                  CheckpointTensors(job.degraded_dir, lora_base_weights(module.base)))
    # the embeddings and the LM head, the largest tensors, read by rows
    module.streamed = StreamedWeights(
        module.base, job.degraded_dir, device=setup.device, dtype=dtype,
        by_rows=[base.get_input_embeddings(), base.get_output_embeddings()])
    _checkpoint_blocks(base)
    return module.to(setup.device), base_params


def summary_of(job: TrainJob, trainable_params: int, base_params: int) -> dict[str, Any]:
    """``recovery.json``: what was recovered and how many parameters it took."""
    return {
        "method": job.method,
        "chosen": [list(h) for h in job.chosen],
        "lora_layers": list(job.lora_layers),
        # how the export treats the adapter: merged under the mask, or left unmerged
        "lora_merge": None if job.lora is None else ("masked" if job.lora.masked else "none"),
        "n_heads": job.n_heads,
        "trainable_params": trainable_params,
        "base_params": base_params,
        "trainable_fraction": trainable_params / base_params,
    }


def save_recovered(module: RecoveryModel, job: TrainJob, folder: Path, trainable_params: int,
                   base_params: int) -> dict[str, Any]:
    """Write ``module``'s recovery parameters and ``recovery.json`` into ``folder``."""
    saved = module.save(folder)
    summary = summary_of(job, trainable_params, base_params)
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return {**saved, **summary}


class RecoveryTask:
    """A :class:`recoup.cluster.train.TrainTask` for a :class:`TrainJob`."""

    def __init__(self, job: TrainJob, where: WorkerSetup | torch.device | str):
        setup = _as_setup(where)
        self.job = job
        # the teacher first and gone before the student is built: one model at a time
        self.topk: TopKStore | None = cache_teacher(job, setup) if job.loss.cached_teacher \
            else None
        self.module, self.base_params = build_model(job, setup)
        if self.module.has_lora:
            zero3_leaves(self.module)
        self.module.train()
        self.trainable_params, _ = count_parameters(self.module)
        self.teacher = None
        if job.loss.resident_teacher:  # the exact KL: the dense model beside, whole, or
            # streamed like the student (in the engine's dtype, as the student's reads)
            if setup.streamed:
                self.teacher = streamed_model(job.dense_dir, teacher_dtype(job, setup),
                                              setup.device)
            else:
                self.teacher = modelio.load_model(job.dense_dir, modelio.DTYPES[job.dtype],
                                                  str(setup.device))
            self.teacher.requires_grad_(False)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: beta and b at ``train.lcc.lr`` (when set), the rest at ``lr``."""
        return self.module.param_groups(lr, self.job.lcc.lr if self.job.lcc else None)

    def num_samples(self) -> int:
        return len(self.job.samples)

    def sample_lengths(self) -> list[int]:
        """Tokens per sample (prompt + response), what length-grouped batches sort by."""
        return [len(s.ids) for s in self.job.samples]

    def batch(self, indices: list[int], device: torch.device) -> dict[str, Tensor]:
        b = collate([self.job.samples[i] for i in indices], self.job.pad_id)
        if self.topk is not None:
            b.update(self.topk.batch(indices, b["input_ids"].shape[1]))
        return {k: v.to(device) for k, v in b.items()}

    def loss(self, engine: Any, batch: Mapping[str, Tensor],
             ) -> tuple[Tensor, dict[str, float], int]:
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        teacher: Any = topk_of(batch)
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"],
                                       use_cache=False).logits
        spec = self.job.loss
        loss, parts = recovery_loss(logits, batch["input_ids"], batch["target_mask"],
                                    batch["attention_mask"], teacher, ce_weight=spec.ce_weight,
                                    kl_weight=spec.kl_weight, temperature=spec.temperature,
                                    kl_on=spec.kl_on, chunk_tokens=spec.chunk_tokens)
        return loss, parts, int(batch["attention_mask"].sum())

    def save(self, folder: Path) -> dict[str, Any]:
        return save_recovered(self.module, self.job, folder, self.trainable_params,
                              self.base_params)


def save_training_free(job: TrainJob, out_dir: Path) -> dict[str, Any]:
    """The fitted (training-free) model, saved as trained parameters are (``params/``,
    ``train_result.json``), so the export folds and merges it unchanged.

    Built on a weightless stand-in of the degraded model
    (:func:`~recoup.stages.model.modelio.weightless_model`): what is saved, the fitted
    components and factors, comes with the job, so no weight is read and a 70B fit saves
    from a few MB of host memory. The adapters' sparsity mask is left off here: it changes
    no saved tensor (the export merges under it) and reading it needs the weights."""
    base = modelio.weightless_model(job.degraded_dir, modelio.DTYPES[job.dtype])
    base_params = sum(p.numel() for p in base.parameters())
    module = get_method(job.method).build(base, _unmasked(job), torch.Generator().manual_seed(0))
    trainable, _ = count_parameters(module)
    folder = out_dir / PARAMS_DIR
    tmp = tmp_path_for(folder)
    tmp.mkdir(parents=True)
    saved = save_recovered(module, job, tmp, trainable, base_params)
    commit_path(tmp, folder)
    result = {"training_free": True, "steps": 0, **saved}
    atomic_write_json(out_dir / TRAIN_RESULT, result)
    return result


def build_task(job: TrainJob, where: WorkerSetup | torch.device | str) -> RecoveryTask:
    """The task factory handed to :func:`recoup.cluster.train.run_training` (``where``: the
    worker's setup; a bare device builds the whole model in this process)."""
    return RecoveryTask(job, where)


__all__ = ("SUMMARY_FILE", "RecoveryTask", "build_model", "build_task", "count_parameters",
           "save_recovered", "save_training_free", "summary_of")

"""The training task a DeepSpeed worker runs for a :class:`~recoup.stages.recovery.job.TrainJob`.

:func:`build_task` is the factory handed to :func:`recoup.cluster.train.run_training`: on
each worker it loads the degraded model, attaches the method's trainable parts
(:func:`build_model`), batches the job's samples and computes the loss
(:mod:`recoup.stages.recovery.losses`, with the dense model as teacher when the KL is on).
Saving is shared with the training-free methods (:func:`save_recovered`,
:func:`save_training_free`), so a fitted model is written exactly as a trained one and the
export reads both alike.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recoup.cluster.train import PARAMS as PARAMS_DIR
from recoup.cluster.train import RESULT as TRAIN_RESULT
from recoup.orchestrator.store import atomic_write_json, commit_path, tmp_path_for
from recoup.stages.model import modelio
from recoup.stages.recovery.batching import collate
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.losses import recovery_loss
from recoup.stages.recovery.masked_lora import zero3_leaves
from recoup.stages.recovery.methods import get_method
from recoup.stages.recovery.recovery_model import RecoveryModel

SUMMARY_FILE = "recovery.json"


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) element counts, before DeepSpeed partitions anything."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


def build_model(job: TrainJob, device: torch.device | str) -> tuple[RecoveryModel, int]:
    """The degraded model with the job's method attached (its init included), on
    ``device``, and the base model's parameter count. What training optimises, what a
    training-free method saves, and (with saved parameters loaded) the trained model."""
    dtype = modelio.DTYPES[job.dtype]
    method = get_method(job.method)
    base = modelio.load_model(job.degraded_dir, dtype, str(device))
    base.requires_grad_(False)
    base_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(int(torch.initial_seed()) % (2**63))
    return method.build(base, job, gen).to(device), base_params


def summary_of(job: TrainJob, trainable_params: int, base_params: int) -> dict[str, Any]:
    """``recovery.json``: what was recovered and how many parameters it took."""
    return {
        "method": job.method,
        "chosen": [list(h) for h in job.chosen],
        "lora_layers": list(job.lora_layers),
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

    def __init__(self, job: TrainJob, device: torch.device):
        dtype = modelio.DTYPES[job.dtype]
        self.module, self.base_params = build_model(job, device)
        if self.module.has_lora:
            zero3_leaves(self.module)
        self.module.train()
        self.trainable_params, _ = count_parameters(self.module)
        self.teacher = None
        if job.loss.kl_weight:
            self.teacher = modelio.load_model(job.dense_dir, dtype, str(device))
            self.teacher.requires_grad_(False)
        self.job = job

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups: beta and b at ``train.lcc.lr`` (when set), the rest at ``lr``."""
        return self.module.param_groups(lr, self.job.lcc.lr if self.job.lcc else None)

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
        spec = self.job.loss
        loss, parts = recovery_loss(logits, batch["input_ids"], batch["target_mask"],
                                    batch["attention_mask"], teacher, ce_weight=spec.ce_weight,
                                    kl_weight=spec.kl_weight, temperature=spec.temperature,
                                    kl_on=spec.kl_on)
        return loss, parts, int(batch["attention_mask"].sum())

    def save(self, folder: Path) -> dict[str, Any]:
        return save_recovered(self.module, self.job, folder, self.trainable_params,
                              self.base_params)


def save_training_free(job: TrainJob, out_dir: Path, device: str) -> dict[str, Any]:
    """The fitted (training-free) model, saved as trained parameters are (``params/``,
    ``train_result.json``), so the export folds and merges it unchanged."""
    module, base_params = build_model(job, device)
    trainable, _ = count_parameters(module)
    folder = out_dir / PARAMS_DIR
    tmp = tmp_path_for(folder)
    tmp.mkdir(parents=True)
    saved = save_recovered(module, job, tmp, trainable, base_params)
    commit_path(tmp, folder)
    result = {"training_free": True, "steps": 0, **saved}
    atomic_write_json(out_dir / TRAIN_RESULT, result)
    return result


def build_task(job: TrainJob, device: torch.device) -> RecoveryTask:
    """The task factory handed to :func:`recoup.cluster.train.run_training`."""
    return RecoveryTask(job, device)


__all__ = ("SUMMARY_FILE", "RecoveryTask", "build_model", "build_task", "count_parameters",
           "save_recovered", "save_training_free", "summary_of")

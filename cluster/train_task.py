"""The contract between the training loop (:mod:`recoup.cluster.train`) and what it trains.

A *task factory* builds a :class:`TrainTask` inside each worker from a plain spec and a
:class:`WorkerSetup`: where the worker runs and how the engine will hold the model. The
setup is what lets a task build its model the way DeepSpeed will keep it (partitioned
from construction under ZeRO-3) rather than whole and partitioned afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch


class TrainTask(Protocol):
    """What a training worker trains. Built inside the worker by the task factory."""

    #: the module DeepSpeed wraps; its trainable parameters have requires_grad
    module: torch.nn.Module

    def num_samples(self) -> int: ...

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The micro-batch of these sample indices, on ``device``."""

    def loss(self, engine: Any, batch: Mapping[str, torch.Tensor],
             ) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, its parts for logging, tokens in the micro-batch); ``engine(**inputs)``
        runs the wrapped module."""

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the trained parameters to ``folder`` (rank 0, parameters gathered).

        Optional: ``param_groups(lr) -> list[dict]``, AdamW parameter groups (each may set
        its own ``lr``); without it every trainable parameter trains at ``lr``.
        ``sample_lengths() -> Sequence[int]``: tokens per sample, what
        ``train.engine.group_by_length`` batches by."""


@dataclass(frozen=True, kw_only=True)
class WorkerSetup:
    """What a training worker tells its task factory: where it runs and how the engine
    will hold the model, so the task builds it that way from the start.

    ``zero_init``: the engine's DeepSpeed config when ZeRO-3 partitions the parameters;
    the task then constructs its frozen base partitioned (``deepspeed.zero.Init``, see
    :mod:`recoup.stages.model.partitioned`) instead of loading it whole, and every rank must
    build the same modules in the same order. None: ZeRO 0-2, the model is loaded whole.
    ``work_dir``: a folder of the job that survives a resume, for files the task computes
    once (a teacher's top-k); ``job_key`` identifies the job they belong to.
    ``streamed``: the frozen base stays in its checkpoint files, read block by block as it
    runs (``train.engine.frozen_weights: streamed``, :mod:`recoup.stages.model.streamed`);
    ``zero_init`` then applies to the trainable parameters only (DeepSpeed partitions
    them itself). ``compute_dtype``: the dtype the engine computes in (bf16 when the
    engine runs bf16; None: the model's own), for passes the task runs outside the engine
    (a teacher pass), so they cost what the engine's forward costs.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    zero_init: Mapping[str, Any] | None = None
    activation_checkpointing: bool = False
    #: sequences per forward pass, for passes the task runs itself (a teacher pass)
    micro_batch: int = 1
    work_dir: Path | None = None
    job_key: str = ""
    compute_dtype: torch.dtype | None = None
    streamed: bool = False

    @classmethod
    def local(cls, device: torch.device | str) -> WorkerSetup:
        """A single process on ``device``, no ZeRO-3: a task built outside the loop (a plain
        torch loop in a benchmark, a test)."""
        return cls(device=torch.device(device))


#: builds the task on a worker: ``make_task(task_spec, setup)``
TaskFactory = Callable[[Any, WorkerSetup], TrainTask]


def match_zero_init(module: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Give the parameters a task added after a partitioned load (adapters, compensation)
    what ``deepspeed.initialize`` gives a module it partitions itself: the engine's 16-bit
    dtype (``dtype``; None: kept). A module with partitioned parameters counts as built by
    ``zero.Init``, and DeepSpeed then leaves every dtype as it finds it."""
    if dtype is None:
        return
    for p in module.parameters():  # a partitioned parameter carries a DeepSpeed id
        if not hasattr(p, "ds_id") and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def sample_lengths(task: TrainTask) -> list[int]:
    """The task's tokens per sample, for length-grouped batches; a task that cannot say is
    refused by name rather than trained in another order than asked."""
    lengths = getattr(task, "sample_lengths", None)
    if lengths is None:
        raise ValueError(f"train.engine.group_by_length needs a task with sample_lengths(); "
                         f"{type(task).__name__} has none")
    out = [int(n) for n in lengths()]
    if len(out) != task.num_samples():
        raise ValueError(f"{type(task).__name__}.sample_lengths() gives {len(out)} lengths "
                         f"for {task.num_samples()} samples")
    return out


def largest_block_params(module: torch.nn.Module) -> int:
    """Parameters of the largest repeated block (a child of the module's longest
    ``ModuleList``: a decoder layer), counted whole whether ZeRO-3 partitioned them
    (``ds_numel``) or not; 0 for a module without one. ZeRO-3's gathering limits are sized
    by it (:func:`recoup.cluster.engine.zero3_live_limits`)."""
    lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        return 0
    longest = max(lists, key=len)
    return max(sum(int(getattr(p, "ds_numel", p.numel())) for p in block.parameters())
               for block in longest)


__all__ = ("TaskFactory", "TrainTask", "WorkerSetup", "largest_block_params", "match_zero_init",
           "sample_lengths")

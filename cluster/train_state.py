"""What makes a resumed training run end where an uninterrupted one ends: the
deterministic data order, the checkpoints and the step log.

- the samples of micro-batch ``g`` on rank ``r`` are a pure function of (seed, g, r) and
  the sample lengths: a stream of seeded per-epoch permutations, optionally grouped by
  length, cut in order (:func:`sample_indices`);
- the torch RNG is reseeded from (seed, g, r) before every micro-batch (:func:`micro_seed`);
- checkpoints (``OUT/checkpoints``): DeepSpeed tags ``step-NNNNNN``; one counts only once
  ``latest.json`` names it (written atomically by rank 0 after every rank saved); a
  ``job.json`` holds the job's fingerprint, and checkpoints of another job are deleted
  before training, never resumed;
- ``OUT/log.jsonl``: one line per optimizer step from rank 0; lines past the resumed
  step are dropped.

Used by the loop in :mod:`recoup.cluster.train`; no Ray, no DeepSpeed import here
(``save_checkpoint`` is handed the engine).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recoup.orchestrator.store import atomic_write_json

CHECKPOINTS = "checkpoints"
LOG = "log.jsonl"
_JOB = "job.json"
_LATEST = "latest.json"
_SEED_MIX = 1_000_003
"""Prime mixing (seed, micro-batch, rank) into one RNG seed."""


# --------------------------------------------------------------------------- pure helpers


GROUP_BATCHES = 50
"""Global micro-batches per length-sorted group (:func:`epoch_order`): enough that each batch
of the group holds samples of nearly one length, few enough that an epoch still mixes
(Hugging Face's ``group_by_length`` uses the same 50)."""


def epoch_order(n: int, *, seed: int, epoch: int, batch: int,
                lengths: Sequence[int] | None = None) -> list[int]:
    """Epoch ``epoch``'s sample order: a permutation seeded by (seed, epoch).

    With ``lengths`` (tokens per sample), the permutation is cut into groups of
    :data:`GROUP_BATCHES` x ``batch`` samples, each group sorted by length and cut into
    batches of ``batch``, and the batches shuffled (same generator): every batch then holds
    samples of about one length, so right padding (to the longest in the micro-batch) and
    the wait for the slowest rank (each rank takes a slice of the same batch) waste little,
    while which samples meet in a batch stays random from group to group.
    """
    gen = torch.Generator().manual_seed(seed * _SEED_MIX + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    if lengths is None:
        return perm
    if len(lengths) != n:
        raise ValueError(f"{len(lengths)} sample lengths for {n} samples")
    size = batch * GROUP_BATCHES
    batches = []
    for start in range(0, n, size):
        group = sorted(perm[start: start + size], key=lambda i: -lengths[i])
        batches += [group[i: i + batch] for i in range(0, len(group), batch)]
    shuffled = torch.randperm(len(batches), generator=gen).tolist()
    return [i for b in shuffled for i in batches[b]]


def sample_indices(n: int, *, seed: int, micro_batch: int, world_size: int, g: int,
                   rank: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Indices of micro-batch ``g`` (global, counting accumulation steps) on ``rank``.

    The samples form a stream of per-epoch orders (:func:`epoch_order`, grouped by
    ``lengths`` when given), micro-batch ``g`` takes the ``world_size * micro_batch``
    stream entries from position ``g * world_size * micro_batch``, rank ``r`` the ``r``-th
    ``micro_batch`` of them.
    """
    if n < 1:
        raise ValueError("no training samples")
    batch = world_size * micro_batch
    start = (g * world_size + rank) * micro_batch
    out = []
    orders: dict[int, list[int]] = {}
    for pos in range(start, start + micro_batch):
        epoch, i = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed=seed, epoch=epoch, batch=batch,
                                        lengths=lengths)
        out.append(orders[epoch][i])
    return out


def micro_seed(seed: int, g: int, rank: int, world_size: int) -> int:
    return (seed * _SEED_MIX + g * world_size + rank) % (2**63)


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: Path) -> tuple[str, int] | None:
    """(tag, step) of the newest complete checkpoint in ``folder``, or None."""
    path = folder / _LATEST
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if not (folder / info["tag"]).is_dir():
        return None
    return info["tag"], int(info["step"])


def prepare_checkpoints(folder: Path, fingerprint: str) -> int:
    """Keep ``folder``'s checkpoints only if they belong to job ``fingerprint``.

    Returns the step training will resume from (0: from scratch). Runs on the driver
    before any worker starts, so workers never race on the cleanup.
    """
    job = folder / _JOB
    if job.is_file() and json.loads(job.read_text()).get("fingerprint") == fingerprint:
        latest = latest_checkpoint(folder)
        return latest[1] if latest else 0
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_json(job, {"fingerprint": fingerprint})
    return 0


def save_checkpoint(engine: Any, folder: Path, step: int, keep: int, rank: int) -> None:
    import torch.distributed as dist

    tag = tag_of(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step},
                           save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        atomic_write_json(folder / _LATEST, {"tag": tag, "step": step})
        tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-keep]:
            shutil.rmtree(folder / old, ignore_errors=True)
    dist.barrier()


# --------------------------------------------------------------------------- logging


@dataclass
class StepLog:
    """``log.jsonl``: one JSON line per optimizer step, written by rank 0 only."""

    path: Path
    enabled: bool

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps past ``step`` (they will be trained again)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

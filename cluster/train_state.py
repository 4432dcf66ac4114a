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
"""Global micro-batches per length-sorted window (:func:`sample_indices`): enough that each
batch of a window holds samples of nearly one length, few enough that the data still mixes
(Hugging Face's ``group_by_length`` uses the same 50)."""

_WINDOW_MIX = 998_244_353
"""Prime mixing (seed, window) into the seed of a window's batch shuffle."""


def _stream(n: int, seed: int, positions: range) -> list[int]:
    """Entries ``positions`` of the sample stream: per-epoch permutations seeded by (seed,
    epoch), one after the other."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in positions:
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * _SEED_MIX + epoch)
            perms[epoch] = torch.randperm(n, generator=gen).tolist()
        out.append(perms[epoch][i])
    return out


def grouped_window(n: int, *, seed: int, batch: int, window: int,
                   lengths: Sequence[int]) -> list[list[int]]:
    """The :data:`GROUP_BATCHES` global batches of stream window ``window`` (stream entries
    ``[window * G * batch, (window + 1) * G * batch)``): the window's samples sorted by length,
    cut into batches of ``batch``, the batches shuffled (seeded by (seed, window)). Each
    batch holds samples of about one length, while which samples meet stays random from
    window to window and long and short batches interleave."""
    size = GROUP_BATCHES * batch
    entries = _stream(n, seed, range(window * size, (window + 1) * size))
    entries.sort(key=lambda i: -lengths[i])  # stable: ties keep the stream's order
    batches = [entries[j: j + batch] for j in range(0, size, batch)]
    gen = torch.Generator().manual_seed((seed * _WINDOW_MIX + window) % (2**63))
    return [batches[j] for j in torch.randperm(GROUP_BATCHES, generator=gen).tolist()]


def sample_indices(n: int, *, seed: int, micro_batch: int, world_size: int, g: int,
                   rank: int, lengths: Sequence[int] | None = None) -> list[int]:
    """Indices of micro-batch ``g`` (global, counting accumulation steps) on ``rank``.

    The samples form a stream of seeded per-epoch permutations; micro-batch ``g`` is the
    global batch of ``world_size * micro_batch`` entries from position ``g * world_size *
    micro_batch``, or, with ``lengths`` (tokens per sample), batch ``g mod G`` of window
    ``g div G`` sorted by length (:func:`grouped_window`), so right padding (to the longest
    in the micro-batch) and the wait for the slowest rank (each rank takes a slice of the
    same batch) waste little. A window holds the same stream entries in another order, and
    windows are whole batches of the stream whatever the sample count, so window by window
    each sample comes as often as without grouping. Rank ``r`` takes the ``r``-th
    ``micro_batch`` of the global batch.
    """
    if n < 1:
        raise ValueError("no training samples")
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"{len(lengths)} sample lengths for {n} samples")
    batch = world_size * micro_batch
    if lengths is None:
        start = g * batch + rank * micro_batch
        return _stream(n, seed, range(start, start + micro_batch))
    window, j = divmod(g, GROUP_BATCHES)
    chosen = grouped_window(n, seed=seed, batch=batch, window=window, lengths=lengths)[j]
    return chosen[rank * micro_batch: (rank + 1) * micro_batch]


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

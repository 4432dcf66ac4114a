"""svd: per (layer, head), the directions in which the degraded model's activations moved.

For every decoder layer, one task reads that layer's partition of the collected
activations (nothing else), forms dZ = Z_dense(q) - Z_degraded(q) per head over the
samples (not centred), and keeps all ``d_head`` right singular vectors and the singular
values (:func:`recoup.stages.lcc.directions.svd_directions`). All layers run in parallel as Ray
tasks (:func:`recoup.cluster.tasks.map_layers`); every task's output depends on its layer's
activations only, so the files are the same for any number of workers.

Output, one file per layer (``layer=LL.safetensors``): ``V`` (n_heads, d_head, d_head),
row ``i`` of ``V[h]`` the i-th right singular vector of head ``h``, and ``S`` (n_heads, r)
descending, r = min(N, d_head). ``V`` is stored in ``svd.dtype``; ``S`` always in float32
(:func:`~recoup.stages.lcc.directions.lost_component` reads the rank tolerance from S's dtype).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file

from recoup.cluster.tasks import map_layers
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import (
    FP32,
    ITEMSIZE,
    EstimateInputs,
    StageEstimate,
    layer_task_host_bytes,
    layer_tasks_estimate,
)
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_path
from recoup.stages.lcc import activations
from recoup.stages.lcc.directions import svd_directions
from recoup.stages.lcc.heads import split_heads
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD

SVD_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
S_DTYPE = torch.float32
#: the activation views the SVD reads: the prompt through the dense and the degraded model
SVD_VIEWS = ("dense_q", "degraded_q")


class SvdConfig(StrictModel):
    """How the per-layer SVD tasks run and what they store."""

    workers: int | None = Field(
        None, ge=1,
        description="Most layer tasks in flight at once; unset: all layers, Ray queues what "
        "does not fit in the cluster's CPUs. No effect with cluster.mode=inprocess. The "
        "results do not depend on it.",
    )
    cpus_per_task: float = Field(
        1.0, gt=0,
        description="CPUs each layer task asks Ray for; also its torch thread count "
        "(rounded up), in-process too, so results match across modes.",
    )
    dtype: Literal["float32", "float16", "bfloat16", "float64"] = Field(
        "float32", description="dtype of the saved singular vectors V (S stays float32)."
    )


# --------------------------------------------------------------------------- files


def svd_file(root: Path, layer: int) -> Path:
    """The svd stage's file for ``layer``: ``layer=LL.safetensors``."""
    return root / f"layer={layer:02d}.safetensors"


def read_svd_layer(root: Path, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (n_heads, d_head, d_head), S (n_heads, r)) of one layer, as stored."""
    path = svd_file(root, layer)
    if not path.is_file():
        raise FileNotFoundError(f"no SVD for layer {layer}: {path} is missing")
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("V"), f.get_tensor("S")


def write_svd_layer(path: Path, V: torch.Tensor, S: torch.Tensor) -> None:
    """Write one layer's ``V`` and ``S`` atomically (temporary name, fsync, rename).

    No safetensors metadata: the library writes a metadata dict of more than one key in
    a per-process random order (a Rust HashMap), so the same tensors would give files with
    different bytes, and checksums, from run to run. The shapes are in the manifest.
    """
    with atomic_path(path) as tmp:
        save_file({"V": V.contiguous(), "S": S.contiguous()}, str(tmp))


def load_aligned(collect_dir: Path, layer: int, views: Sequence[str],
                 shards: Sequence[int] | None) -> tuple[list[str], dict[str, torch.Tensor]]:
    """``views`` of one layer's activations, row ``i`` of each the same sample.

    :func:`~recoup.stages.lcc.activations.read_layer` sorts every view by sample id; here the
    id lists must also be equal, otherwise a dense row would be paired with another
    sample's degraded row and the differences would be meaningless.
    """
    acts = activations.read_layer(collect_dir, layer, shards)
    missing = [v for v in views if v not in acts]
    if missing:
        raise ValueError(
            f"layer {layer}: the collected activations have no view {', '.join(missing)} "
            f"(found {', '.join(sorted(acts))})"
        )
    ids = acts[views[0]][0]
    for v in views[1:]:
        if acts[v][0] != ids:
            raise ValueError(
                f"layer {layer}: views {views[0]} ({len(ids)} samples) and {v} "
                f"({len(acts[v][0])} samples) do not hold the same samples"
            )
    return ids, {v: acts[v][1] for v in views}


# --------------------------------------------------------------------------- math


def layer_svd(z_dense_q: torch.Tensor, z_degraded_q: torch.Tensor,
              n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head SVD of dZ for one layer, in float64.

    z_* are (N, n_heads * d_head); returns ``V`` (n_heads, d_head, d_head) and ``S``
    (n_heads, min(N, d_head)), one :func:`~recoup.stages.lcc.directions.svd_directions` per head.
    """
    if z_dense_q.shape != z_degraded_q.shape:
        raise ValueError(f"dense {tuple(z_dense_q.shape)} and degraded "
                         f"{tuple(z_degraded_q.shape)} activations differ in shape")
    dense = split_heads(z_dense_q.to(torch.float64), n_heads)  # (N, H, d_head)
    degraded = split_heads(z_degraded_q.to(torch.float64), n_heads)  # (N, H, d_head)
    delta = dense - degraded  # (N, H, d_head)
    pairs = [svd_directions(delta[:, h]) for h in range(n_heads)]
    V = torch.stack([v for v, _ in pairs])  # (H, d_head, d_head)
    S = torch.stack([s for _, s in pairs])  # (H, r)
    return V, S


# --------------------------------------------------------------------------- task


def check_width(z: torch.Tensor, layer: int, n_heads: int, d_head: int) -> None:
    """The activations must be ``n_heads * d_head`` wide, as the model card says."""
    if z.shape[1] != n_heads * d_head:
        raise ValueError(
            f"layer {layer}: activations are {z.shape[1]} wide, but the model card says "
            f"{n_heads} heads x {d_head} d_head = {n_heads * d_head}"
        )


def svd_layer_task(collect_dir: Path, out_dir: Path, layer: int, n_heads: int, d_head: int,
                   shards: tuple[int, ...] | None, dtype: str) -> dict[str, Any]:
    """One layer: read its activations, SVD every head, write ``layer=LL.safetensors``.

    Runs as a Ray task (or in-process); everything arrives through the arguments.
    """
    t0 = time.perf_counter()
    ids, views = load_aligned(collect_dir, layer, SVD_VIEWS, shards)
    check_width(views["dense_q"], layer, n_heads, d_head)
    V, S = layer_svd(views["dense_q"], views["degraded_q"], n_heads)
    write_svd_layer(svd_file(out_dir, layer), V.to(SVD_DTYPES[dtype]), S.to(S_DTYPE))
    return {"layer": layer, "samples": len(ids), "S_shape": list(S.shape),
            "seconds": time.perf_counter() - t0}


def _summary(m: Metrics) -> str:
    return (f"{m['layers']} layers x {m['heads']} heads, d_head {m['d_head']}, "
            f"{m['samples']} samples")


def estimate_svd(inp: EstimateInputs) -> StageEstimate:
    """One CPU task per layer holding that layer's views; on disk V and S of every head."""
    cfg: SvdConfig = inp.config
    card = inp.shape.card
    n = inp.sections["data"].source.num_samples
    host = disk = None
    if n is not None:
        host = layer_task_host_bytes(card, n, len(activations.VIEWS))
        r = min(n, card.d_head)
        disk = card.layers * card.heads * (card.d_head ** 2 * ITEMSIZE[cfg.dtype] + r * FP32)
    return layer_tasks_estimate(inp, host_bytes=host, disk_bytes=disk)


@register_stage(name="svd", version=1, requires=("prepare", "collect"), summarize=_summary,
                estimate=estimate_svd)
def svd(ctx: StageContext) -> Metrics:
    cfg: SvdConfig = ctx.config
    card = modelio.ModelCard.read(ctx.input("prepare") / CARD)
    collect_dir = ctx.input("collect")
    shards = tuple(sorted(activations.done_shards(collect_dir)))
    if not shards:
        raise FileNotFoundError(f"no complete activation shards in {collect_dir}")
    t0 = time.perf_counter()
    infos = map_layers(
        svd_layer_task,
        [(collect_dir, ctx.out_dir, layer, card.heads, card.d_head, shards, cfg.dtype)
         for layer in range(card.layers)],
        ctx.cluster, num_cpus_per_task=cfg.cpus_per_task, max_parallel=cfg.workers,
        desc="svd", progress=ctx.progress,
    )
    wall = time.perf_counter() - t0
    samples = {i["samples"] for i in infos}
    if len(samples) != 1:
        raise ValueError(f"layers disagree on the number of samples: {sorted(samples)}")
    return {
        "layers": card.layers, "heads": card.heads, "d_head": card.d_head,
        "samples": samples.pop(), "shards": len(shards),
        "shapes": {"V": [card.heads, card.d_head, card.d_head], "S": infos[0]["S_shape"]},
        "dtype": {"V": cfg.dtype, "S": "float32"},
        "task_seconds": sum(i["seconds"] for i in infos), "wall_seconds": wall,
    }

"""Where recovery starts, read or fitted from the upstream folders on the driver.

Two sources, both turned into plain tensors for the :class:`~recoup.stages.recovery.job.TrainJob`:

- :func:`lost_components`: the mean lost component of each chosen head from the collect
  stage's prompt activations (``train.lcc.init: lost_component``);
- :func:`fit_starts`: the training-free fits (:mod:`recoup.stages.recovery.training_free`)
  run on the dense and degraded model folders: closed-form compensation and EoRA factors.
  They are the training-free methods themselves and the ``closed_form`` / ``eora`` inits of
  the trained ones.

The train stage decides which are needed and passes their settings as arguments; nothing
here reads a stage's config.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from recoup.stages.lcc import activations
from recoup.stages.lcc.compensation import HeadId
from recoup.stages.lcc.directions import lost_component
from recoup.stages.lcc.heads import split_heads
from recoup.stages.model import layout, modelio
from recoup.stages.model.block_capture import BlockWeights, check_same_architecture
from recoup.stages.recovery import closed_form
from recoup.stages.recovery.eora import peft_factors
from recoup.stages.recovery.masked_lora import StoredMasks
from recoup.stages.recovery.training_free import FitPlan, fit_blockwise


def lost_components(collect_dir: Path, svd: dict[int, dict[str, Tensor]],
                    chosen: Sequence[HeadId], n_heads: int, k: int) -> dict[HeadId, Tensor]:
    """Mean lost component of each chosen head from the collected prompt activations.

    ``svd``: ``{layer: {"V": (H, d, d), "S": (H, r)}}`` of the chosen heads' layers; ``k``:
    singular directions kept in the mean shift."""
    out = {}
    for layer in sorted({lh[0] for lh in chosen}):
        views = activations.read_layer(collect_dir, layer)
        ids_d, dense = views["dense_q"]
        ids_g, degraded = views["degraded_q"]
        if ids_d != ids_g:
            raise ValueError(f"collect: layer {layer} has different samples for dense and degraded")
        delta = split_heads(dense - degraded, n_heads)  # (N, n_heads, d_head)
        for lh in chosen:
            if lh[0] == layer:
                h = lh[1]
                out[lh] = lost_component(delta[:, h], svd[layer]["V"][h].float(),
                                         svd[layer]["S"][h].float(), k)
    return out


@dataclass(frozen=True, kw_only=True)
class Starts:
    """What :func:`fit_starts` fitted. ``lost``: (layer, head) -> closed-form ``c`` (where the
    compensation starts; None: not fitted); ``lora_init``: linear module name -> peft
    (lora_A, lora_B) with peft's alpha / r accounted for (None: not fitted); ``facts``: for
    the stage's metrics."""

    lost: dict[HeadId, Tensor] | None
    lora_init: dict[str, tuple[Tensor, Tensor]] | None
    facts: dict[str, Any]


def fit_starts(*, dense_dir: Path, degraded_dir: Path, dtype: str,
               heads: Sequence[HeadId] | None, eora_layers: Sequence[int] | None,
               targets: Sequence[str], rank: int, alpha: float, masks_file: Path | None,
               masked: bool = True,
               calibration: Sequence[Sequence[int]], pad_id: int, device: str,
               micro_batch: int, offload: bool, eig_rtol: float,
               progress: bool = True) -> Starts:
    """Fit the closed-form compensation of ``heads`` and/or the rank-``rank`` EoRA factors of
    ``targets`` in ``eora_layers`` (None: that fit is not wanted) on the ``calibration``
    token sequences, the degraded model under the keep masks of ``masks_file`` (None: the
    weights' non-zero pattern; ``masked`` False: EoRA's correction applied unmasked, as an
    unmerged adapter runs). Both models are read from their files one block at a time
    (:class:`BlockWeights`), each block visiting ``device``."""
    started = time.perf_counter()
    torch_dtype = modelio.DTYPES[dtype]
    # both read from their files one block at a time: neither is ever whole in memory
    dense = BlockWeights(dense_dir, torch_dtype)
    degraded = BlockWeights(degraded_dir, torch_dtype)
    check_same_architecture(dense, degraded)
    by_layer = closed_form.heads_by_layer(heads) if heads is not None else {}
    paths = tuple(p for p in layout.LINEAR_NAMES if p.rsplit(".", 1)[1] in targets)
    eora = {i: paths for i in eora_layers} if eora_layers is not None else {}
    # read one linear's mask at a time as the fit reaches it: every adapted linear's at
    # once would be a bool per weight of the model on the host
    masks = StoredMasks(masks_file) if masked else {}
    fit = fit_blockwise(
        dense, degraded, calibration,
        FitPlan(heads=by_layer, eora=eora, rank=rank, masks=masks, masked=masked,
                eig_rtol=eig_rtol),
        pad_id=pad_id, device=device, micro_batch=micro_batch, offload=offload,
        progress=progress)
    facts: dict[str, Any] = {"calibration_samples": len(calibration),
                             "calibration_tokens": fit.tokens}
    lost = lora_init = None
    if heads is not None:
        lost = fit.components
        norms = closed_form.component_norms(fit.components)
        facts["closed_form_max_norm"] = round(norms["max_norm"], 6)
    if eora_layers is not None:
        scale = alpha / rank
        lora_init = {name: tuple(t.float().cpu() for t in peft_factors(B, A, scale))
                     for name, (B, A) in fit.factors.items()}
        facts["eora_modules"] = len(fit.factors)
    facts["fit_seconds"] = round(time.perf_counter() - started, 3)
    return Starts(lost=lost, lora_init=lora_init, facts=facts)


__all__ = ("Starts", "fit_starts", "lost_components")

"""How much each decoder layer of a degraded model moved: the measurement behind Recover-LoRA's
choice of layers, shared by the ``sensitivity`` stage and ``train``'s ``lora.layers: auto``.

Per decoder layer, the relative error of the degraded layer's output against the dense
layer's, both fed the *dense* model's input to that layer (so a layer is not blamed for the
error it inherits; see :func:`recoup.stages.recovery.layer_ranking.local_layer_io`).

Measured block by block, as collect and degrade run (:mod:`recoup.stages.model.block_capture`):
the samples' hidden states stay on the device while block ``i`` of each model is read from
its safetensors files, both are fed the dense hidden states, and the dense block's output
becomes the next block's input. The two models are never resident: device memory is two
blocks and the samples' hidden states (a 70B pair needed 276 GB on one device whole).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from recoup.stages.model import capture, modelio
from recoup.stages.model.block_capture import BlockWeights, check_same_architecture, embed_batches
from recoup.stages.recovery.batching import Encoded, collate
from recoup.stages.recovery.layer_ranking import Normalize, layer_output, normalized_error_terms


def _batch(samples: Sequence[Encoded], pad_id: int) -> capture.Batch:
    """Right-padded, positions counted from 0 as the whole decoder's forward counts them
    without ``position_ids``; every real token counts."""
    b = collate(samples, pad_id)
    ids, mask = b["input_ids"], b["attention_mask"]  # (B, T) each
    positions = torch.arange(ids.shape[1]).expand_as(ids)  # (B, T)
    return capture.Batch(input_ids=ids, attention_mask=mask, position_ids=positions,
                         select=mask.bool())


@torch.no_grad()
def measure_layer_errors(dense_dir: Path, degraded_dir: Path, dtype: str, device: str,
                         samples: Sequence[Encoded], pad_id: int, batch_size: int,
                         normalize: Normalize = "output") -> Tensor:
    """(n_layers,) float64 output errors of the degraded model against the dense one on
    ``samples``, on the CPU: :func:`recoup.stages.recovery.layer_ranking.rank_layers`' sums,
    one block of each model on ``device`` at a time (module docstring)."""
    if not samples:
        raise ValueError("no calibration batches to rank layers on")
    torch_dtype = modelio.DTYPES[dtype]
    dense, degraded = BlockWeights(dense_dir, torch_dtype), BlockWeights(degraded_dir, torch_dtype)
    check_same_architecture(dense, degraded)
    dev = torch.device(device)
    batches = [_batch(samples[i:i + batch_size], pad_id)
               for i in range(0, len(samples), batch_size)]
    states = embed_batches(dense, [([], b) for b in batches], dev)
    num = torch.zeros(dense.num_layers, dtype=torch.float64)
    den = torch.zeros(dense.num_layers, dtype=torch.float64)
    for layer in range(dense.num_layers):
        with dense.block(layer, dev) as d_block, degraded.block(layer, dev) as g_block:
            for state, batch in zip(states, batches, strict=True):
                kw = {"attention_mask": state.mask, "position_ids": state.position_ids,
                      "position_embeddings": state.rotary, "use_cache": False}
                x = state.hidden  # (B, T, hidden): the dense model's input to this layer
                d, g = layer_output(d_block(x, **kw)), layer_output(g_block(x, **kw))
                n, m = normalized_error_terms([x], [d], [g], batch.attention_mask.to(dev),
                                              normalize)
                num[layer] += n[0].cpu()
                den[layer] += m[0].cpu()
                state.hidden = d
    return num / den.clamp_min(torch.finfo(torch.float64).tiny)


def ranking(errors: Sequence[float]) -> list[int]:
    """Layers by error, largest first; ties go to the lower index."""
    return sorted(range(len(errors)), key=lambda i: (-errors[i], i))


__all__ = ("measure_layer_errors", "ranking")

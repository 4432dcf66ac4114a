"""How much each decoder layer of a degraded model moved: the measurement behind Recover-LoRA's
choice of layers, shared by the ``sensitivity`` stage and ``train``'s ``lora.layers: auto``.

Per decoder layer, the relative error of the degraded layer's output against the dense
layer's, both fed the *dense* model's input to that layer (so a layer is not blamed for the
error it inherits; see :func:`recoup.stages.recovery.layer_ranking.local_layer_outputs`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from recoup.stages.model import modelio
from recoup.stages.recovery.batching import Encoded, collate
from recoup.stages.recovery.layer_ranking import Normalize, rank_layers


def measure_layer_errors(dense_dir: Path, degraded_dir: Path, dtype: str, device: str,
                         samples: Sequence[Encoded], pad_id: int, batch_size: int,
                         normalize: Normalize = "output") -> Tensor:
    """(n_layers,) output errors of the degraded model against the dense one on ``samples``
    (see :func:`recoup.stages.recovery.layer_ranking.rank_layers`); both models are loaded here and
    freed on return."""
    batches = [{k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
               for i in range(0, len(samples), batch_size)]
    dense = modelio.load_model(dense_dir, modelio.DTYPES[dtype], device)
    degraded = modelio.load_model(degraded_dir, modelio.DTYPES[dtype], device)
    modelio.check_same_architecture(dense, degraded, "layer sensitivity: the degraded model")
    return rank_layers(dense, degraded, batches, normalize).cpu()  # may travel to a CPU host


def ranking(errors: Sequence[float]) -> list[int]:
    """Layers by error, largest first; ties go to the lower index."""
    return sorted(range(len(errors)), key=lambda i: (-errors[i], i))


__all__ = ("measure_layer_errors", "ranking")

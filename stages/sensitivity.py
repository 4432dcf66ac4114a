"""sensitivity: how much each decoder layer of the degraded model moved, measured on data.

Recover-LoRA puts its adapters on the few layers that compression damaged most, and finds
them without labels: per decoder layer, the relative error of the degraded layer's output
against the dense layer's, both fed the *dense* model's input to that layer (so a layer is
not blamed for the error it inherits; see
:func:`recoup.stages.recovery.methods.local_layer_outputs`).
The inputs are the data stage's samples, so in a data-free run the ranking comes from the
dense model's own synthetic text.

``train.lora.layers: auto`` takes its layers from here when this stage is in the pipeline,
and the report plots the errors. Outputs: ``sensitivity.json`` with ``errors`` (one per
layer, relative squared error), ``ranking`` (layers, most damaged first) and the counts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field
from torch import Tensor

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.methods import Encoded, Normalize, collate, encode_sample, rank_layers
from recoup.stages.text.datasources import Sample
from recoup.stages.text.triplets import read_parquet

OUTPUT = "sensitivity.json"
SAMPLES_FILE = "samples.parquet"


class SensitivityConfig(StrictModel):
    """How many samples, of what length, the per-layer errors are measured on."""

    samples: int = Field(32, ge=1, description="The data stage's first samples to run.")
    batch_size: int = Field(4, ge=1, description="Samples per forward pass.")
    max_seq_len: int = Field(256, ge=2, description="Tokens per sample (prompt + response), cut.")
    normalize: Normalize = Field(
        "output",
        description="What a layer's squared output error is divided by: 'output' (the dense "
        "output's norm, residual stream included), 'update' (the layer's own contribution, "
        "output - input) or 'none' (per token). Middle layers with massive activations look "
        "undamaged under 'output'.",
    )


def ranking(errors: list[float]) -> list[int]:
    """Layers by error, largest first; ties go to the lower index."""
    return sorted(range(len(errors)), key=lambda i: (-errors[i], i))


def read_sensitivity(folder: Path) -> dict[str, Any]:
    """``sensitivity.json`` of a finished stage."""
    path = folder / OUTPUT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the sensitivity stage writes it")
    return dict(json.loads(path.read_text()))


def measure_layer_errors(dense_dir: Path, degraded_dir: Path, dtype: str, device: str,
                         samples: Sequence[Encoded], pad_id: int, batch_size: int,
                         normalize: Normalize = "output") -> Tensor:
    """(n_layers,) output errors of the degraded model against the dense one on ``samples``
    (see :func:`recoup.stages.recovery.methods.rank_layers`); both models are loaded here and freed
    on return. Used by this stage and by ``train`` when this stage is not in the pipeline."""
    batches = [{k: v.to(device) for k, v in collate(samples[i:i + batch_size], pad_id).items()}
               for i in range(0, len(samples), batch_size)]
    dense = modelio.load_model(dense_dir, modelio.DTYPES[dtype], device)
    degraded = modelio.load_model(degraded_dir, modelio.DTYPES[dtype], device)
    modelio.check_same_architecture(dense, degraded, "layer sensitivity: the degraded model")
    return rank_layers(dense, degraded, batches, normalize)


def _summary(m: Metrics) -> str:
    top = ", ".join(str(i) for i in m["ranking"][:4])
    return f"{m['layers']} layers on {m['samples']} samples; most moved: {top}"


@register_stage(name="sensitivity", version=1, requires=("prepare", "degrade", "data"),
                summarize=_summary)
def sensitivity(ctx: StageContext) -> Metrics:
    cfg: SensitivityConfig = ctx.config
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    if cfg.max_seq_len > card.max_positions:
        raise ValueError(f"sensitivity.max_seq_len={cfg.max_seq_len} exceeds the model's "
                         f"{card.max_positions} positions")
    tokenizer = modelio.load_tokenizer(prepared / MODEL_DIR)
    rows = read_parquet(ctx.input("data") / SAMPLES_FILE, Sample)[: cfg.samples]
    encoded = [encode_sample(tokenizer, s.prompt, s.response, cfg.max_seq_len) for s in rows]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    errors = [float(e) for e in measure_layer_errors(
        prepared / MODEL_DIR, ctx.input("degrade") / MODEL_DIR, card.dtype, ctx.run.run.device,
        encoded, int(pad), cfg.batch_size, cfg.normalize)]
    order = ranking(errors)
    ctx.log.info("layer output errors (most moved first): %s",
                 ", ".join(f"{i}:{errors[i]:.4f}" for i in order[:8]))
    metrics: Metrics = {"layers": len(errors), "samples": len(encoded), "normalize": cfg.normalize,
                        "tokens": sum(len(e.ids) for e in encoded),
                        "errors": errors, "ranking": order}
    atomic_write_json(ctx.out_dir / OUTPUT, metrics)
    return metrics

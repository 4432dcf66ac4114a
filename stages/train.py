"""train: recovery training of the degraded model (compensation, LoRA, or both).

The stage requires prepare, degrade and data, and reads collect, svd and select when
they are in the pipeline (optional inputs). That keeps one stage for every method:

- ``lcc`` and ``lcc+lora`` need the chosen heads and their ``V`` (svd, select; collect
  too for the ``lost_component`` init) and say so clearly when those stages are missing;
- ``lora`` needs none of them, so a LoRA-only pipeline skips the expensive activation
  collection: ``prepare -> degrade -> data -> train -> export -> evaluate``.

The stage reads its inputs on the driver (samples, chosen heads, V, the LoRA layers for
``auto``), packs them into a :class:`recoup.stages.recovery.methods.TrainJob`, and hands it to
:func:`recoup.cluster.train.run_training` (Ray Train workers, or in-process). The stage is
*resumable*: the runner keeps its folder after a crash, and training continues from the
last DeepSpeed checkpoint of the same job (same config, same upstream outputs).

Outputs: ``params/`` (``lcc.safetensors``, ``lora/`` PEFT adapter, ``recovery.json``),
``checkpoints/``, ``log.jsonl``, ``train_result.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from recoup.cluster.engine import EngineConfig
from recoup.cluster.train import PARAMS as PARAMS_DIR
from recoup.cluster.train import run_training
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import MANIFEST
from recoup.stages.lcc import lcc_math
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery.losses import LossConfig
from recoup.stages.recovery.methods import (
    Encoded,
    LccConfig,
    LoraAdapterConfig,
    TrainJob,
    build_task,
    encode_sample,
    get_method,
    method_names,
    top_layers,
)
from recoup.stages.sensitivity import measure_layer_errors, read_sensitivity
from recoup.stages.text.datasources import Sample
from recoup.stages.text.triplets import read_parquet

STAGE_VERSION = 1
SAMPLES_FILE = "samples.parquet"
HEADS_FILE = "heads.json"


class TrainConfig(StrictModel):
    """Recovery training: method, its parts, the loss and the engine."""

    method: str = Field("lcc", description="Recovery method: lcc, lora or lcc+lora.")
    lcc: LccConfig = Field(LccConfig(), description="Compensation settings (lcc methods).")
    lora: LoraAdapterConfig = Field(
        LoraAdapterConfig(), description="LoRA settings (lora methods)."
    )
    loss: LossConfig = Field(LossConfig(), description="Loss: response CE and/or KL to dense.")
    engine: EngineConfig = Field(EngineConfig(), description="DeepSpeed / Ray Train settings.")
    max_samples: int | None = Field(
        None, ge=1, description="Use the first this many samples of the data stage; unset: all."
    )
    max_seq_len: int = Field(256, ge=8, description="Tokens per sample (prompt + response), cut.")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in method_names():
            raise ValueError(f"unknown recovery method {v!r}; choose one of "
                             f"{', '.join(method_names())}")
        return v


# --------------------------------------------------------------------------- inputs


def read_chosen(select_dir: Path) -> list[tuple[int, int]]:
    """``heads.json``'s ``chosen`` list as (layer, head) pairs."""
    path = select_dir / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the select stage writes the chosen heads")
    chosen = [(int(layer), int(head)) for layer, head in json.loads(path.read_text())["chosen"]]
    if not chosen:
        raise ValueError(f"{path} chooses no heads; nothing to compensate")
    return chosen


def read_svd(svd_dir: Path, layers: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The svd stage's files of ``layers``: ``{layer: {"V": (H, d, d), "S": (H, r)}}``."""
    from recoup.stages.svd import read_svd_layer

    out = {}
    for layer in sorted(layers):
        V, S = read_svd_layer(svd_dir, layer)
        out[layer] = {"V": V, "S": S}
    return out


def lost_components(collect_dir: Path, svd: dict[int, dict[str, torch.Tensor]],
                    chosen: list[tuple[int, int]], n_heads: int, k: int,
                    ) -> dict[tuple[int, int], torch.Tensor]:
    """Mean lost component of each chosen head from the collected prompt activations."""
    from recoup.stages.lcc import activations

    out = {}
    for layer in sorted({lh[0] for lh in chosen}):
        views = activations.read_layer(collect_dir, layer)
        ids_d, dense = views["dense_q"]
        ids_g, degraded = views["degraded_q"]
        if ids_d != ids_g:
            raise ValueError(f"collect: layer {layer} has different samples for dense and degraded")
        delta = lcc_math.split_heads(dense - degraded, n_heads)  # (N, n_heads, d_head)
        for lh in chosen:
            if lh[0] == layer:
                h = lh[1]
                out[lh] = lcc_math.lost_component(delta[:, h], svd[layer]["V"][h].float(),
                                                  svd[layer]["S"][h].float(), k)
    return out


def _fingerprint(ctx: StageContext) -> str:
    """Identity of the training job: stage version, config, upstream manifests."""
    upstream = {}
    for name, folder in sorted(ctx.inputs.items()):
        manifest = folder / MANIFEST
        upstream[name] = json.loads(manifest.read_text())["fingerprint"] if manifest.is_file() \
            else str(folder)
    payload = {"version": STAGE_VERSION, "config": ctx.config.model_dump(mode="json"),
               "upstream": upstream, "device": ctx.run.run.device,
               "mode": ctx.run.cluster.mode}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_job(ctx: StageContext) -> tuple[TrainJob, dict[str, Any]]:
    """Read every input the method needs and pack the job; also the facts for metrics."""
    cfg: TrainConfig = ctx.config
    method = get_method(cfg.method)
    prepared = ctx.input("prepare")
    card = modelio.ModelCard.read(prepared / CARD)
    tokenizer = modelio.load_tokenizer(prepared / MODEL_DIR)
    if cfg.max_seq_len > card.max_positions:
        raise ValueError(f"train.max_seq_len={cfg.max_seq_len} exceeds the model's "
                         f"{card.max_positions} positions")
    rows = read_parquet(ctx.input("data") / SAMPLES_FILE, Sample)
    if cfg.max_samples is not None:
        rows = rows[: cfg.max_samples]
    encoded = [encode_sample(tokenizer, s.prompt, s.response, cfg.max_seq_len) for s in rows]
    if cfg.loss.ce_weight:  # a sample without response tokens adds nothing to the CE
        encoded = [e for e in encoded if len(e.ids) > e.prompt_len]
    if not encoded:
        raise ValueError("no training sample has response tokens within train.max_seq_len")
    facts: dict[str, Any] = {"samples": len(encoded)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    job: dict[str, Any] = {
        "method": cfg.method, "degraded_dir": ctx.input("degrade") / MODEL_DIR,
        "dense_dir": prepared / MODEL_DIR, "dtype": card.dtype, "samples": tuple(encoded),
        "pad_id": int(pad), "loss": cfg.loss, "n_heads": card.heads,
    }
    if method.needs_heads:
        missing = [s for s in ("svd", "select") if s not in ctx.inputs]
        if cfg.lcc.init == "lost_component" and "collect" not in ctx.inputs:
            missing.insert(0, "collect")
        if missing:
            raise ValueError(
                f"train.method {cfg.method!r} needs the stages {', '.join(missing)} before "
                "train in run.pipeline (they give the heads to compensate)"
            )
        chosen = read_chosen(ctx.input("select"))
        svd = read_svd(ctx.input("svd"), {layer for layer, _ in chosen})
        job.update(lcc=cfg.lcc, chosen=tuple(chosen),
                   V={(layer, h): svd[layer]["V"][h].float() for layer, h in chosen})
        if cfg.lcc.init == "lost_component":
            job["lost"] = lost_components(ctx.input("collect"), svd, chosen, card.heads,
                                          cfg.lcc.init_directions)
        facts["chosen_heads"] = len(chosen)
    if method.uses_lora:
        if cfg.lora.layers == "auto":
            layers, errors, facts["layers_from"] = auto_lora_layers(ctx, encoded, pad, card)
            facts["layer_errors"] = [round(float(e), 6) for e in errors]
        else:
            layers = tuple(cfg.lora.layers)
        job.update(lora=cfg.lora, lora_layers=tuple(sorted(layers)))
        facts["lora_layers"] = list(job["lora_layers"])
    return TrainJob(**job), facts


def auto_lora_layers(ctx: StageContext, encoded: list[Encoded], pad: int,
                     card: modelio.ModelCard) -> tuple[tuple[int, ...], torch.Tensor, str]:
    """The ``auto_layers`` layers with the largest output error, the errors, and where
    they come from: the sensitivity stage when it is in the pipeline, else measured here on
    the first ``auto_samples`` training samples."""
    cfg: TrainConfig = ctx.config
    if cfg.lora.auto_layers > card.layers:
        raise ValueError(f"train.lora.auto_layers={cfg.lora.auto_layers} exceeds the model's "
                         f"{card.layers} layers")
    if "sensitivity" in ctx.inputs:
        errors = torch.tensor(read_sensitivity(ctx.input("sensitivity"))["errors"])
        source = "sensitivity"
    else:
        errors = measure_layer_errors(
            ctx.input("prepare") / MODEL_DIR, ctx.input("degrade") / MODEL_DIR, card.dtype,
            ctx.run.run.device, encoded[: cfg.lora.auto_samples], pad, cfg.engine.micro_batch)
        source = "training samples"
    layers = tuple(top_layers(errors, cfg.lora.auto_layers))
    ctx.log.info("LoRA layers (auto, largest output error, from %s): %s", source, list(layers))
    return layers, errors, source


# --------------------------------------------------------------------------- the stage


def _summary(m: Metrics) -> str:
    text = f"{m['method']}: loss {m['first_loss']:.4f} -> {m['final_loss']:.4f} " \
           f"in {m['steps']} steps, {m['trainable_params']} trainable"
    if m.get("resumed_from"):
        text += f" (resumed at step {m['resumed_from']})"
    return text


def train_stage(ctx: StageContext) -> Metrics:
    cfg: TrainConfig = ctx.config
    job, facts = build_job(ctx)
    result = run_training(
        make_task=build_task, task_spec=job, engine=cfg.engine, cluster=ctx.run.cluster,
        device=ctx.run.run.device, out_dir=ctx.out_dir, fingerprint=_fingerprint(ctx),
        progress=ctx.progress,
    )
    metrics: Metrics = {"method": cfg.method, **facts, **result}
    ctx.log.info("trained %s: loss %.4f -> %.4f", cfg.method, result["first_loss"],
                 result["final_loss"])
    return metrics


register_stage(name="train", version=STAGE_VERSION, resumable=True,
               requires=("prepare", "degrade", "data"),
               optional=("collect", "svd", "select", "sensitivity"),
               summarize=_summary)(train_stage)


__all__ = ("PARAMS_DIR", "TrainConfig", "build_job", "read_chosen", "read_svd", "train_stage")

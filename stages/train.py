"""train: recovery training of the degraded model (compensation, LoRA, or both).

The stage requires prepare, degrade and data, and reads collect, svd and select when
they are in the pipeline (optional inputs). That keeps one stage for every method:

- ``lcc`` and ``lcc+lora`` need the chosen heads and their ``V`` (svd, select; collect
  too for the ``lost_component`` init) and say so clearly when those stages are missing;
- ``lora`` needs none of them, so a LoRA-only pipeline skips the expensive activation
  collection: ``prepare -> degrade -> data -> train -> export -> evaluate``.
- the training-free methods ``lcc-closed``, ``eora`` and ``lcc-closed+eora`` need none of
  them either (``lcc-closed`` compensates the select stage's heads when select runs, else
  every head). They are fitted here, in the stage's own process on ``run.device``, block by
  block (:mod:`recoup.stages.recovery.training_free`): no DeepSpeed, no Ray Train, no
  checkpoints; the wall time is ``fit_seconds``. The same fits start the trained methods
  (``train.lcc.init: closed_form``, ``train.lora.init: eora``).

LoRA runs under the degraded model's sparsity mask in training (and in the EoRA fit), so the
export's masked merge is the trained model (:mod:`recoup.stages.recovery.masked_lora`).

The stage reads its inputs on the driver (samples, chosen heads, V, the LoRA layers for
``auto``), packs them into a :class:`recoup.stages.recovery.job.TrainJob` (plain data: the
part settings of :mod:`recoup.stages.recovery.config` reduced to frozen specs), and hands it
to :func:`recoup.cluster.train.run_training` (Ray Train workers, or in-process), whose
workers run :func:`recoup.stages.recovery.task.build_task`. The stage is *resumable*: the
runner keeps its folder after a crash, and training continues from the last DeepSpeed
checkpoint of the same job (the stage's fingerprint, device and cluster mode).

With the KL on (``train.loss.kl_weight``), the workers first run the dense model once over
the samples and keep its top-k per position (:mod:`recoup.stages.recovery.teacher`); the
student is built after, so no worker holds both. Under ZeRO-3 every model is built
partitioned (:mod:`recoup.stages.model.partitioned`): no worker ever holds a whole one.

Outputs: ``params/`` (``lcc.safetensors``, ``lora/`` PEFT adapter, ``recovery.json``),
``checkpoints/``, ``log.jsonl``, ``train_result.json``, and with the KL ``teacher/`` (the
top-k files).
"""

from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from recoup.cluster import capacity
from recoup.cluster.engine import EngineConfig
from recoup.cluster.tasks import device_task_resources, run_task
from recoup.cluster.train import PARAMS as PARAMS_DIR
from recoup.cluster.train import run_training
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import (
    GB,
    EstimateInputs,
    StageEstimate,
    chosen_count,
    gb,
    placement_note,
)
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages.degrade import MASKS
from recoup.stages.lcc.heads_file import read_heads
from recoup.stages.model import modelio
from recoup.stages.model.layer_errors import measure_layer_errors
from recoup.stages.prepare import CARD, MODEL_DIR
from recoup.stages.recovery import closed_form
from recoup.stages.recovery.batching import Encoded, encode_sample
from recoup.stages.recovery.config import (
    ClosedFormConfig,
    LccConfig,
    LoraAdapterConfig,
    LossConfig,
)
from recoup.stages.recovery.footprint import (
    fit_host_bytes,
    fit_parts,
    fits_wanted,
    min_world_size,
    teacher_pass_parts,
    teacher_top_k,
    train_host_bytes,
    train_parts,
    worker_peak,
)
from recoup.stages.recovery.inits import Starts, fit_starts, lost_components
from recoup.stages.recovery.job import TrainJob
from recoup.stages.recovery.layer_ranking import top_layers
from recoup.stages.recovery.methods import RecoveryMethod, get_method, method_names
from recoup.stages.recovery.task import build_task, save_training_free
from recoup.stages.sensitivity import read_sensitivity
from recoup.stages.text.datasources import Sample
from recoup.stages.text.triplets import read_parquet

STAGE_VERSION = 3
"""2: LoRA trains under the sparsity mask; training-free methods; closed-form / EoRA inits;
the job key is the runner's fingerprint. 3: the KL reads the dense model's top-k computed
before training (train.loss.teacher_top_k; 0 is the former exact KL); ZeRO-3 builds the
model partitioned; activation checkpointing (train.engine.activation_checkpointing)."""
SAMPLES_FILE = "samples.parquet"


class TrainConfig(StrictModel):
    """Recovery training: method, its parts, the loss and the engine."""

    method: str = Field(
        "lcc",
        description="Recovery method. Trained: lcc, lora, lcc+lora. Training-free (fitted in "
        "closed form, block by block, no optimizer): lcc-closed (mean lost component of each "
        "head over all tokens), eora (EoRA low-rank adapters on the LoRA layers), "
        "lcc-closed+eora.",
    )
    lcc: LccConfig = Field(LccConfig(), description="Compensation settings (lcc methods).")
    lora: LoraAdapterConfig = Field(
        LoraAdapterConfig(), description="LoRA settings (lora methods)."
    )
    loss: LossConfig = Field(LossConfig(), description="Loss: response CE and/or KL to dense.")
    engine: EngineConfig = Field(EngineConfig(), description="DeepSpeed / Ray Train settings.")
    closed_form: ClosedFormConfig = Field(
        ClosedFormConfig(),
        description="Calibration of the training-free fits (lcc-closed, eora and the "
        "closed_form / eora inits).",
    )
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


def read_svd(svd_dir: Path, layers: set[int]) -> dict[int, dict[str, torch.Tensor]]:
    """The svd stage's files of ``layers``: ``{layer: {"V": (H, d, d), "S": (H, r)}}``."""
    from recoup.stages.svd import read_svd_layer

    out = {}
    for layer in sorted(layers):
        V, S = read_svd_layer(svd_dir, layer)
        out[layer] = {"V": V, "S": S}
    return out


def _job_key(ctx: StageContext) -> str:
    """Identity of the training job (checkpoints of another job are never resumed): the
    stage's fingerprint (version, config, upstream) plus where it trains."""
    payload = {"fingerprint": ctx.fingerprint, "device": ctx.device, "mode": ctx.cluster.mode}
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
    if cfg.loss.kl_weight and cfg.loss.teacher_top_k > card.vocab:
        raise ValueError(f"train.loss.teacher_top_k={cfg.loss.teacher_top_k} exceeds the "
                         f"model's vocabulary of {card.vocab} tokens")
    facts: dict[str, Any] = {"samples": len(encoded)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    job: dict[str, Any] = {
        "method": cfg.method, "degraded_dir": ctx.input("degrade") / MODEL_DIR,
        "dense_dir": prepared / MODEL_DIR, "dtype": card.dtype, "samples": tuple(encoded),
        "pad_id": int(pad), "loss": cfg.loss.spec(), "n_heads": card.heads,
        "masks_file": ctx.input("degrade") / MASKS,
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
        chosen = read_heads(ctx.input("select")).chosen
        svd = read_svd(ctx.input("svd"), {layer for layer, _ in chosen})
        job.update(lcc=cfg.lcc.spec(), chosen=tuple(chosen),
                   V={(layer, h): svd[layer]["V"][h].float() for layer, h in chosen})
        if cfg.lcc.init == "lost_component":
            job["lost"] = lost_components(ctx.input("collect"), svd, chosen, card.heads,
                                          cfg.lcc.init_directions)
        facts["chosen_heads"] = len(chosen)
    elif method.uses_lcc:  # closed-form compensation: any heads, V = I
        if cfg.closed_form.heads == "chosen" and "select" in ctx.inputs:
            chosen = read_heads(ctx.input("select")).chosen
        else:
            chosen = closed_form.all_heads(card.layers, card.heads)
        job.update(lcc=cfg.lcc.spec(), chosen=tuple(chosen),
                   V=closed_form.identity_directions(chosen, card.d_head))
        facts["chosen_heads"] = len(chosen)
    if method.uses_lora:
        if cfg.lora.layers == "auto":
            layers, errors, facts["layers_from"] = auto_lora_layers(ctx, encoded, pad, card)
            facts["layer_errors"] = [round(float(e), 6) for e in errors]
        elif cfg.lora.layers == "all":
            layers = tuple(range(card.layers))
        else:
            layers = tuple(cfg.lora.layers)
        job.update(lora=cfg.lora.spec(), lora_layers=tuple(sorted(layers)))
        facts["lora_layers"] = list(job["lora_layers"])
    facts.update(fit_closed_form(ctx, method, job, encoded, card))
    return TrainJob(**job), facts


def fit_closed_form(ctx: StageContext, method: RecoveryMethod, job: dict[str, Any],
                    encoded: list[Encoded], card: modelio.ModelCard) -> dict[str, Any]:
    """Run the training-free fits the method needs (itself, or as an init) and put them in
    ``job``: the closed-form components as ``lost`` (where the compensation starts), the
    EoRA factors as ``lora_init`` (peft's layout and scaling). Returns the facts."""
    cfg: TrainConfig = ctx.config
    lcc_fit, eora_fit = fits_wanted(method, cfg)
    if not (lcc_fit or eora_fit):
        return {}
    cf = cfg.closed_form
    # one task on the GPUs of the stage (its own task holds none: Ray Train's workers need
    # them next), a plain call in-process
    cpus, gpus = device_task_resources(ctx.cluster, "train", ctx.device)
    fit: Starts = run_task(partial(
        fit_starts,
        dense_dir=job["dense_dir"], degraded_dir=job["degraded_dir"], dtype=card.dtype,
        heads=job["chosen"] if lcc_fit else None,
        eora_layers=job["lora_layers"] if eora_fit else None, targets=cfg.lora.targets,
        rank=cfg.lora.rank, alpha=cfg.lora.alpha, masks_file=job["masks_file"],
        masked=cfg.lora.merge == "masked",
        calibration=[e.ids for e in encoded[: cf.samples]], pad_id=job["pad_id"],
        device=ctx.device, micro_batch=cf.micro_batch, offload=cf.offload,
        eig_rtol=cf.eig_rtol, progress=ctx.progress),
        ctx.cluster, num_cpus=cpus, num_gpus=gpus, desc="closed-form fit")
    if fit.lost is not None:
        job["lost"] = fit.lost
    if fit.lora_init is not None:
        job["lora_init"] = fit.lora_init
    ctx.log.info("training-free fit (%s%s) in %.1f s on %d tokens", "lcc" if lcc_fit else "",
                 "+eora" if eora_fit else "", fit.facts["fit_seconds"],
                 fit.facts["calibration_tokens"])
    return fit.facts


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
        cpus, gpus = device_task_resources(ctx.cluster, "train", ctx.device)
        errors = run_task(partial(
            measure_layer_errors, ctx.input("prepare") / MODEL_DIR,
            ctx.input("degrade") / MODEL_DIR, card.dtype, ctx.device,
            encoded[: cfg.lora.auto_samples], pad, cfg.engine.micro_batch),
            ctx.cluster, num_cpus=cpus, num_gpus=gpus, desc="layer errors")
        source = "training samples"
    layers = tuple(top_layers(errors, cfg.lora.auto_layers))
    ctx.log.info("LoRA layers (auto, largest output error, from %s): %s", source, list(layers))
    return layers, errors, source


# --------------------------------------------------------------------------- the stage


def _summary(m: Metrics) -> str:
    if m.get("training_free"):
        return (f"{m['method']}: training-free, fitted in {m['fit_seconds']:.1f} s, "
                f"{m['trainable_params']} parameters")
    text = f"{m['method']}: loss {m['first_loss']:.4f} -> {m['final_loss']:.4f} " \
           f"in {m['steps']} steps, {m['trainable_params']} trainable"
    if m.get("resumed_from"):
        text += f" (resumed at step {m['resumed_from']})"
    return text


def train_stage(ctx: StageContext) -> Metrics:
    cfg: TrainConfig = ctx.config
    job, facts = build_job(ctx)
    if get_method(cfg.method).training_free:
        result = save_training_free(job, ctx.out_dir)
        ctx.log.info("fitted %s without training in %.1f s", cfg.method, facts["fit_seconds"])
        return {"method": cfg.method, **facts, **result}
    result = run_training(
        make_task=build_task, task_spec=job, engine=cfg.engine, cluster=ctx.cluster,
        device=ctx.device, out_dir=ctx.out_dir, fingerprint=_job_key(ctx),
        progress=ctx.progress,
    )
    metrics: Metrics = {"method": cfg.method, **facts, **result}
    ctx.log.info("trained %s: loss %.4f -> %.4f", cfg.method, result["first_loss"],
                 result["final_loss"])
    return metrics


def _train_samples(inp: EstimateInputs) -> int | None:
    """Training samples the stage reads (None: unknown before the data stage runs)."""
    return inp.config.max_samples or inp.sections["data"].source.num_samples


def estimate_fit(inp: EstimateInputs) -> StageEstimate:
    """A training-free method: its fit as one task on one GPU (:func:`fit_parts`), the
    fitted parameters on the host (:func:`fit_host_bytes`); no training workers."""
    cfg: TrainConfig = inp.config
    shape, hw = inp.shape, inp.hardware
    n = _train_samples(inp)
    parts = fit_parts(shape, cfg, samples=n)
    dev = sum(parts.values())
    fits = dev <= hw.usable
    _, gpus = inp.task_resources
    notes = ["training-free: fitted by one task, both models read from their files one "
             "block at a time; no training workers"]
    if not fits:
        notes.append(f"needs {gb(dev)} on one device: fewer train.closed_form.samples, or "
                     "train.closed_form.offload: true")
    if gpus < 1 and inp.on_gpu:
        notes.append("set cluster.stages.train.gpus=1 (the fit's task asks for no GPU)")
    host = fit_host_bytes(shape, cfg, heads=shape.card.layers * shape.card.heads, samples=n)
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=dev, host_bytes=host,
                         disk_bytes=None, gpus_config=gpus, gpus_min=1 if fits else None,
                         fits=fits, parts=parts, notes=tuple(notes))


def estimate_train(inp: EstimateInputs) -> StageEstimate:
    """Per GPU under ZeRO (:func:`train_parts`; the teacher pass before training when the KL
    reads a cached top-k), the fewest workers that fit, host memory while loading
    (:func:`train_host_bytes`), the teacher's top-k file on disk, and the training-free fit
    that starts training when an init asks for it (a task on one GPU before the workers).
    A training-free method is :func:`estimate_fit`."""
    from recoup.cluster.placement import worker_group

    cfg: TrainConfig = inp.config
    if get_method(cfg.method).training_free:
        return estimate_fit(inp)
    shape, hw = inp.shape, inp.hardware
    selector = inp.sections["select"].selector
    heads = chosen_count(selector.top_count, selector.top_fraction,
                         shape.card.layers * shape.card.heads)
    eng = cfg.engine
    w = eng.workers
    n_samples = _train_samples(inp)
    parts = train_parts(shape, cfg, w, heads=heads)
    dev = worker_peak(shape, cfg, w, heads=heads)
    least = min_world_size(shape, cfg, hw.usable, heads=heads)
    notes = []
    teacher = teacher_pass_parts(shape, cfg, w)
    disk = None
    if teacher:
        notes.append(f"teacher pass before training (dense model, then freed): "
                     f"{sum(teacher.values()) / GB:.1f} GB per GPU")
        if n_samples is not None:
            disk = capacity.teacher_file_bytes(n_samples * cfg.max_seq_len,
                                               cfg.loss.teacher_top_k)
    elif teacher_top_k(cfg) == 0:
        notes.append("exact KL: the whole dense model on every worker "
                     "(train.loss.teacher_top_k > 0 computes its top-k before training)")
    fits = dev <= hw.usable
    if not fits:
        streamed = "" if eng.frozen_weights == "streamed" else \
            "; or train.engine.frozen_weights: streamed (one block resident)"
        notes.append((f"{w} workers are too few: train.engine.workers >= {least}"
                      if least else "does not fit at any world size") + streamed)
    note = placement_note(hw, worker_group(w, gpus=1, cpus=eng.cpus_per_worker))
    if note:
        notes.append(note)
        fits = False
    host, what = train_host_bytes(shape, cfg, w, heads=heads)
    notes.append(f"host: {host / GB:.1f} GB per worker ({what}); {hw.gpus_per_node} workers "
                 f"per node: {hw.gpus_per_node * host / GB:.0f} GB per node")
    if any(fits_wanted(get_method(cfg.method), cfg)):
        fit = sum(fit_parts(shape, cfg, samples=n_samples).values())
        notes.append(f"the training-free fit before training (one task, both models read one "
                     f"block at a time): {gb(fit)} on its GPU")
        if fit > hw.usable:
            notes.append("the fit does not fit one device: fewer train.closed_form.samples, "
                         "or train.closed_form.offload: true")
            fits = False
    return StageEstimate(stage=inp.stage, workers=w, device_bytes=dev, host_bytes=host,
                         disk_bytes=disk, gpus_config=w if inp.on_gpu else 0, gpus_min=least,
                         fits=fits, parts=parts, notes=tuple(notes))


register_stage(name="train", version=STAGE_VERSION, resumable=True,
               requires=("prepare", "degrade", "data"),
               optional=("collect", "svd", "select", "sensitivity"),
               summarize=_summary, estimate=estimate_train, holds_gpus=False)(train_stage)


__all__ = ("PARAMS_DIR", "TrainConfig", "build_job", "read_svd", "train_stage")

"""degrade: produce the degraded model (pruned or fake-quantized), or check the user's own.

The pruning and quantization methods are registered by name in
:mod:`recoup.stages.compress.methods` (``given`` takes your own model instead) and all run
through the block-by-block driver (:mod:`recoup.stages.compress.blockwise`): one decoder
block on the compute device at a time, so the device needs one block plus calibration
activations, not the whole model. The masks of pruned weights are saved too: merging LoRA
later must keep them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator
from safetensors.torch import save_file

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import (
    FP32,
    EstimateInputs,
    ModelShape,
    StageEstimate,
    forward_working_bytes,
    placement_note,
)
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_path, atomic_write_json
from recoup.stages.compress import blockwise, methods, pruning
from recoup.stages.compress.calibration import CalibrationConfig, calibration_ids
from recoup.stages.model import layout, modelio
from recoup.stages.prepare import CARD, MODEL_DIR, check_model_files

MASKS = "masks.safetensors"
REPORT = "sparsity.json"
#: bytes per element of the calibration statistics (float64)
STAT_ITEMSIZE = torch.empty(0, dtype=pruning.DEFAULT_STAT_DTYPE).element_size()
_NM = re.compile(r"^(\d+):(\d+)$")


class DegradeConfig(StrictModel):
    method: str = Field(
        "magnitude",
        description="Registered method: magnitude, wanda, sparsegpt (pruning), rtn "
        "(fake quantization), given (your own degraded model at `given_path`).",
    )
    sparsity: float = Field(
        0.5, gt=0.0, lt=1.0, description="Fraction of weights pruned (unstructured pattern)."
    )
    pattern: str = Field(
        "unstructured",
        description="'unstructured', or 'N:M' (N weights kept in every M, e.g. 2:4, 4:8).",
    )
    bits: int = Field(4, ge=2, le=8, description="rtn: bits per weight.")
    group_size: int = Field(
        128, ge=-1, description="rtn: input columns sharing one scale; -1: one per row."
    )
    given_path: Path | None = Field(None, description="given: Hugging Face folder of your model.")
    micro_batch: int = Field(8, ge=1, description="Calibration samples per forward pass.")
    calibration: CalibrationConfig = CalibrationConfig()

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        _check_method(v)
        return v

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        if v == 0:
            raise ValueError("must be -1 (one scale per row) or a positive column count, not 0")
        return v

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        if v == "unstructured":
            return v
        m = _NM.match(v)
        if not m:
            raise ValueError(f"must be 'unstructured' or 'N:M' such as '2:4', not {v!r}")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"N:M needs 0 < N < M (got {v})")
        return v

    @property
    def nm(self) -> tuple[int, int] | None:
        if self.pattern == "unstructured":
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


@dataclass(frozen=True, kw_only=True)
class DegradeInputs:
    dense_dir: Path
    card: modelio.ModelCard
    data_dir: Callable[[], Path]
    device: torch.device
    progress: bool
    #: the synthesize stage's folder when it is in the pipeline (synthetic calibration text)
    synthesized: Path | None = None


#: the method that takes the user's own degraded model instead of computing one
GIVEN = "given"
Degraded = tuple[Any, Any, dict[str, torch.Tensor]]
"""(degraded model, tokenizer, KEEP masks by weight name)"""


def _check_method(name: str) -> None:
    """``degrade.method`` names a registered method or ``given``; one sentence if not."""
    if name != GIVEN and name not in methods.available_methods():
        known = ", ".join(sorted((*methods.available_methods(), GIVEN)))
        raise ValueError(f"degrade.method {name!r} is unknown; choose one of {known}")


def _blockwise(cfg: DegradeConfig, inp: DegradeInputs) -> Degraded:
    """A registered method (:mod:`recoup.stages.compress.methods`), run block by block."""
    driver = methods.get_method(cfg.method)
    if driver.kind == "prune":
        nm = cfg.nm
        spec = methods.DegradeSpec(
            method=cfg.method, sparsity=None if nm else cfg.sparsity,
            n=nm[0] if nm else None, m=nm[1] if nm else None,
        )
    else:
        spec = methods.DegradeSpec(
            method=cfg.method, bits=cfg.bits,
            group_size=None if cfg.group_size == -1 else cfg.group_size,
        )
    dtype = modelio.DTYPES[inp.card.dtype]
    model = modelio.load_model(inp.dense_dir, dtype)
    tokenizer = modelio.load_tokenizer(inp.dense_dir)
    calib = None
    if driver.statistic is not None:
        calib = calibration_ids(
            cfg.calibration, tokenizer, inp.data_dir, max_positions=inp.card.max_positions,
            synthesized=inp.synthesized,
        )
    result = blockwise.degrade_blockwise(
        model, calib, spec, device=inp.device, micro_batch=cfg.micro_batch,
        progress=inp.progress,
    )
    return model, tokenizer, result.masks


def _given(cfg: DegradeConfig, inp: DegradeInputs) -> Degraded:
    """The user's own degraded model, checked against the dense one."""
    if cfg.given_path is None:
        raise ValueError("degrade.method 'given' needs degrade.given_path (your model's folder)")
    if not (cfg.given_path / "config.json").is_file():
        raise FileNotFoundError(
            f"degrade.given_path {cfg.given_path} is not a Hugging Face model folder "
            "(no config.json in it)"
        )
    dtype = modelio.DTYPES[inp.card.dtype]
    dense = modelio.load_model(inp.dense_dir, dtype)
    check_model_files(cfg.given_path, f"degrade.given_path {cfg.given_path}")
    model = modelio.load_model(cfg.given_path, dtype)
    modelio.check_supported(model.config, f"degrade.given_path {cfg.given_path}")
    modelio.check_same_architecture(dense, model, f"degrade.given_path {cfg.given_path}")
    del dense
    params = dict(model.named_parameters())
    masks = {name: params[name].detach() != 0 for name in layout.linear_weight_names(model)}
    return model, modelio.load_tokenizer(inp.dense_dir), masks


def sparsity_report(model: Any, nm: tuple[int, int] | None) -> dict[str, Any]:
    """Per linear matrix: achieved sparsity and (for N:M) validity; and the totals."""
    params = dict(model.named_parameters())
    rows: dict[str, Any] = {}
    zeros = total = 0
    for name in layout.linear_weight_names(model):
        w = params[name].detach()
        z = int((w == 0).sum())
        row: dict[str, Any] = {"sparsity": z / w.numel(), "numel": w.numel()}
        if nm is not None:
            row["nm_valid"] = pruning.nm_valid(w, *nm)
        rows[name] = row
        zeros += z
        total += w.numel()
    out: dict[str, Any] = {"matrices": rows, "linear_sparsity": zeros / max(total, 1)}
    if nm is not None:
        out["nm_valid"] = all(r["nm_valid"] for r in rows.values())
    return out


def _summary(m: Metrics) -> str:
    text = f"{m['method']}: linear sparsity {m['linear_sparsity']:.3f}"
    if "nm_valid" in m:
        text += f", {m['pattern']} valid: {m['nm_valid']}"
    return text


def degrade_parts(shape: ModelShape, cfg: DegradeConfig) -> dict[str, int]:
    """Device bytes of the block-by-block driver: one decoder block, and for calibrated
    methods the calibration activations (N x seq x hidden), a micro-batch's working set, the
    input statistics (norms for wanda, Hessians for sparsegpt) and sparsegpt's solve."""
    card, item = shape.card, shape.itemsize
    parts = {"one decoder block": shape.block_bytes}
    calibrated = (cfg.method in methods.available_methods()
                  and methods.get_method(cfg.method).statistic is not None)
    if calibrated:
        n, seq = cfg.calibration.num_samples, cfg.calibration.seq_len
        parts["calibration activations (N x seq x hidden)"] = n * seq * card.hidden * item
        parts["block working set (one micro-batch)"] = forward_working_bytes(
            card, min(cfg.micro_batch, n) * seq, item)
        inputs = _stat_inputs(shape)
        if cfg.method == "wanda":
            parts["input norms (float64)"] = STAT_ITEMSIZE * sum(inputs)
        else:
            parts["Hessians (float64, one per input)"] = STAT_ITEMSIZE * sum(i * i for i in inputs)
            parts["sparsegpt solve (largest linear)"] = max(
                3 * STAT_ITEMSIZE * i * i + FP32 * i * i + (FP32 + 1) * o * i
                for _, o, i in shape.block_linears)
    return parts


def _stat_inputs(shape: ModelShape) -> list[int]:
    """in_features of each distinct linear input of a block (q/k/v share one, gate/up one)."""
    by_name = {n.rsplit(".", 1)[-1]: i for n, _, i in shape.block_linears}
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
              ("down_proj",))
    return [by_name[g[0]] for g in groups if g[0] in by_name]


def estimate_degrade(inp: EstimateInputs) -> StageEstimate:
    """Device: :func:`degrade_parts`; host and disk: the whole model, plus the bool keep
    masks of every linear weight when the method prunes."""
    cfg: DegradeConfig = inp.config
    shape, hw = inp.shape, inp.hardware
    cpus, gpus = inp.task_resources
    parts = degrade_parts(shape, cfg)
    dev = sum(parts.values())
    prunes = (cfg.method in methods.available_methods()
              and methods.get_method(cfg.method).kind == "prune")
    masks = shape.linear_params if prunes else 0
    notes = []
    fits = dev <= hw.usable
    if not fits:
        notes.append("one block and its calibration data exceed one GPU: lower "
                     "degrade.calibration.num_samples or seq_len")
    if gpus < 1 and inp.device != "cpu":
        notes.append("set cluster.stages.degrade.gpus=1 (its task asks for no GPU)")
    note = placement_note(hw, [{"CPU": cpus, "GPU": max(gpus, 1)}])
    if note:
        notes.append(note)
        fits = False
    if masks:
        notes.append("host: the whole model plus bool keep-masks of every linear weight")
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=dev,
                         host_bytes=shape.weights_bytes + masks,
                         disk_bytes=shape.weights_bytes + masks, gpus_config=gpus,
                         gpus_min=1 if dev <= hw.usable else None, fits=fits, parts=parts,
                         notes=tuple(notes))


@register_stage(name="degrade", version=1, requires=("prepare",), optional=("synthesize",),
                summarize=_summary, estimate=estimate_degrade)
def degrade(ctx: StageContext) -> Metrics:
    cfg: DegradeConfig = ctx.config
    _check_method(cfg.method)
    dense_dir = ctx.input("prepare")
    inputs = DegradeInputs(
        dense_dir=dense_dir / MODEL_DIR,
        card=modelio.ModelCard.read(dense_dir / CARD),
        data_dir=ctx.data_dir,
        device=torch.device(ctx.device),
        progress=ctx.progress,
        synthesized=ctx.inputs.get("synthesize"),
    )
    model, tokenizer, masks = (_given if cfg.method == GIVEN else _blockwise)(cfg, inputs)
    prunes = cfg.method != GIVEN and methods.get_method(cfg.method).kind == "prune"
    report = sparsity_report(model, cfg.nm if prunes else None)
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    if masks:
        with atomic_path(ctx.out_dir / MASKS) as tmp:
            save_file({k: v.contiguous().to(torch.bool).cpu() for k, v in masks.items()},
                      str(tmp))
    atomic_write_json(ctx.out_dir / REPORT, report)
    metrics: Metrics = {"method": cfg.method, "pattern": cfg.pattern,
                        "linear_sparsity": report["linear_sparsity"]}
    if "nm_valid" in report:
        metrics["nm_valid"] = report["nm_valid"]
    ctx.log.info("degraded with %s: linear sparsity %.4f", cfg.method, report["linear_sparsity"])
    return metrics

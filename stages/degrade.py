"""degrade: produce the degraded model (pruned or fake-quantized), or check the user's own.

Methods live in a registry by name. The pruning and quantization methods all run through
the block-by-block driver (:mod:`recoup.stages.compress.blockwise`): one decoder block on the
compute device at a time, so the device needs one block plus calibration activations,
not the whole model. The masks of pruned weights are saved too: merging LoRA later must
keep them.
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
from recoup.orchestrator.registry import Registry
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.orchestrator.store import atomic_write_json, commit_path, tmp_path_for
from recoup.stages.compress import blockwise, pruning
from recoup.stages.compress.calibration import CalibrationConfig, calibration_ids
from recoup.stages.model import modelio
from recoup.stages.prepare import CARD, MODEL_DIR

MASKS = "masks.safetensors"
REPORT = "sparsity.json"
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


#: name -> function(cfg, inputs) -> (degraded model, tokenizer, masks by weight name)
DegradeMethod = Callable[[DegradeConfig, DegradeInputs], tuple[Any, Any, dict[str, torch.Tensor]]]
_METHODS: Registry[DegradeMethod] = Registry(
    "degrade method", unknown="degrade.method {name!r} is unknown; choose one of {known}")


def register_method(name: str) -> Callable[[DegradeMethod], DegradeMethod]:
    def deco(fn: DegradeMethod) -> DegradeMethod:
        return _METHODS.add(name, fn)

    return deco


def get_method(name: str) -> DegradeMethod:
    return _METHODS.get(name)


def _blockwise(method: str) -> DegradeMethod:
    """Wrap a method of the block-by-block driver as a stage method."""

    def run(cfg: DegradeConfig, inp: DegradeInputs) -> tuple[Any, Any, dict[str, torch.Tensor]]:
        driver = blockwise.get_method(method)
        if driver.kind == "prune":
            nm = cfg.nm
            spec = blockwise.DegradeSpec(
                method=method, sparsity=None if nm else cfg.sparsity,
                n=nm[0] if nm else None, m=nm[1] if nm else None,
            )
        else:
            spec = blockwise.DegradeSpec(
                method=method, bits=cfg.bits,
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

    return run


for _name in blockwise.available_methods():
    register_method(_name)(_blockwise(_name))


@register_method("given")
def _given(cfg: DegradeConfig, inp: DegradeInputs) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    if cfg.given_path is None:
        raise ValueError("degrade.method 'given' needs degrade.given_path (your model's folder)")
    if not (cfg.given_path / "config.json").is_file():
        raise FileNotFoundError(
            f"degrade.given_path {cfg.given_path} is not a Hugging Face model folder "
            "(no config.json in it)"
        )
    dtype = modelio.DTYPES[inp.card.dtype]
    dense = modelio.load_model(inp.dense_dir, dtype)
    model = modelio.load_model(cfg.given_path, dtype)
    modelio.check_supported(model.config, f"degrade.given_path {cfg.given_path}")
    modelio.check_same_architecture(dense, model, f"degrade.given_path {cfg.given_path}")
    del dense
    params = dict(model.named_parameters())
    masks = {name: params[name].detach() != 0 for name in modelio.linear_weight_names(model)}
    return model, modelio.load_tokenizer(inp.dense_dir), masks


def sparsity_report(model: Any, nm: tuple[int, int] | None) -> dict[str, Any]:
    """Per linear matrix: achieved sparsity and (for N:M) validity; and the totals."""
    params = dict(model.named_parameters())
    rows: dict[str, Any] = {}
    zeros = total = 0
    for name in modelio.linear_weight_names(model):
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


@register_stage(name="degrade", version=1, requires=("prepare",), optional=("synthesize",),
                summarize=_summary)
def degrade(ctx: StageContext) -> Metrics:
    cfg: DegradeConfig = ctx.config
    method = get_method(cfg.method)
    dense_dir = ctx.input("prepare")
    inputs = DegradeInputs(
        dense_dir=dense_dir / MODEL_DIR,
        card=modelio.ModelCard.read(dense_dir / CARD),
        data_dir=ctx.run.run.resolved_data_dir,
        device=torch.device(ctx.run.run.device),
        progress=ctx.progress,
        synthesized=ctx.inputs.get("synthesize"),
    )
    model, tokenizer, masks = method(cfg, inputs)
    prunes = cfg.method in blockwise.available_methods() and \
        blockwise.get_method(cfg.method).kind == "prune"
    report = sparsity_report(model, cfg.nm if prunes else None)
    modelio.save_model(model, tokenizer, ctx.out_dir / MODEL_DIR)
    if masks:
        tmp = tmp_path_for(ctx.out_dir / MASKS)
        save_file({k: v.contiguous().to(torch.bool).cpu() for k, v in masks.items()}, str(tmp))
        commit_path(tmp, ctx.out_dir / MASKS)
    atomic_write_json(ctx.out_dir / REPORT, report)
    metrics: Metrics = {"method": cfg.method, "pattern": cfg.pattern,
                        "linear_sparsity": report["linear_sparsity"]}
    if "nm_valid" in report:
        metrics["nm_valid"] = report["nm_valid"]
    ctx.log.info("degraded with %s: linear sparsity %.4f", cfg.method, report["linear_sparsity"])
    return metrics

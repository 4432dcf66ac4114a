"""The run config: one section per stage, each owned and defined by its stage module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from recoup.cluster.config import ClusterConfig
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import DATA_DIR_ENV, DataDir, registered_stages
from recoup.stages.collect import CollectConfig
from recoup.stages.data import DataConfig
from recoup.stages.degrade import DegradeConfig
from recoup.stages.evaluate import EvaluateConfig
from recoup.stages.export import ExportConfig
from recoup.stages.prepare import PrepareConfig
from recoup.stages.report import ReportConfig
from recoup.stages.select import SelectConfig
from recoup.stages.sensitivity import SensitivityConfig
from recoup.stages.svd import SvdConfig
from recoup.stages.synthesize import SynthesizeConfig
from recoup.stages.train import TrainConfig

__all__ = ["DATA_DIR_ENV", "DEFAULT_PIPELINE", "RunConfig", "RunSection"]

DEFAULT_PIPELINE = ("prepare", "degrade", "evaluate")


class RunSection(StrictModel):
    """Settings of the run as a whole."""

    dir: Path = Field(description="Run directory: every stage's outputs and manifests.")
    data_dir: Path | None = Field(
        None,
        description=f"Folder with the evaluation/training data. Unset: ${DATA_DIR_ENV}, else "
        "../shared/data next to the current directory or the repository.",
    )
    device: str = Field("cpu", description="Torch device for model work: 'cpu', 'cuda', ...")
    pipeline: tuple[str, ...] = Field(DEFAULT_PIPELINE, description="Stages to run, in order.")
    verify: Literal["size", "sha256"] = Field(
        "sha256",
        description="How a finished stage's files are checked before reuse: sizes only, or "
        "sizes and sha256 (catches corruption; reads every file once).",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _dir_given(cls, v: Any) -> Any:
        if isinstance(v, str | Path) and not str(v).strip():
            raise ValueError("is empty; name the run directory (an empty value would mean the "
                             "current directory)")
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        import torch

        try:
            torch.device(v)
        except (RuntimeError, ValueError):
            raise ValueError(f"{v!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") \
                from None
        return v

    @field_validator("pipeline")
    @classmethod
    def _known_stages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        known = registered_stages()
        unknown = [name for name in v if name not in known]
        if unknown:
            raise ValueError(f"unknown stage {', '.join(repr(u) for u in unknown)}; known "
                             f"stages: {', '.join(sorted(known))}")
        if len(set(v)) != len(v):
            twice = sorted({n for n in v if v.count(n) > 1})
            raise ValueError(f"stage {', '.join(twice)} is listed more than once")
        if not v:
            raise ValueError("is empty; list the stages to run")
        return v

    def resolved_data_dir(self) -> Path:
        """The data folder to read from; a clear error if none of the candidates exists."""
        return DataDir(self.data_dir)()


class RunConfig(StrictModel):
    run: RunSection
    cluster: ClusterConfig = ClusterConfig()
    prepare: PrepareConfig
    synthesize: SynthesizeConfig = SynthesizeConfig()
    degrade: DegradeConfig = DegradeConfig()
    data: DataConfig = DataConfig()
    sensitivity: SensitivityConfig = SensitivityConfig()
    collect: CollectConfig = CollectConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    svd: SvdConfig = SvdConfig()
    select: SelectConfig = SelectConfig()
    train: TrainConfig = TrainConfig()
    export: ExportConfig = ExportConfig()
    report: ReportConfig = ReportConfig()

    @model_validator(mode="after")
    def _check_at_load(self) -> RunConfig:
        """What can be checked before any stage runs is checked here, so a typo costs
        seconds: stage order, and LoRA layer indices against the model's depth where the
        depth is known without loading the model (the tiny model's config, or the
        ``config.json`` of a model folder)."""
        from recoup.orchestrator.runner import pipeline_specs

        pipeline_specs(self)
        layers = _known_layers(self.prepare)
        lora = self.train.lora
        if layers is not None and "train" in self.run.pipeline and _uses_lora(self.train.method):
            if lora.layers != "auto":
                bad = [i for i in lora.layers if not 0 <= i < layers]
                if bad:
                    raise ValueError(f"train.lora.layers: {bad} out of range: the model has "
                                     f"{layers} layers (indices 0..{layers - 1})")
            elif lora.auto_layers > layers:
                raise ValueError(f"train.lora.auto_layers={lora.auto_layers} exceeds the "
                                 f"model's {layers} layers")
        return self


def _uses_lora(method: str) -> bool:
    from recoup.stages.recovery.methods import get_method

    try:
        return get_method(method).uses_lora
    except (KeyError, ValueError):
        return False  # an unknown method is train's own error


def _known_layers(prepare: PrepareConfig) -> int | None:
    """The model's decoder layer count, when known without loading it."""
    from recoup.stages.model import modelio

    if prepare.source == modelio.TINY_ALIAS:
        return prepare.tiny.layers
    config = Path(prepare.source).expanduser() / "config.json"
    try:
        n = json.loads(config.read_text()).get("num_hidden_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

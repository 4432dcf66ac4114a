"""The run config: one section per stage, each owned and defined by its stage module."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from recoup.cluster.config import ClusterConfig
from recoup.orchestrator.config import StrictModel
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

DATA_DIR_ENV = "RECOUP_DATA_DIR"
DEFAULT_PIPELINE = ("prepare", "degrade", "evaluate")
_REPO_ROOT = Path(__file__).resolve().parent.parent


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

    def resolved_data_dir(self) -> Path:
        """The data folder to read from; a clear error if none of the candidates exists."""
        if self.data_dir is not None:
            candidates = [self.data_dir]
        elif os.environ.get(DATA_DIR_ENV):
            candidates = [Path(os.environ[DATA_DIR_ENV])]
        else:
            candidates = [Path.cwd().parent / "shared" / "data",
                          _REPO_ROOT.parent / "shared" / "data"]
        for c in candidates:
            if c.is_dir():
                return c.resolve()
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"no data directory found (looked in {tried}); set run.data_dir or ${DATA_DIR_ENV}"
        )


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

"""Stage contract and registry.

A stage is a plain function ``fn(ctx) -> metrics`` plus a :class:`StageSpec` that says
what it needs (upstream stages, its config section), how it is versioned and what it
costs (its ``estimate`` for ``recoup plan``). The
function receives everything through its :class:`StageContext` (no globals), so the
same function runs in-process or as a Ray task on another machine. It writes its files
into ``ctx.out_dir``; the runner hashes them and writes the manifest afterwards.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel

from recoup.orchestrator.registry import Registry
from recoup.orchestrator.stage_logging import log_to_file

if TYPE_CHECKING:
    from recoup.cluster.config import ClusterConfig
    from recoup.orchestrator.estimate import Estimate

Metrics = dict[str, Any]
DATA_DIR_ENV = "RECOUP_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataDir:
    """The data folder, resolved only when called.

    Data-free runs (a model given as is, evaluation without WikiText) must never require
    the data folder, so the runner hands stages this resolver rather than a path. It is
    picklable and resolves where it is called (a Ray worker sees its own environment).
    """

    #: ``run.data_dir`` when set; otherwise ``$RECOUP_DATA_DIR``, else ../shared/data
    configured: Path | None = None

    def __call__(self) -> Path:
        """The data folder to read from; a clear error if none of the candidates exists."""
        if self.configured is not None:
            candidates = [self.configured]
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


@dataclass(frozen=True, kw_only=True)
class StageContext:
    """Everything a stage may read. Picklable, so it travels to Ray workers as is."""

    name: str
    run_dir: Path
    out_dir: Path
    #: upstream stage name -> its folder, already verified complete by the runner
    inputs: Mapping[str, Path]
    #: this stage's own config section
    config: Any
    #: this stage's fingerprint (what its manifest will carry), e.g. a cache or job key
    fingerprint: str
    #: upstream stage name -> its fingerprint, for the stages this one reads
    upstream: Mapping[str, str]
    #: torch device for model work ('cpu', 'cuda', ...): ``run.device``
    device: str
    #: lazy resolver of the data folder: call it only when data is actually read
    data_dir: DataDir
    #: where pools, task fan-outs and training groups run
    cluster: ClusterConfig
    progress: bool = True
    #: data file name as configured -> its sha256 ("absent" when missing), as in the
    #: stage's fingerprint; a stage's own caches key on these, never on a name alone
    data_files: Mapping[str, str] = field(default_factory=dict)

    def input(self, stage: str) -> Path:
        try:
            return self.inputs[stage]
        except KeyError:
            raise KeyError(f"stage {self.name!r} has no input from stage {stage!r}") from None

    @property
    def log(self) -> logging.Logger:
        return logging.getLogger(f"recoup.{self.name}")


class StageFn(Protocol):
    def __call__(self, ctx: StageContext) -> Metrics: ...


@dataclass(frozen=True, kw_only=True)
class Resources:
    """What one execution of the stage asks the cluster for."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True, kw_only=True)
class StageSpec:
    name: str
    #: bump when the stage's code changes what it writes: invalidates old manifests
    version: int
    requires: tuple[str, ...]
    #: inputs used when those stages are in the pipeline (e.g. evaluate reads export's model)
    optional: tuple[str, ...] = ()
    #: attribute of the run config holding this stage's section
    config_key: str
    fn: StageFn
    #: sharded stages keep their partial files across a crash and resume from them
    resumable: bool = False
    #: one line of key metrics for ``recoup status``
    summarize: Callable[[Metrics], str] = field(default=lambda m: "")
    #: the table printed when this stage ends a run
    report: Callable[[Metrics], str] | None = None
    #: its memory / disk / GPU estimate for ``recoup plan``; None: "no estimate"
    estimate: Estimate | None = None
    #: False where the stage's GPU work runs in the workers or tasks it starts (a pool,
    #: Ray Train, model tasks): its own task then asks Ray for no GPU whatever the cluster
    #: settings say, since Ray keeps the GPUs of a task that waits on others and those
    #: workers could never get them
    holds_gpus: bool = True

    def inputs_in(self, pipeline: tuple[str, ...]) -> tuple[str, ...]:
        """The upstream stages this stage reads in a given pipeline."""
        return self.requires + tuple(o for o in self.optional if o in pipeline)

    def config_of(self, run_config: BaseModel) -> BaseModel:
        return getattr(run_config, self.config_key)


_REGISTRY: Registry[StageSpec] = Registry(
    "stage", unknown="unknown stage {name!r}; known stages: {known}")


def register_stage(
    *,
    name: str,
    version: int,
    requires: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    config_key: str | None = None,
    resumable: bool = False,
    summarize: Callable[[Metrics], str] | None = None,
    report: Callable[[Metrics], str] | None = None,
    estimate: Estimate | None = None,
    holds_gpus: bool = True,
) -> Callable[[StageFn], StageFn]:
    """Register ``fn`` as stage ``name``; a second registration of a name is an error.

    ``estimate`` is the stage's resource estimate for ``recoup plan``
    (:mod:`recoup.orchestrator.estimate`), declared here beside the stage's code.
    """

    def deco(fn: StageFn) -> StageFn:
        _REGISTRY.add(name, StageSpec(
            name=name,
            version=version,
            requires=requires,
            optional=optional,
            config_key=config_key or name,
            fn=fn,
            resumable=resumable,
            summarize=summarize or (lambda m: ""),
            report=report,
            estimate=estimate,
            holds_gpus=holds_gpus,
        ))
        return fn

    return deco


def get_stage(name: str) -> StageSpec:
    return _REGISTRY.get(name)


def registered_stages() -> Mapping[str, StageSpec]:
    return {name: _REGISTRY.get(name) for name in _REGISTRY.names()}


class Executor(Protocol):
    """Runs one stage function somewhere (this process, a Ray task, ...)."""

    def execute(self, spec: StageSpec, ctx: StageContext, resources: Resources) -> Metrics: ...

    def close(self) -> None: ...


def run_stage_fn(spec: StageSpec, ctx: StageContext) -> Metrics:
    """What every executor calls: the stage function with its log file attached."""
    with log_to_file(ctx.run_dir / "logs" / f"{spec.name}.log"):
        return spec.fn(ctx)


class InProcessExecutor:
    def execute(self, spec: StageSpec, ctx: StageContext, resources: Resources) -> Metrics:
        return run_stage_fn(spec, ctx)

    def close(self) -> None:
        pass

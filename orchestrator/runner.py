"""The runner: decide per stage whether to reuse, re-run or resume, then execute.

Fingerprint of a stage = sha256 over (stage name, stage version, its config section,
the fingerprints of its upstream stages). A stage is *done* when its manifest is valid
and carries the current fingerprint; otherwise it is *stale* (manifest of another
fingerprint: we say which values changed), *failed* or *pending*. Only the stages that
are not done run, in pipeline order, so changing one value re-runs that stage and what
follows it, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import yaml

from recoup.orchestrator import rundir, store
from recoup.orchestrator.config import diff_configs, fingerprint_dump
from recoup.orchestrator.lock import RunLock, holder_alive, holder_identity
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.stage import (
    DataDir,
    Executor,
    InProcessExecutor,
    Metrics,
    Resources,
    StageContext,
    StageSpec,
    get_stage,
)
from recoup.orchestrator.stage_logging import log_to_file

log = logging.getLogger("recoup.runner")

State = Literal["done", "stale", "pending", "failed", "running"]
CONFIG_FILE = "config.yaml"
KILL_AT_ENV = "RECOUP_KILL_AT"
#: manifest metric holding the sha256 of each data file the stage read
DATA_METRIC = "data_files"
_VERSIONED = ("recoup", "torch", "transformers", "ray", "deepspeed", "peft", "pyarrow")


class StageFailedError(RuntimeError):
    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"stage {stage!r} failed: {cause}")
        self.stage = stage
        self.cause = cause


def fingerprint(name: str, version: int, config: dict[str, Any], upstream: dict[str, str],
                data: Mapping[str, str] | None = None) -> str:
    """``data``: sha256 of each data file the stage reads (:mod:`recoup.orchestrator.rundir`);
    left out of the hash when empty, so stages that read no data keep their fingerprints."""
    obj: dict[str, Any] = {"stage": name, "version": version, "config": config,
                           "upstream": upstream}
    if data:
        obj["data"] = dict(data)
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    spec: StageSpec
    fingerprint: str
    config: dict[str, Any]
    upstream: dict[str, str]
    state: State
    reasons: tuple[str, ...] = ()
    manifest: store.Manifest | None = None
    failure: dict[str, Any] | None = None
    #: what is wrong with the stage's files on disk (unreadable manifest, an output missing,
    #: resized or corrupted), naming the file; logged when the stage is re-run, so run.log
    #: keeps a record of damage that a later clean run would otherwise hide
    damage: str | None = None
    #: sha256 of each data file the stage reads (part of its fingerprint)
    data: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name


def pipeline_specs(cfg: RunConfig) -> list[StageSpec]:
    """The stages of ``run.pipeline`` in order; each one's inputs must come before it."""
    specs: list[StageSpec] = []
    seen: set[str] = set()
    for name in cfg.run.pipeline:
        spec = get_stage(name)
        missing = [r for r in spec.requires if r not in seen]
        late = [o for o in spec.optional if o in cfg.run.pipeline and o not in seen]
        if late:
            raise ValueError(
                f"run.pipeline: stage {name!r} reads {', '.join(late)}, which must come before it"
            )
        if missing:
            raise ValueError(
                f"run.pipeline: stage {name!r} needs {', '.join(missing)} earlier in the pipeline"
            )
        specs.append(spec)
        seen.add(name)
    return specs


def _why_stale(plan_fp: str, spec: StageSpec, config: dict[str, Any], upstream: dict[str, str],
               m: store.Manifest, data: Mapping[str, str] | None = None) -> list[str]:
    reasons: list[str] = []
    if m.version != spec.version:
        reasons.append(f"stage code version {m.version} -> {spec.version}")
    reasons += diff_configs(m.config, config, prefix=f"{spec.config_key}.")
    old_data = m.metrics.get(DATA_METRIC) if isinstance(m.metrics, dict) else None
    if isinstance(old_data, dict):
        reasons += [f"data file {k} changed" for k, v in (data or {}).items()
                    if k in old_data and old_data[k] != v]
    for up, fp in upstream.items():
        if m.upstream.get(up) != fp:
            reasons.append(f"upstream stage '{up}' changed")
    if not reasons and m.fingerprint != plan_fp:
        reasons.append("fingerprint changed")
    return reasons


def _marker_pid_alive(marker: Path) -> bool:
    try:
        return holder_alive(json.loads(marker.read_text()))
    except (OSError, ValueError):
        return False


def _read_failure(failed: Path) -> dict[str, Any]:
    """``failed.json``, or a stand-in naming the file when it is damaged: a damaged record
    of a failure must not block the re-run it asks for."""
    try:
        info = json.loads(failed.read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or not isinstance(info.get("error", ""), str):
        return {"error": f"failed earlier ({failed} is unreadable)"}
    return info


def _stage_state(spec: StageSpec, stage_dir: Path, fp: str, config: dict[str, Any],
                 upstream: dict[str, str], verify: store.Verify,
                 upstream_pending: Sequence[str], data: dict[str, str] | None = None,
                 ) -> StagePlan:
    """``upstream_pending``: the stages this one reads that are not done (re-run first)."""
    base = {"spec": spec, "fingerprint": fp, "config": config, "upstream": upstream,
            "data": data or {}}
    running = stage_dir / store.RUNNING
    if running.exists() and _marker_pid_alive(running):
        return StagePlan(**base, state="running")
    manifest: store.Manifest | None = None
    try:
        manifest = store.read_manifest(stage_dir)
    except store.ManifestError as e:
        if (stage_dir / store.MANIFEST).exists():
            return StagePlan(**base, state="stale", reasons=(str(e),), damage=str(e))
    if manifest is not None:
        if manifest.fingerprint == fp and not upstream_pending:
            try:
                store.verify_outputs(stage_dir, manifest, verify)
            except store.ManifestError as e:
                return StagePlan(**base, state="stale", reasons=(str(e),), manifest=manifest,
                                 damage=str(e))
            return StagePlan(**base, state="done", manifest=manifest)
        if manifest.fingerprint == fp:
            reasons = [f"upstream stage '{r}' is re-run" for r in upstream_pending]
        else:
            reasons = _why_stale(fp, spec, config, upstream, manifest, data)
        return StagePlan(**base, state="stale", reasons=tuple(reasons), manifest=manifest)
    failed = stage_dir / store.FAILED
    if running.exists():
        return StagePlan(**base, state="failed",
                         reasons=("interrupted: the process running it died",))
    if failed.exists():
        info = _read_failure(failed)
        return StagePlan(**base, state="failed", reasons=(info.get("error", "?"),), failure=info)
    return StagePlan(**base, state="pending")


def _data_dir_or_none(cfg: RunConfig) -> Path | None:
    try:
        return DataDir(cfg.run.data_dir)()
    except FileNotFoundError:
        return None  # a data-free run: the stages that need data say so themselves


def plan_run(cfg: RunConfig, *, verify: store.Verify | None = None,
             save_hashes: bool = False) -> list[StagePlan]:
    """State of every pipeline stage against the current config, without running anything.
    ``save_hashes``: keep the data-file hashes in the run's cache (the runner, under the
    lock; ``status`` only reads)."""
    verify = verify or cfg.run.verify
    plans: list[StagePlan] = []
    fps: dict[str, str] = {}
    done: set[str] = set()
    data_dir = _data_dir_or_none(cfg)
    hasher = rundir.DataHasher(cfg.run.dir / rundir.HASH_CACHE)
    for spec in pipeline_specs(cfg):
        config = fingerprint_dump(spec.config_of(cfg))
        deps = spec.inputs_in(cfg.run.pipeline)
        upstream = {r: fps[r] for r in deps}
        data = rundir.data_digests(config, data_dir, hasher)
        fp = fingerprint(spec.name, spec.version, config, upstream, data)
        fps[spec.name] = fp
        pending = [r for r in deps if r not in done]
        plan = _stage_state(spec, cfg.run.dir / spec.name, fp, config, upstream, verify,
                            pending, data)
        if plan.state == "done":
            done.add(spec.name)
        plans.append(plan)
    if save_hashes:
        hasher.save()
    return plans


def _versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass(kw_only=True)
class RunOutcome:
    plans: list[StagePlan]
    ran: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    metrics: dict[str, Metrics] = field(default_factory=dict)


def stage_context(cfg: RunConfig, spec: StageSpec, *, out_dir: Path,
                  inputs: Mapping[str, Path], fingerprint: str,
                  upstream: Mapping[str, str], progress: bool = True,
                  data_files: Mapping[str, str] | None = None) -> StageContext:
    """What the runner hands a stage: its inputs and config section, its fingerprint and
    those of its upstream stages, and the run-wide settings it may read (device, data
    folder, cluster). Tests that call one stage directly build their context here too."""
    return StageContext(
        name=spec.name, run_dir=cfg.run.dir, out_dir=out_dir, inputs=dict(inputs),
        config=spec.config_of(cfg), fingerprint=fingerprint, upstream=dict(upstream),
        device=cfg.run.device, data_dir=DataDir(cfg.run.data_dir), cluster=cfg.cluster,
        progress=progress, data_files=dict(data_files or {}),
    )


def _start_stage(spec: StageSpec, stage_dir: Path) -> Path:
    """Mark the stage running and return the folder it writes into.

    Resumable (sharded) stages work in place, keeping finished shards across crashes. The
    others write into a fresh staging folder that replaces the old outputs only once
    complete, so a failed re-run (disk full, a bug, a kill) leaves the previous complete
    state of the run intact.
    """
    if not rundir.is_ours(stage_dir):
        raise rundir.RunDirError(
            f"{stage_dir} was not made by recoup (no {store.MANIFEST}, {store.RUNNING} or "
            f"{store.FAILED} in it); move it out of the run directory")
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / store.FAILED).unlink(missing_ok=True)
    store.atomic_write_json(stage_dir / store.RUNNING, holder_identity())
    if spec.resumable:
        store.remove_temporaries(stage_dir)
        (stage_dir / store.MANIFEST).unlink(missing_ok=True)
        return stage_dir
    work = stage_dir.with_name(f"{stage_dir.name}{store.TMP_MARK}staging")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    return work


def _fault_point(name: str) -> None:
    """Fault injection for the reliability tests: ``RECOUP_KILL_AT=degrade:before-manifest``
    SIGKILLs this process there, the worst moment for a crash (outputs written, manifest
    not yet). Unset in normal use."""
    if os.environ.get(KILL_AT_ENV) == name:
        log.warning("fault injection: SIGKILL at %s", name)
        os.kill(os.getpid(), signal.SIGKILL)


def _record_failure(stage_dir: Path, work: Path, e: BaseException) -> None:
    """Best effort: on a full disk even this small file may not fit."""
    if work != stage_dir:
        shutil.rmtree(work, ignore_errors=True)
    try:
        store.atomic_write_json(stage_dir / store.FAILED, {
            "error": f"{type(e).__name__}: {e}", "at": time.time(),
            "traceback": traceback.format_exc()[-4000:],
        })
    except OSError:
        log.exception("could not record the failure of %s", stage_dir.name)
    (stage_dir / store.RUNNING).unlink(missing_ok=True)


def _execute(plan: StagePlan, cfg: RunConfig, executor: Executor,
             inputs: dict[str, Path], progress: bool) -> store.Manifest:
    spec = plan.spec
    stage_dir = cfg.run.dir / spec.name
    work = _start_stage(spec, stage_dir)
    ctx = stage_context(cfg, spec, out_dir=work, inputs=inputs, fingerprint=plan.fingerprint,
                        upstream=plan.upstream, progress=progress, data_files=plan.data)
    cpus, gpus = cfg.cluster.resources_for(spec.name)
    resources = Resources(num_cpus=cpus, num_gpus=gpus if spec.holds_gpus else 0.0)
    started = time.time()
    try:
        metrics = executor.execute(spec, ctx, resources)
        _fault_point(f"{spec.name}:before-manifest")
        manifest = store.Manifest(
            stage=spec.name, version=spec.version, fingerprint=plan.fingerprint,
            config=plan.config, upstream=plan.upstream, outputs=store.describe_outputs(work),
            metrics={**(metrics or {}), **({DATA_METRIC: plan.data} if plan.data else {})},
            started_at=started, finished_at=time.time(),
            versions=_versions(),
        )
        store.write_manifest(work, manifest)
        if work != stage_dir:
            store.commit_path(work, stage_dir)
    except BaseException as e:
        _record_failure(stage_dir, work, e)
        raise StageFailedError(spec.name, e) from e
    (stage_dir / store.RUNNING).unlink(missing_ok=True)
    return manifest


def describe_plan(plan: StagePlan) -> str:
    if plan.state == "done":
        assert plan.manifest is not None
        return f"{plan.name:<10} reused   (done in {plan.manifest.duration_s:.1f} s earlier)"
    why = "; ".join(plan.reasons) if plan.reasons else "not run yet"
    verb = {"stale": "re-run", "failed": "re-run", "pending": "run", "running": "run"}[plan.state]
    return f"{plan.name:<10} {verb:<8} ({why})"


def run_pipeline(
    cfg: RunConfig,
    *,
    executor_factory: Callable[[], Executor] = InProcessExecutor,
    progress: bool = True,
    echo: Callable[[str], None] = lambda s: print(s, flush=True),
) -> RunOutcome:
    """Run every stage of the pipeline that is not done; reuse the rest.

    The executor (and with it a Ray cluster) is only created once a stage must run, so a
    fully cached run finishes in seconds.
    """
    run_dir = cfg.run.dir
    pipeline_specs(cfg)  # refuse a bad pipeline before anything is written
    rundir.claim(run_dir, cfg.run.pipeline)
    with RunLock(run_dir), log_to_file(run_dir / "logs" / "run.log"):
        rundir.sweep(run_dir, cfg.run.pipeline)
        plans = plan_run(cfg, save_hashes=True)
        store.atomic_write_text(run_dir / CONFIG_FILE,
                                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        outcome = RunOutcome(plans=plans)
        executor: Executor | None = None
        inputs: dict[str, Path] = {}
        changed: set[str] = set()
        try:
            for plan in plans:
                stage_dir = run_dir / plan.name
                deps = plan.spec.inputs_in(cfg.run.pipeline)
                if plan.state == "done" and not (set(deps) & changed):
                    echo(describe_plan(plan))
                    assert plan.manifest is not None
                    outcome.reused.append(plan.name)
                    outcome.metrics[plan.name] = plan.manifest.metrics
                else:
                    echo(describe_plan(plan))
                    if plan.damage is not None:
                        log.warning("%s: recomputing: %s", plan.name, plan.damage)
                    if executor is None:
                        executor = executor_factory()
                    spec_inputs = {r: inputs[r] for r in deps}
                    t0 = time.time()
                    manifest = _execute(plan, cfg, executor, spec_inputs, progress)
                    echo(f"{plan.name:<10} done     in {time.time() - t0:.1f} s"
                         + (f"  {s}" if (s := plan.spec.summarize(manifest.metrics)) else ""))
                    outcome.ran.append(plan.name)
                    outcome.metrics[plan.name] = manifest.metrics
                    changed.add(plan.name)
                inputs[plan.name] = stage_dir
        finally:
            if executor is not None:
                executor.close()
        for plan in reversed(plans):
            if plan.spec.report is not None:
                echo("")
                echo(plan.spec.report(outcome.metrics[plan.name]))
                break
        return outcome


def load_run_dir_config(run_dir: Path) -> RunConfig:
    """The config a run directory was last run with (for ``recoup status``)."""
    from recoup.orchestrator.config import ConfigError, read_yaml_mapping, validate

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a recoup run directory (no {CONFIG_FILE} in it)")
    data = read_yaml_mapping(path)
    data.setdefault("run", {})["dir"] = str(run_dir)
    return validate(RunConfig, data, source=str(path))


def status_rows(cfg: RunConfig, *, verify: store.Verify = "size") -> Sequence[tuple[str, ...]]:
    rows = []
    for plan in plan_run(cfg, verify=verify):
        m = plan.manifest
        duration = f"{m.duration_s:.1f} s" if m and plan.state in ("done", "stale") else "-"
        when = (time.strftime("%Y-%m-%d %H:%M", time.localtime(m.finished_at))
                if m and plan.state in ("done", "stale") else "-")
        if plan.state == "done" and m is not None:
            detail = plan.spec.summarize(m.metrics)
        else:
            detail = "; ".join(plan.reasons)
        rows.append((plan.name, plan.state, duration, when, detail))
    return rows

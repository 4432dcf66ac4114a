"""Faults a long run meets on a shared cluster, injected for real: SIGKILL of the driver at
the worst moment of every stage of the full pipeline (outputs written, manifest not yet),
damage to finished outputs (a flipped byte, a truncated file, a truncated manifest), a write
failure (file-size limit standing in for a full disk), a second run on a held directory, an
unusable run directory.

The full-pipeline tests share one uninterrupted reference run (module fixture) of the tiny
random Llama, in-process, and compare every stage's outputs with it: byte for byte through
the manifests' sha256, except for the few files that legitimately differ between two
identical runs (see :func:`_content_digest`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors import safe_open

from recoup.orchestrator import store
from recoup.orchestrator.lock import RunLock
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.runner import KILL_AT_ENV, plan_run, run_pipeline
from tests.conftest import tiny_config

STAGES = ("prepare", "degrade", "evaluate")
CMD = [sys.executable, "-m", "recoup", "run", "--no-progress"]
FULL = ("prepare", "degrade", "data", "collect", "svd", "select", "train", "export",
        "evaluate", "report")
#: the full pipeline at its smallest: 8 samples in 2 collect shards, 4 training steps with a
#: checkpoint every 2 (so a killed train stage has checkpoints to resume from)
FULL_SECTIONS: dict[str, dict[str, Any]] = {
    "run": {"pipeline": list(FULL)},
    "data": {"source": {"source": "alpaca", "path": "alpaca/train.jsonl", "num_samples": 8},
             "max_length": 256},
    "collect": {"samples_per_shard": 4, "batch_size": 4},
    "select": {"selector": {"method": "probe", "top_fraction": 0.25}},
    "train": {"method": "lcc", "max_seq_len": 256,
              "engine": {"workers": 1, "micro_batch": 2, "steps": 4, "checkpoint_every": 2,
                         "lr": 0.01}},
}


def _config_file(tmp_path: Path, run_dir: Path, data_dir: Path, **degrade) -> Path:  # noqa: ANN003
    path = tmp_path / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"dir": str(run_dir), "data_dir": str(data_dir)},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "magnitude", "sparsity": 0.5, **degrade},
        "evaluate": {"seq_len": 64, "max_windows": 4, "batch_size": 2,
                     "zeroshot": {"tasks": []}},
    }))
    return path


def _digests(run_dir: Path) -> dict[str, dict[str, str]]:
    return {s: {k: v.sha256 for k, v in store.read_manifest(run_dir / s).outputs.items()}
            for s in STAGES}


def _full_config(run_dir: Path, data_dir: Path) -> RunConfig:
    return tiny_config(run_dir, data_dir, **FULL_SECTIONS)


def _full_config_file(run_dir: Path, data_dir: Path) -> Path:
    """The full pipeline as a YAML file for ``recoup run``. Every run folder is named
    ``run`` (in different parents): the report's title is the folder's name."""
    path = run_dir.parent / "full.yaml"
    path.write_text(yaml.safe_dump(_full_config(run_dir, data_dir).model_dump(mode="json")))
    return path


def _recoup(cfg_file: Path, kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if kill_at is not None:
        env[KILL_AT_ENV] = f"{kill_at}:before-manifest"
    return subprocess.run([*CMD, str(cfg_file)], capture_output=True, text=True, timeout=600,
                          env=env)


#: keys of JSON outputs that hold wall-clock times or say what one session did; they
#: differ between two runs of the same config by nature
_VOLATILE = frozenset({"started", "finished", "elapsed_s", "session_seconds",
                       "session_cpu_seconds", "session_tokens", "tokens_per_s",
                       "resumed_from"})
_TIMING_MD = re.compile(r"## Wall time per stage\n\n(\|.*\n)+")
_TIMING_HTML = re.compile(r'<h2>Wall time per stage</h2><table id="timing">.*?</table>', re.S)


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _stable_json(obj: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in obj.items() if k not in _VOLATILE}, sort_keys=True)


def _tensors_digest(path: Path) -> str:
    """safetensors writes its metadata in the order of a Rust hash map, which changes from
    process to process: compare the tensors and the metadata, not the bytes."""
    with safe_open(str(path), framework="pt") as f:
        parts = [json.dumps(f.metadata(), sort_keys=True)]
        parts += [f"{k}:{_sha(f.get_tensor(k).numpy().tobytes())}" for k in sorted(f.keys())]
    return _sha("\n".join(parts))


def _content_digest(stage: str, rel: str, path: Path) -> str | None:
    """Digest of what must be identical in an output whose bytes legitimately differ between
    two runs of one config; None for every other output (compared byte for byte):

    - collect shard markers and train's ``train_result.json`` / ``log.jsonl``: timestamps,
      durations and what the last session did (``resumed_from``, its tokens);
    - train's ``lcc.safetensors``: the metadata order (see :func:`_tensors_digest`);
    - the report: its "wall time per stage" table (durations, tokens/s, shards reused).
    """
    if (stage == "collect" and rel.startswith("shards/")) or rel == "train_result.json":
        return _sha(_stable_json(json.loads(path.read_text())))
    if stage == "train" and rel == "log.jsonl":
        return _sha("\n".join(_stable_json(json.loads(line))
                              for line in path.read_text().splitlines()))
    if stage == "train" and rel.endswith(".safetensors"):
        return _tensors_digest(path)
    if stage == "report":
        text = path.read_text()
        return _sha(_TIMING_HTML.sub("", text) if rel.endswith(".html")
                    else _TIMING_MD.sub("", text))
    return None


def _comparable(run_dir: Path, stages: tuple[str, ...] = FULL) -> dict[str, dict[str, str]]:
    """Per stage, each output's digest (see :func:`_content_digest`), after checking that the
    files on disk still match the stage's manifest."""
    out: dict[str, dict[str, str]] = {}
    for stage in stages:
        stage_dir = run_dir / stage
        manifest = store.read_manifest(stage_dir)
        store.verify_outputs(stage_dir, manifest, "sha256")
        out[stage] = {rel: _content_digest(stage, rel, stage_dir / rel) or f.sha256
                      for rel, f in manifest.outputs.items()}
    return out


def _verbs(stdout: str) -> dict[str, str]:
    """Stage -> what the run did with it ('reused', 're-run', 'run'), from its plan lines."""
    verbs: dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in FULL and parts[1] in ("reused", "re-run", "run"):
            verbs.setdefault(parts[0], parts[1])
    return verbs


def _assert_clean(run_dir: Path) -> None:
    assert not list(run_dir.glob(f"*{store.TMP_MARK}*")), "staging folders left behind"
    assert not list(run_dir.glob(f"*/{store.RUNNING}")), "running markers left behind"
    assert not (run_dir / ".lock").exists()


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """One uninterrupted run of the full pipeline, through the CLI as the faulted runs."""
    run_dir = tmp_path_factory.mktemp("full-ref") / "run"
    proc = _recoup(_full_config_file(run_dir, data_dir))
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _copy_reference_before(reference: Path, run_dir: Path, stage: str) -> int:
    """Copy the reference's finished stages before ``stage`` (the runner reuses them);
    return ``stage``'s index in the pipeline."""
    index = FULL.index(stage)
    for done in FULL[:index]:
        shutil.copytree(reference / done, run_dir / done)
    return index


@pytest.mark.parametrize("kills", [FULL[:5], FULL[5:]], ids=["prepare-svd", "select-report"])
def test_sigkill_before_each_manifest_in_turn_then_resume_matches_reference(
        tmp_path: Path, data_dir: Path, full_reference: Path, kills: tuple[str, ...]) -> None:
    """The driver is SIGKILLed before the manifest of every stage in turn, one run per stage:
    run i re-runs the stage run i-1 was killed in (reusing everything before it) and dies in
    the next one, so each stage is resumed once after its own kill, in one run of 1-2
    stages. Each resumed stage equals the reference at once; a last run completes the
    pipeline. The pipeline is cut in two halves (the second starts from the reference's
    first half) to keep each test under a minute."""
    run_dir = tmp_path / "run"
    first = _copy_reference_before(full_reference, run_dir, kills[0])
    cfg_file = _full_config_file(run_dir, data_dir)
    ref = _comparable(full_reference)
    for i, stage in enumerate((*kills, None)):
        proc = _recoup(cfg_file, kill_at=stage)
        if stage is not None:
            assert proc.returncode == -signal.SIGKILL, proc.stderr
            assert not (run_dir / stage / store.MANIFEST).exists()
        else:
            assert proc.returncode == 0, proc.stderr
        verbs = _verbs(proc.stdout)
        assert all(verbs[s] == "reused" for s in FULL[:first + max(i - 1, 0)]), verbs
        if i > 0:
            resumed = kills[i - 1]
            assert f"{resumed:<10} re-run   (interrupted: the process running it died)" \
                in proc.stdout
            assert _comparable(run_dir, (resumed,)) == {resumed: ref[resumed]}
    assert _comparable(run_dir) == ref
    _assert_clean(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("stage", FULL)
def test_sigkill_before_manifest_then_resume_matches_reference(
        tmp_path: Path, data_dir: Path, full_reference: Path, stage: str) -> None:
    """Each stage on its own: the reference's finished stages before ``stage`` are copied
    (the runner reuses them), the driver is killed before ``stage``'s manifest, and one
    uninterrupted resume finishes the pipeline with the reference's outputs."""
    run_dir = tmp_path / "run"
    index = _copy_reference_before(full_reference, run_dir, stage)
    cfg_file = _full_config_file(run_dir, data_dir)
    killed = _recoup(cfg_file, kill_at=stage)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert _verbs(killed.stdout) == {**dict.fromkeys(FULL[:index], "reused"), stage: "run"}
    assert not (run_dir / stage / store.MANIFEST).exists()
    resumed = _recoup(cfg_file)
    assert resumed.returncode == 0, resumed.stderr
    assert _verbs(resumed.stdout) == {**dict.fromkeys(FULL[:index], "reused"),
                                      stage: "re-run", **dict.fromkeys(FULL[index + 1:], "run")}
    assert _comparable(run_dir) == _comparable(full_reference)
    _assert_clean(run_dir)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


#: (stage, damaged file, damage, what the runner says about it)
DAMAGE: dict[str, tuple[str, str, Callable[[Path], None], str]] = {
    "svd-weights-flipped": ("svd", "layer=01.safetensors", _flip_byte,
                            "does not match its sha256 in the manifest (corrupted)"),
    "exported-model-truncated": ("export", "model/model.safetensors", _truncate,
                                 "bytes, the manifest says"),
    "collect-manifest-truncated": ("collect", store.MANIFEST, _truncate, "is unreadable"),
    "train-manifest-truncated": ("train", store.MANIFEST, _truncate, "is unreadable"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damage_after_the_manifest_is_reported_and_recomputed(
        tmp_path: Path, data_dir: Path, full_reference: Path, case: str) -> None:
    """A finished run is damaged: the stage is re-run with the damaged file's path in its
    plan line and as a warning in ``logs/run.log``, the stages after it follow, and the run
    ends with the reference's outputs. A truncated manifest of a resumable stage keeps its
    work: collect reuses both shards (their checksums still match), train resumes from its
    last checkpoint without training a step."""
    stage, rel, damage, says = DAMAGE[case]
    run_dir = tmp_path / "run"
    shutil.copytree(full_reference, run_dir)
    damaged = run_dir / stage / rel
    damage(damaged)
    lines: list[str] = []
    out = run_pipeline(_full_config(run_dir, data_dir), progress=False, echo=lines.append)
    index = FULL.index(stage)
    assert out.reused == list(FULL[:index]) and out.ran == list(FULL[index:])
    plan_line = next(line for line in lines if line.startswith(f"{stage:<10} re-run"))
    assert str(damaged) in plan_line and says in plan_line
    warning = f"WARNING recoup.runner: {stage}: recomputing: {damaged}"
    assert warning in (run_dir / "logs" / "run.log").read_text()
    if stage == "collect":
        assert (out.metrics["collect"]["shards_computed"],
                out.metrics["collect"]["shards_reused"]) == (0, 2)
    if stage == "train":
        assert out.metrics["train"]["resumed_from"] == 4
        assert out.metrics["train"]["session_tokens"] == 0
    assert _comparable(run_dir) == _comparable(full_reference)

def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_write_failure_keeps_the_previous_complete_state(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, data_dir)
    run_pipeline(cfg, progress=False, echo=lambda s: None)
    before = _digests(run_dir)

    changed = _config_file(tmp_path, run_dir, data_dir, sparsity=0.7)
    proc = subprocess.run([*CMD, str(changed)], capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: _limit_file_size(64 * 1024))
    assert proc.returncode == 1
    assert "stage 'degrade' failed" in proc.stderr and "File too large" in proc.stderr
    # the old degrade outputs are intact and still verify; nothing half-written is left
    assert _digests(run_dir) == before
    for s in STAGES:
        store.verify_outputs(run_dir / s, store.read_manifest(run_dir / s), "sha256")
    assert not list(run_dir.glob(f"*{store.TMP_MARK}*"))
    assert (run_dir / "degrade" / store.FAILED).exists()

    retry = subprocess.run([*CMD, str(changed)], capture_output=True, text=True, timeout=600)
    assert retry.returncode == 0, retry.stderr
    assert store.read_manifest(run_dir / "degrade").metrics["linear_sparsity"] == \
        pytest.approx(0.7, abs=1e-3)


def test_second_run_on_a_held_directory_is_refused(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    with RunLock(run_dir):
        proc = subprocess.run([*CMD, str(_config_file(tmp_path, run_dir, data_dir))],
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"is in use by pid {os.getpid()}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_truncated_manifest_is_treated_as_absent(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir)
    run_pipeline(cfg, progress=False, echo=lambda s: None)
    manifest = tmp_path / "run" / "degrade" / store.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:100])
    plans = {p.name: p for p in plan_run(cfg)}
    assert plans["degrade"].state == "stale"
    reason = plans["degrade"].reasons[0]
    assert "unreadable" in reason and str(manifest) in reason
    # downstream names the stage it waits for, not every stage it reads (prepare is done)
    assert plans["prepare"].state == "done"
    assert plans["evaluate"].reasons == ("upstream stage 'degrade' is re-run",)
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    assert out.ran == ["degrade", "evaluate"]


def test_run_directory_that_cannot_be_created(tmp_path: Path, data_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([*CMD, str(_config_file(tmp_path, blocker / "run", data_dir))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"Not a directory: {blocker / 'run'}" in proc.stderr

"""Faults a long run meets on a shared cluster, injected for real: SIGKILL of the driver at
the worst moment of each stage, a write failure (file-size limit standing in for a full
disk), a second run on a held directory, a truncated manifest, an unusable run directory."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recoup.orchestrator import store
from recoup.orchestrator.lock import RunLock
from recoup.orchestrator.runner import KILL_AT_ENV, plan_run, run_pipeline
from tests.conftest import tiny_config

STAGES = ("prepare", "degrade", "evaluate")
CMD = [sys.executable, "-m", "recoup", "run", "--no-progress"]


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    tmp = tmp_path_factory.mktemp("ref")
    run = subprocess.run([*CMD, str(_config_file(tmp, tmp / "ref", data_dir))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    return tmp / "ref"


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_before_manifest_then_resume_matches_reference(
        tmp_path: Path, data_dir: Path, reference: Path, stage: str) -> None:
    run_dir = tmp_path / "killed"
    cfg_file = _config_file(tmp_path, run_dir, data_dir)
    killed = subprocess.run([*CMD, str(cfg_file)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, KILL_AT_ENV: f"{stage}:before-manifest"})
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / stage / store.MANIFEST).exists()
    resumed = subprocess.run([*CMD, str(cfg_file)], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for done in STAGES[:STAGES.index(stage)]:
        assert f"{done:<10} reused" in resumed.stdout
    assert _digests(run_dir) == _digests(reference)
    assert not list(run_dir.glob(f"*{store.TMP_MARK}*")), "staging folders left behind"


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
    out = run_pipeline(cfg, progress=False, echo=lambda s: None)
    assert out.ran == ["degrade", "evaluate"]


def test_run_directory_that_cannot_be_created(tmp_path: Path, data_dir: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = subprocess.run([*CMD, str(_config_file(tmp_path, blocker / "run", data_dir))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"Not a directory: {blocker / 'run'}" in proc.stderr

"""The spine end to end on the tiny random Llama: run, reuse, re-run on change, status,
corruption, failure, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from recoup.orchestrator import store
from recoup.orchestrator.runner import plan_run, run_pipeline, status_rows
from tests.conftest import tiny_config

STAGES = ["prepare", "degrade", "evaluate"]


def _run(cfg, lines: list[str] | None = None):  # noqa: ANN001, ANN202
    sink = lines if lines is not None else []
    return run_pipeline(cfg, progress=False, echo=sink.append)


def _output_digests(run_dir: Path) -> dict[str, dict[str, str]]:
    out = {}
    for stage in STAGES:
        m = store.read_manifest(run_dir / stage)
        out[stage] = {k: v.sha256 for k, v in m.outputs.items()}
    return out


def test_run_reuse_and_rerun_only_what_changed(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir)
    first = _run(cfg)
    assert first.ran == STAGES
    res = first.metrics["evaluate"]["models"]
    assert res["dense"]["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    assert res["degraded"]["kl_to_dense"] > 0
    assert first.metrics["degrade"]["linear_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for stage in STAGES:
        store.verify_outputs(tmp_path / "run" / stage,
                             store.read_manifest(tmp_path / "run" / stage), "sha256")

    lines: list[str] = []
    again = _run(cfg, lines)
    assert again.ran == [] and again.reused == STAGES
    assert all("reused" in line for line in lines[:3])
    assert again.metrics == first.metrics

    changed = tiny_config(tmp_path / "run", data_dir, degrade={"sparsity": 0.6})
    lines = []
    third = _run(changed, lines)
    assert third.reused == ["prepare"] and third.ran == ["degrade", "evaluate"]
    text = "\n".join(lines)
    assert "degrade.sparsity: 0.5 -> 0.6" in text
    assert "upstream stage 'degrade' changed" in text
    assert third.metrics["degrade"]["linear_sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_status_reports_done_stale_and_pending(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir, run={"pipeline": ["prepare", "degrade"]})
    _run(cfg)
    full = tiny_config(tmp_path / "run", data_dir, degrade={"sparsity": 0.7})
    rows = {r[0]: r for r in status_rows(full)}
    assert rows["prepare"][1] == "done" and "llama 2 layers" in rows["prepare"][4]
    assert rows["degrade"][1] == "stale" and "0.5 -> 0.7" in rows["degrade"][4]
    assert rows["evaluate"][1] == "pending"


def test_corrupted_output_is_detected_and_recomputed(tmp_path: Path, data_dir: Path) -> None:
    cfg = tiny_config(tmp_path / "run", data_dir)
    _run(cfg)
    weights = tmp_path / "run" / "degrade" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    plans = {p.name: p for p in plan_run(cfg)}
    assert plans["degrade"].state == "stale"
    assert "model.safetensors does not match its sha256" in plans["degrade"].reasons[0]
    assert plans["evaluate"].state == "stale"
    out = _run(cfg)
    assert out.ran == ["degrade", "evaluate"]
    store.verify_outputs(weights.parent.parent, store.read_manifest(weights.parent.parent),
                         "sha256")


def test_failed_stage_is_recorded_and_cli_exits_nonzero(tmp_path: Path, data_dir: Path) -> None:
    run_dir = tmp_path / "run"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "run": {"dir": str(run_dir), "data_dir": str(data_dir)},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "given", "given_path": str(tmp_path / "missing")},
    }))
    proc = subprocess.run([sys.executable, "-m", "recoup", "run", str(cfg_file), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "stage 'degrade' failed" in proc.stderr
    assert "not a Hugging Face model folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    failed = json.loads((run_dir / "degrade" / store.FAILED).read_text())
    assert "given_path" in failed["error"]
    status = subprocess.run([sys.executable, "-m", "recoup", "status", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[2:]}
    assert lines["prepare"].split()[1] == "done"
    assert lines["degrade"].split()[1] == "failed"
    assert lines["evaluate"].split()[1] == "pending"


def _write_slow_config(path: Path, run_dir: Path, data_dir: Path) -> None:
    # Enough evaluation windows that the evaluate stage runs for a few seconds.
    path.write_text(yaml.safe_dump({
        "run": {"dir": str(run_dir), "data_dir": str(data_dir)},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
        "degrade": {"method": "magnitude", "sparsity": 0.5},
        "evaluate": {"seq_len": 256, "max_windows": 160, "batch_size": 4,
                     "zeroshot": {"tasks": []}},
    }))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before {path} appeared")
        if time.monotonic() > deadline:
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


def test_sigkill_mid_stage_then_resume_gives_the_same_outputs(tmp_path: Path,
                                                              data_dir: Path) -> None:
    cmd = [sys.executable, "-m", "recoup", "run", "--no-progress"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    _write_slow_config(tmp_path / "ref.yaml", ref_dir, data_dir)
    _write_slow_config(tmp_path / "killed.yaml", run_dir, data_dir)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen([*cmd, str(tmp_path / "killed.yaml")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(run_dir / "evaluate" / store.RUNNING, proc, timeout=240)
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "evaluate" / store.MANIFEST).exists()
    plans = {p.name: p.state for p in plan_run(tiny_config(run_dir, data_dir))}
    assert plans["degrade"] == "done"

    status = subprocess.run([sys.executable, "-m", "recoup", "status", str(run_dir)],
                            capture_output=True, text=True, timeout=120)
    assert "interrupted" in status.stdout

    resumed = subprocess.run([*cmd, str(tmp_path / "killed.yaml")], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "prepare    reused" in resumed.stdout and "degrade    reused" in resumed.stdout
    ref = subprocess.run([*cmd, str(tmp_path / "ref.yaml")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    assert _output_digests(run_dir) == _output_digests(ref_dir)
    assert not (run_dir / ".lock").exists()

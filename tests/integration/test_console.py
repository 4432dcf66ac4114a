"""One readable console: `recoup run` of the tiny pipeline on a local Ray prints a line per
stage state and the final table, not the workers' output (which lands in RUN/logs/)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

#: Stage lines (10 for five stage states x 2), the table (about 20), a few blank/notice lines
MAX_LINES = 40
WORKER_NOISE = (
    re.compile(r"\(recoup:[\w-]+ pid=\d+"),  # Ray's prefix on forwarded worker output
    re.compile(r"pid=\d+\)"),
    re.compile(r"Loading weights"),
    re.compile(r"Running loglikelihood requests"),
    re.compile(r"Tokenizing inputs"),
    re.compile(r"Writing model shards"),
    re.compile(r"Setting accelerator to CPU"),
    re.compile(r"Ray Train"),
)


@pytest.mark.slow
def test_tiny_pipeline_console_is_one_line_per_stage_state(tmp_path: Path,
                                                           data_dir: Path) -> None:
    cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    cfg["cluster"] = {"mode": "ray", "num_cpus": 2, "stage_cpus": 1}
    cfg["run"]["data_dir"] = str(data_dir)
    cfg["evaluate"]["zeroshot"] = {"limit": 2, "shards": 2,
                                   "tasks": [{"name": "arc_easy", "format": "arc",
                                              "path": "arc/ARC-Easy-Test.jsonl"}]}
    config = tmp_path / "tiny-ray.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "recoup", "run", str(config), "--run-dir", str(run_dir)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console
    lines = console.split("\n")
    noisy = [line for line in lines for p in WORKER_NOISE if p.search(line)]
    assert not noisy, "\n".join(noisy)
    assert len(lines) <= MAX_LINES, console
    for stage in ("prepare", "degrade", "evaluate", "report"):
        assert any(re.match(rf"{stage}\s+done", line) for line in lines), console
    # the workers' output is in the stage's log instead
    evaluate_log = (run_dir / "logs" / "evaluate.log").read_text()
    assert "Loading weights" in evaluate_log or "loglikelihood" in evaluate_log.lower() \
        or "zero-shot" in evaluate_log
    assert "Loading weights" in (run_dir / "logs" / "degrade.log").read_text()

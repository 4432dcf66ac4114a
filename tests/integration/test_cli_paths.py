"""`recoup run` from any working directory, with a relative run.dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def test_relative_run_dir_is_made_absolute(tmp_path: Path, data_dir: Path) -> None:
    """Ray workers and Ray Train's storage path (a URI) must not depend on the working
    directory, so `recoup run` resolves a relative run.dir against it once, at the start."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({
        "run": {"dir": "runs/rel", "data_dir": str(data_dir), "pipeline": ["prepare"]},
        "cluster": {"mode": "inprocess"},
        "prepare": {"source": "tiny-llama"},
    }))
    proc = subprocess.run([sys.executable, "-m", "recoup", "run", "c.yaml", "--no-progress"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "rel"
    assert f"run directory: {run_dir}" in proc.stdout
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert stored["run"]["dir"] == str(run_dir)
    assert (run_dir / "prepare" / "manifest.json").is_file()

"""ray_cluster.yaml passes Ray's own validation; a job's staged working dir imports recoup."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recoup.cluster import jobs
from recoup.orchestrator.plan import nodes_from_cluster_yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_validation(cluster_yaml: dict) -> None:
    """What `ray up` does before it calls the cloud: fill in the provider's defaults, then
    validate against Ray's ray-schema.json and its cross-field checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_yaml))
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] == "head"
    assert types["gpu8"]["resources"]["GPU"] == 8
    assert any("pip install" in c and "recoup" in c for c in prepared["worker_setup_commands"])
    assert "~/recoup" in prepared["file_mounts"]


def test_validation_rejects_a_misspelt_key(cluster_yaml: dict) -> None:
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(cluster_yaml)
    bad["available_node_types"]["gpu8"]["min_worker"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(bad))


def test_nodes_of_the_cluster_yaml(cluster_yaml: dict) -> None:
    nodes = nodes_from_cluster_yaml(cluster_yaml)
    assert sum(n.get("GPU", 0) for n in nodes) == 4 * 8  # 4 GPU nodes at most
    assert len(nodes) == 1 + 4 + 2


def test_staged_working_dir_imports_its_own_copy(tmp_path: Path) -> None:
    """The job's working dir has the installed package layout: with it first on the path
    (as Ray puts it), `recoup.orchestrator` etc. come from the staged copy."""
    cfg = REPO / "configs" / "tiny.yaml"
    wd = jobs.stage_working_dir(tmp_path / "wd", cfg)
    assert (wd / jobs.STAGED_CONFIG).read_text() == cfg.read_text()
    assert not list(wd.rglob("__pycache__"))
    # light modules of each part (the stages import torch: seconds per interpreter)
    code = ("import recoup.orchestrator.store as o, recoup.cluster.placement as c, "
            "recoup.stages.text.datasources as s; print(o.__file__); print(c.__file__); "
            "print(s.__file__)")
    env = {**os.environ, "PYTHONPATH": str(wd)}
    out = subprocess.run([sys.executable, "-c", code], cwd=wd, env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert all(Path(f).is_relative_to(wd) for f in out), out


def test_entrypoint_and_submission_id() -> None:
    assert jobs.entrypoint(["degrade.sparsity=0.6", "run.dir=/shared/r x"]) == (
        "python -m recoup run run_config.yaml degrade.sparsity=0.6 'run.dir=/shared/r x' "
        "--no-progress")
    sid = jobs.default_submission_id("/shared/runs/llama 13b/")
    assert sid.startswith("recoup-llama-13b-") and " " not in sid


def test_submit_refuses_relative_run_dir_before_contacting_anyone(
        capsys: pytest.CaptureFixture[str]) -> None:
    from recoup.orchestrator.cli import main

    rc = main(["submit", str(REPO / "configs/tiny.yaml"), "--address", "http://127.0.0.1:9"])
    assert rc == 2
    assert "run.dir runs/tiny is relative" in capsys.readouterr().err
    rc = main(["submit", str(REPO / "configs/tiny.yaml"), "--run-dir", "/tmp/x"])
    assert rc == 2 or os.environ.get("RAY_API_SERVER_ADDRESS")
    assert "no cluster address" in capsys.readouterr().err

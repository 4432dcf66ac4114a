"""Placement of worker groups on nodes, and per-stage resources, on plain dicts."""

from __future__ import annotations

import pytest

from recoup.cluster.config import ClusterConfig
from recoup.cluster.placement import fits, placement_problem, worker_group

NODE8 = {"CPU": 96.0, "GPU": 8.0}


def test_training_group_fits_nodes_exactly() -> None:
    nodes = [NODE8, NODE8]
    assert fits(nodes, worker_group(16, gpus=1, cpus=8))
    problem = placement_problem(nodes, worker_group(17, gpus=1, cpus=8))
    assert problem is not None and "17 GPU (the cluster has 16)" in problem


def test_multi_gpu_workers_must_each_fit_on_one_node() -> None:
    assert fits([NODE8], worker_group(2, gpus=4, cpus=8))
    # 12 GPUs in total, but the 2-GPU nodes cannot hold a 4-GPU worker
    nodes = [NODE8, {"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 2}]
    problem = placement_problem(nodes, worker_group(3, gpus=4, cpus=1))
    assert problem is not None and "not node by node" in problem
    problem = placement_problem([NODE8, NODE8], worker_group(1, gpus=16, cpus=1))
    assert problem is not None and "no node can hold one bundle" in problem


def test_cpus_count_too() -> None:
    assert not fits([{"CPU": 4, "GPU": 8}], worker_group(8, gpus=1, cpus=1))
    assert fits([{"CPU": 8, "GPU": 8}], worker_group(8, gpus=1, cpus=1))


def test_strict_strategies() -> None:
    group = worker_group(2, gpus=4, cpus=1)
    assert fits([NODE8], group, "STRICT_PACK")
    assert not fits([{"GPU": 4, "CPU": 4}] * 2, group, "STRICT_PACK")
    assert not fits([NODE8], group, "STRICT_SPREAD")
    assert fits([{"GPU": 4, "CPU": 4}] * 2, group, "STRICT_SPREAD")


def test_empty_and_zero_bundles_always_fit() -> None:
    assert fits([], [])
    assert fits([{"CPU": 1}], [{"GPU": 0.0, "CPU": 0.0}])
    assert fits([{"CPU": 2}], worker_group(2, gpus=0, cpus=1))


def test_stage_resources_fall_back_to_the_cluster_defaults() -> None:
    import recoup.orchestrator.runconfig  # noqa: F401 - registers the stages

    c = ClusterConfig(stage_cpus=4, stage_gpus=1, stages={"prepare": {"gpus": 0},
                                                          "export": {"cpus": 16}})
    assert c.resources_for("prepare") == (4, 0)
    assert c.resources_for("export") == (16, 1)
    assert c.resources_for("degrade") == (4, 1)
    with pytest.raises(ValueError, match="unknown stage 'evalute'"):
        ClusterConfig(stages={"evalute": {"gpus": 1}})

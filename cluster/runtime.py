"""The Ray runtime: start or join a cluster and run stage functions as Ray tasks.

Only this package (and the runner, through it) imports Ray. The embedded local Ray binds
to 127.0.0.1 and starts no dashboard unless asked, so a laptop run exposes nothing.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from recoup.cluster.config import ClusterConfig
from recoup.cluster.placement import DEFAULT_STRATEGY, Strategy, placement_problem
from recoup.orchestrator.stage import Metrics, Resources, StageContext, StageSpec, run_stage_fn

log = logging.getLogger("recoup.cluster")
_WORKER_TQDM_INTERVAL_S = 10


def start_ray(cfg: ClusterConfig) -> bool:
    """Connect to ``cfg.address`` or start a local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    # Stage tasks print progress bars; keep Ray's own banner and usage prompts quiet.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address:
        log.info("connecting to the Ray cluster at %s", cfg.address)
        ray.init(address=cfg.address, log_to_driver=True)
    else:
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray on 127.0.0.1 with %d CPUs", num_cpus)
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=cfg.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
    return True


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_placement(bundles: list[dict[str, float]], what: str,
                    strategy: Strategy = DEFAULT_STRATEGY) -> str | None:
    """Warn (and return the sentence) when ``bundles`` cannot be placed on the nodes alive
    now. Not an error: an autoscaling cluster adds nodes on demand; without one, Ray would
    wait forever, and this line in the log says why."""
    problem = placement_problem(cluster_nodes(), bundles, strategy)
    if problem is not None:
        log.warning("%s does not fit the nodes alive now: %s. It waits until the autoscaler "
                    "adds nodes, or forever on a fixed cluster.", what, problem)
    return problem


def _run_stage(spec: StageSpec, ctx: StageContext) -> Metrics:
    # Runs on a Ray worker: torch's thread pool follows the CPUs Ray granted the task.
    return run_stage_fn(spec, ctx)


class RayExecutor:
    """Runs each stage as one Ray task with the resources the runner asks for."""

    def __init__(self, cfg: ClusterConfig):
        self._started = start_ray(cfg)
        total = ray.cluster_resources().get("CPU", 1.0)
        self._cpu_cap = float(total)

    def execute(self, spec: StageSpec, ctx: StageContext, resources: Resources) -> Metrics:
        num_cpus = min(resources.num_cpus, self._cpu_cap)
        check_placement([{"CPU": num_cpus, "GPU": resources.num_gpus}], f"stage {spec.name!r}")
        task: Any = ray.remote(_run_stage).options(
            num_cpus=num_cpus, num_gpus=resources.num_gpus, max_retries=0,
            name=f"recoup:{spec.name}",
            # Ray forwards worker output line by line: redraw progress bars rarely.
            runtime_env={"env_vars": {"TQDM_MININTERVAL": str(_WORKER_TQDM_INTERVAL_S)}},
        )
        try:
            return ray.get(task.remote(spec, ctx))
        except ray.exceptions.RayTaskError as e:
            # Surface the stage's own exception (one sentence), not Ray's wrapper.
            raise (e.cause if e.cause is not None else e) from None

    def close(self) -> None:
        if self._started:
            ray.shutdown()

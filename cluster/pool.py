"""A pool of long-lived workers that process shards: Ray actors, or one in-process worker.

Collecting activations wants a model loaded once per worker, not once per task, so the
unit of parallelism is an *actor*: :func:`run_shards` builds ``worker_factory(*worker_args)``
inside each actor (that is where the models load) and then feeds the actors shard ids,
always topping each one up to :data:`IN_FLIGHT_PER_WORKER` queued shards so it never idles
while the driver hands out the next one. Results come back as ``{shard: result}``.

Failures:

- a worker *process* that dies (killed, out of memory, node lost) is restarted by Ray
  (``max_restarts``): the factory runs again in the new process and the shards it held are
  retried (``max_task_retries``). A shard must therefore be idempotent: write through
  temporary names and mark completion last (see :mod:`recoup.stages.lcc.activations`);
- an exception raised by the worker's own code is a bug or bad input, not retried: the
  first one is raised here with the worker's message, and the remaining shards are cancelled.

``cluster.mode == "inprocess"`` runs the same worker class serially in this process, no Ray.
Inside a stage that the runner runs as a Ray task, Ray is initialised and the actors join
that cluster (a task blocked in ``ray.wait`` hands its CPUs back to them); called outside
any cluster (a benchmark, a script), a local Ray is started from the cluster config and shut
down again afterwards. Ray is imported lazily, and only in ``recoup.cluster``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from pydantic import Field

from recoup.cluster.config import ClusterConfig
from recoup.cluster.progress import Channel, attached, current
from recoup.cluster.progress import bar as progress_bar
from recoup.orchestrator.config import StrictModel

log = logging.getLogger("recoup.cluster")

IN_FLIGHT_PER_WORKER = 2
"""Shards queued per actor: one running, one waiting, so an actor never waits for the driver."""

DEFAULT_MAX_RETRIES = 2
"""Restarts of a dead worker process, and retries of each shard it held."""


class PoolConfig(StrictModel):
    """How a stage's worker pool is sized and retried; configs of stages that run one
    extend this, so every pool reads the same four keys."""

    workers: int = Field(1, ge=1, description="Pool workers; each loads its model(s) once.")
    num_gpus_per_worker: float = Field(
        0.0, ge=0, description="GPUs per worker (Ray); above 1 the models span several GPUs.")
    num_cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs per worker (Ray); unset: the cluster's CPUs / workers.")
    max_retries: int = Field(
        DEFAULT_MAX_RETRIES, ge=0,
        description="Restarts of a dead worker process, and retries of its shards.")

    def gpus_on(self, cluster: ClusterConfig) -> float:
        """GPUs a worker is granted: none in-process, where ``run.device`` decides."""
        return self.num_gpus_per_worker if cluster.mode == "ray" else 0.0


def worker_device(num_gpus: float, device: str) -> str:
    """The torch device of a pool worker: "cuda" when it was granted GPUs, else ``device``."""
    return "cuda" if num_gpus > 0 else device


class ShardWorker(Protocol):
    """What a pool worker does: process one shard (idempotently) and report on it."""

    def run_shard(self, shard: int) -> Any: ...


def worker_threads(num_cpus: float) -> int:
    """Torch threads of a worker: the CPUs it was granted, rounded up, at least 1."""
    return max(1, math.ceil(num_cpus))


class _ActorHost:
    """The body of a pool actor: builds the worker once, then runs shards on it, as a
    worker of the calling stage (``channel``: output into its log, progress to the driver;
    None in-process)."""

    def __init__(self, worker_factory: Callable[..., ShardWorker], worker_args: tuple[Any, ...],
                 threads: int | None, channel: Channel | None = None) -> None:
        self.channel = channel
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        with attached(channel):
            self.worker = worker_factory(*worker_args)

    def run_shard(self, shard: int) -> Any:
        with attached(self.channel):
            return self.worker.run_shard(shard)


def _in_process(worker_factory: Callable[..., ShardWorker], worker_args: tuple[Any, ...],
                shard_ids: Sequence[int], threads: int | None, bar: Any) -> dict[int, Any]:
    import torch

    before = torch.get_num_threads()
    try:
        host = _ActorHost(worker_factory, worker_args, threads)
        results: dict[int, Any] = {}
        for shard in shard_ids:
            results[shard] = host.run_shard(shard)
            bar.update(1)
        return results
    finally:
        torch.set_num_threads(before)


def _on_ray(worker_factory: Callable[..., ShardWorker], worker_args: tuple[Any, ...],
            shard_ids: Sequence[int], cluster_cfg: ClusterConfig, num_workers: int,
            num_cpus: float | None, num_gpus: float, max_retries: int, name: str,
            bar: Any) -> dict[int, Any]:
    import ray

    from recoup.cluster.runtime import start_ray

    started = start_ray(cluster_cfg)
    actors: list[Any] = []
    try:
        if num_cpus is None:
            total = float(ray.cluster_resources().get("CPU", 1.0))
            num_cpus = max(1.0, math.floor(total / num_workers))
        actor_cls: Any = ray.remote(_ActorHost).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_retries,
            max_task_retries=max_retries,
        )
        threads = worker_threads(num_cpus)
        channel = current()
        actors = [actor_cls.remote(worker_factory, worker_args, threads, channel)
                  for _ in range(num_workers)]
        log.info("%s: %d workers x (%g CPUs, %g GPUs) for %d shards", name, num_workers,
                 num_cpus, num_gpus, len(shard_ids))
        queue = list(reversed(shard_ids))  # pop() hands out the first shard first
        pending: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor index)
        load = [0] * num_workers
        results: dict[int, Any] = {}

        def top_up() -> None:
            for a in range(num_workers):
                while queue and load[a] < IN_FLIGHT_PER_WORKER:
                    shard = queue.pop()
                    pending[actors[a].run_shard.remote(shard)] = (shard, a)
                    load[a] += 1

        top_up()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                shard, a = pending.pop(ref)
                load[a] -= 1
                try:
                    results[shard] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    # The worker's own exception, one sentence, not Ray's wrapper.
                    raise (e.cause if e.cause is not None else e) from None
                except ray.exceptions.RayActorError as e:
                    raise RuntimeError(
                        f"{name}: shard {shard} was lost: its worker process died "
                        f"{max_retries + 1} times ({e.__class__.__name__})"
                    ) from e
                bar.update(1)
            top_up()
        return results
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()


def run_shards(
    worker_factory: Callable[..., ShardWorker],
    worker_args: tuple[Any, ...],
    shard_ids: Sequence[int],
    cluster_cfg: ClusterConfig,
    pool: PoolConfig,
    *,
    desc: str = "shards",
    progress: bool = True,
) -> dict[int, Any]:
    """``{shard: worker.run_shard(shard)}`` for every shard, over a pool of workers.

    ``worker_factory`` (a class or module-level function) and ``worker_args`` must be
    picklable: a Ray worker gets everything through them, never through globals. At most
    ``len(shard_ids)`` workers start. ``pool.num_cpus_per_worker`` unset: the cluster's
    CPUs split evenly between the workers (in-process: torch's thread count is left alone).
    ``pool.num_gpus_per_worker`` above 1 gives one worker several GPUs, for a model that
    does not fit on one; it is ignored in-process.
    """
    if len(set(shard_ids)) != len(shard_ids):
        raise ValueError("shard ids must be unique")
    bar = progress_bar(total=len(shard_ids), desc=desc, unit="shard", disable=not progress)
    try:
        if not shard_ids:
            return {}
        if cluster_cfg.mode == "ray":
            return _on_ray(worker_factory, tuple(worker_args), shard_ids, cluster_cfg,
                           min(pool.workers, len(shard_ids)), pool.num_cpus_per_worker,
                           pool.num_gpus_per_worker, pool.max_retries, f"recoup:{desc}", bar)
        threads = None if pool.num_cpus_per_worker is None else \
            worker_threads(pool.num_cpus_per_worker)
        return _in_process(worker_factory, tuple(worker_args), shard_ids, threads, bar)
    finally:
        bar.close()

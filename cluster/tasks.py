"""Fan a per-layer function out as one Ray task per item, or run it serially in-process.

The svd and select stages do the same small job for every decoder layer, each reading only
its own layer's activations. :func:`map_layers` runs ``fn(*args)`` for every entry of
``args_per_layer`` and returns the results in input order, whatever order they finish in.

- ``cluster.mode == "ray"``: one Ray task per item, ``num_cpus_per_task`` CPUs each, at most
  ``max_parallel`` in flight. Inside a stage that the runner already runs as a Ray task,
  Ray is initialised in this process and the tasks go to the same cluster; a Ray task
  blocked in ``ray.get`` hands its CPUs back, so the layer tasks can use them. Called
  outside any cluster (a direct call, a benchmark), a local Ray is started from the
  cluster config and shut down again afterwards.
- ``cluster.mode == "inprocess"``, or Ray not installed: the same function, serially.

Either way each call runs with ``torch`` limited to ``ceil(num_cpus_per_task)`` threads, so
a layer's arithmetic (and its rounding, e.g. in LAPACK's SVD) is the same in both modes:
results do not depend on how many workers ran them.

Ray is imported lazily, and only here (and in :mod:`recoup.cluster.runtime`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from recoup.cluster.config import ClusterConfig
from recoup.cluster.progress import Channel, attached, current
from recoup.cluster.progress import bar as progress_bar

log = logging.getLogger("recoup.cluster")

T = TypeVar("T")


def task_threads(num_cpus_per_task: float) -> int:
    """Torch threads of one task: the CPUs it was granted, rounded up, at least 1."""
    return max(1, math.ceil(num_cpus_per_task))


def _call_with_threads(fn: Callable[..., T], args: tuple[Any, ...], threads: int) -> T:
    """Run ``fn(*args)`` with torch limited to ``threads`` threads, then restore the count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(before)


def _call_attached(fn: Callable[..., T], args: tuple[Any, ...], threads: int,
                   channel: Channel | None) -> T:
    """A Ray task's body: :func:`_call_with_threads` as a worker of the calling stage (its
    output into the stage's log, its progress to the driver)."""
    import ray

    with attached(channel):
        gpus = ray.get_gpu_ids()
        if gpus:  # where a task's device work ran, in the stage's log
            inner = args[0] if fn is _call else fn  # run_task's fn, maybe a partial
            name = getattr(getattr(inner, "func", inner), "__name__", "task")
            log.info("%s: on GPU %s of %s", name, ",".join(map(str, gpus)),
                     ray.get_runtime_context().get_node_id()[:8])
        return _call_with_threads(fn, args, threads)


def gpu_task(remote: Callable[..., Any], fn: Callable[..., Any], num_gpus: float) -> Any:
    """``ray.remote(fn)``, in a worker process of its own when it holds GPUs: Ray reuses a
    task's worker for the next task, and a worker that touched CUDA keeps the context and
    the devices it saw first, whatever GPUs Ray assigns the next task (Ray itself makes
    only functions declared with ``num_gpus`` single-use, not those given it through
    ``.options``)."""
    return remote(max_calls=1)(fn) if num_gpus else remote(fn)


def _serial(fn: Callable[..., T], items: Sequence[tuple[Any, ...]], threads: int,
            bar: Any) -> list[T]:
    out: list[T] = []
    for args in items:
        out.append(_call_with_threads(fn, args, threads))
        bar.update(1)
    return out


def _ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def ray_session(cluster_cfg: ClusterConfig) -> Iterator[None]:
    """Ray for the duration of the block: joins a running Ray (this process already
    initialised it, e.g. inside a stage task), else starts one from ``cluster_cfg`` and
    shuts it down on exit."""
    import ray

    from recoup.cluster.runtime import start_ray

    started = start_ray(cluster_cfg)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _on_ray(fn: Callable[..., T], items: Sequence[tuple[Any, ...]], cluster_cfg: ClusterConfig,
            num_cpus: float, num_gpus: float, threads: int, max_parallel: int | None,
            name: str, bar: Any) -> list[T]:
    import ray

    from recoup.cluster.runtime import check_placement

    with ray_session(cluster_cfg):
        # as the stage tasks are: no more CPUs than the cluster has (a task no node can
        # hold waits forever), and a warning where GPUs do not fit the nodes alive now
        num_cpus = min(num_cpus, ray.cluster_resources().get("CPU", num_cpus))
        check_placement([{"CPU": num_cpus, "GPU": num_gpus}], f"a {name!r} task")
        remote: Any = gpu_task(ray.remote, _call_attached, num_gpus).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0, name=name
        )
        limit = len(items) if max_parallel is None else max_parallel
        results: dict[int, T] = {}
        pending: dict[Any, int] = {}
        queue = list(enumerate(items))
        queue.reverse()  # pop() from the end submits item 0 first
        channel = current()
        while queue or pending:
            while queue and len(pending) < limit:
                index, args = queue.pop()
                pending[remote.remote(fn, args, threads, channel)] = index
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                try:
                    results[index] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    for other in pending:
                        ray.cancel(other)
                    # Surface the task's own exception (one sentence), not Ray's wrapper.
                    raise (e.cause if e.cause is not None else e) from None
                bar.update(1)
        return [results[i] for i in range(len(items))]


def device_task_resources(cluster_cfg: ClusterConfig, stage: str,
                          device: str) -> tuple[float, float]:
    """(CPUs, GPUs) of each device task of ``stage`` (train's closed-form fit, evaluate's
    model tasks): the stage's configured resources (``cluster.stages.<stage>``, else
    ``stage_cpus`` / ``stage_gpus``). Warns when a GPU run on Ray gives them no GPU: such a
    task sees every GPU of its node, and none on a CPU node."""
    cpus, gpus = cluster_cfg.resources_for(stage)
    if cluster_cfg.mode == "ray" and not gpus and device.startswith("cuda"):
        log.warning("run.device is %s but %s's device tasks ask Ray for no GPU: set "
                    "cluster.stage_gpus (or cluster.stages.%s.gpus)", device, stage, stage)
    return cpus, gpus


def run_task(fn: Callable[[], T], cluster_cfg: ClusterConfig, *, num_cpus: float,
             num_gpus: float, desc: str) -> T:
    """``fn()`` as one Ray task asking for ``num_gpus`` GPUs, or a plain call in-process
    (``cluster.mode: inprocess``: this process's threads and devices, as before Ray).

    For the device work of a stage whose own task holds no GPU (``holds_gpus=False``): the
    work then runs where its GPUs are, and leaves no CUDA context in the stage's task.
    ``fn`` must pickle (a module-level function, or a ``functools.partial`` of one) and
    return CPU tensors: its result may travel to a host without a GPU."""
    if cluster_cfg.mode == "inprocess":
        return fn()
    return map_layers(_call, [(fn,)], cluster_cfg, num_cpus_per_task=num_cpus,
                      num_gpus_per_task=num_gpus, desc=desc, progress=False)[0]


def _call(fn: Callable[[], T]) -> T:
    return fn()


def map_layers(
    fn: Callable[..., T],
    args_per_layer: Sequence[tuple[Any, ...]],
    cluster_cfg: ClusterConfig,
    *,
    num_cpus_per_task: float = 1.0,
    num_gpus_per_task: float = 0.0,
    max_parallel: int | None = None,
    desc: str = "layers",
    progress: bool = True,
) -> list[T]:
    """``[fn(*args) for args in args_per_layer]``, one Ray task per item where Ray runs.

    ``fn`` must be a module-level function and its arguments picklable (paths, configs,
    tensors): a Ray worker receives everything through them, never through globals.
    ``max_parallel`` caps the tasks in flight (``None``: all, Ray queues what does not fit
    in the cluster's CPUs); it has no effect in-process. The first failing task's own
    exception is raised, and the tasks still queued are cancelled.

    ``num_gpus_per_task``: GPUs each task asks Ray for, and then sees alone (Ray sets its
    ``CUDA_VISIBLE_DEVICES``). A task given none sees every GPU of its node, so device
    work must ask for its GPUs; in-process it has no effect.
    """
    if max_parallel is not None and max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    items = [tuple(a) for a in args_per_layer]
    threads = task_threads(num_cpus_per_task)
    bar = progress_bar(total=len(items), desc=desc, unit="task", disable=not progress)
    try:
        if not items:
            return []
        if cluster_cfg.mode == "ray" and _ray_available():
            name = f"recoup:{desc}"
            return _on_ray(fn, items, cluster_cfg, num_cpus_per_task, num_gpus_per_task,
                           threads, max_parallel, name, bar)
        if cluster_cfg.mode == "ray":
            log.warning("Ray is not installed: running %d %s tasks serially in this process",
                        len(items), desc)
        return _serial(fn, items, threads, bar)
    finally:
        bar.close()

"""The Ray runtime: start or join a cluster and run stage functions as Ray tasks.

Only this package (and the runner, through it) imports Ray. The embedded local Ray binds
to 127.0.0.1 and starts no dashboard unless asked, so a laptop run exposes nothing.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from recoup.cluster.config import ClusterConfig
from recoup.cluster.hostmem import worker_env
from recoup.cluster.placement import DEFAULT_STRATEGY, Strategy, placement_problem
from recoup.cluster.progress import (
    POLL_INTERVAL_S,
    Channel,
    DriverDisplay,
    ProgressBoard,
    attached,
)
from recoup.cluster.tasks import gpu_task
from recoup.orchestrator.stage import Metrics, Resources, StageContext, StageSpec, run_stage_fn

log = logging.getLogger("recoup.cluster")


@contextmanager
def _output_logged() -> Iterator[None]:
    """What the block writes to fds 1 and 2 (Ray's start-up notices, printed by its C++
    core) goes to this log at INFO, i.e. into ``run.log``, not onto the console."""
    with tempfile.TemporaryFile() as tmp:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if line.strip():
                    log.info("ray: %s", line)


def start_ray(cfg: ClusterConfig, *, log_to_driver: bool = True) -> bool:
    """Connect to ``cfg.address`` or start a local Ray; True if this call started it.

    ``log_to_driver=False`` (``recoup run``): Ray forwards no worker output to this
    process; the stages' workers write theirs to the stage's log file
    (:mod:`recoup.cluster.progress`). Scripts and benchmarks keep Ray's forwarding."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.address:
        log.info("connecting to the Ray cluster at %s", cfg.address)
        probe_ray_address(cfg.address)
        with _output_logged():
            ray.init(address=cfg.address, log_to_driver=log_to_driver)
    else:
        num_cpus = cfg.num_cpus or os.cpu_count() or 1
        log.info("starting a local Ray on 127.0.0.1 with %d CPUs", num_cpus)
        with _output_logged():
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=cfg.dashboard,
                dashboard_host="127.0.0.1",
                _node_ip_address="127.0.0.1",
                log_to_driver=log_to_driver,
                configure_logging=False,
                # every worker frees its big tensors back to the OS (cluster/hostmem.py)
                runtime_env={"env_vars": env} if (env := worker_env(cfg.mmap_threshold))
                else None,
            )
    return True


#: the HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the
#: Ray client server) answers them with its own SETTINGS frame at once
_H2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_ray_address(address: str, timeout_s: float | None = None) -> None:
    """Check that ``address`` (``HOST:PORT`` or ``ray://HOST:PORT``) answers like a gRPC
    server within ``timeout_s`` (default: :func:`recoup.cluster.jobs.net_timeout_s`), so a
    wrong host or port is one ConnectionError naming the address, never a hang. ``auto``
    and ``local`` (a cluster found on this machine) are not probed."""
    import socket
    from urllib.parse import urlsplit

    from recoup.cluster.jobs import net_timeout_s

    if address in ("auto", "local") or "://" in address and not address.startswith("ray://"):
        return
    split = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = split.hostname, split.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConnectionError(f"cluster.address {address!r} is not HOST:PORT "
                              "(e.g. 10.0.0.1:6379, or ray://10.0.0.1:10001)")
    timeout = timeout_s if timeout_s is not None else net_timeout_s()
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(_H2_HELLO)
            if not sock.recv(1):
                raise ConnectionError(f"the Ray cluster at {address} closed the connection "
                                      "without answering (is it the GCS port, usually 6379?)")
    except TimeoutError:
        raise ConnectionError(f"the Ray cluster at {address} did not answer within "
                              f"{timeout:g} s (is it the GCS port, usually 6379?)") from None
    except OSError as e:
        if isinstance(e, ConnectionError) and str(e).startswith("the Ray cluster"):
            raise
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: "
                              f"{e.strerror or e}") from None


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


def _run_stage(spec: StageSpec, ctx: StageContext, channel: Channel) -> Metrics:
    # Runs on a Ray worker: its output goes to the stage's log, its progress to the board.
    with attached(channel, log_records=False):  # run_stage_fn writes the records
        return run_stage_fn(spec, ctx)


def stage_log_path(run_dir: Path, stage: str) -> Path:
    """The stage's log file (the one :func:`run_stage_fn` writes the stage's records to)."""
    return run_dir / "logs" / f"{stage}.log"


class RayExecutor:
    """Runs each stage as one Ray task with the resources the runner asks for.

    The console shows one bar for the running stage, fed by its workers through a
    :class:`ProgressBoard` actor, and the warnings they log, once each; their output goes
    to the stage's log file (``verbose``: also printed here as it grows)."""

    def __init__(self, cfg: ClusterConfig, *, progress: bool = True, verbose: bool = False):
        self._started = start_ray(cfg, log_to_driver=False)
        total = ray.cluster_resources().get("CPU", 1.0)
        self._cpu_cap = float(total)
        self._progress, self._verbose = progress, verbose
        self._warned: set[str] = set()

    def execute(self, spec: StageSpec, ctx: StageContext, resources: Resources) -> Metrics:
        num_cpus = min(resources.num_cpus, self._cpu_cap)
        check_placement([{"CPU": num_cpus, "GPU": resources.num_gpus}], f"stage {spec.name!r}")
        task: Any = gpu_task(ray.remote, _run_stage, resources.num_gpus).options(
            num_cpus=num_cpus, num_gpus=resources.num_gpus, max_retries=0,
            name=f"recoup:{spec.name}",
        )
        board: Any = ray.remote(ProgressBoard).options(num_cpus=0).remote()
        log_path = stage_log_path(ctx.run_dir, spec.name)
        display = DriverDisplay(board, stage=spec.name, progress=self._progress,
                                verbose=self._verbose, log_path=log_path,
                                seen_warnings=self._warned)
        try:
            ref = task.remote(spec, ctx, Channel(board=board, log_path=log_path))
            while not ray.wait([ref], timeout=POLL_INTERVAL_S)[0]:
                display.poll()
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            # Surface the stage's own exception (one sentence), not Ray's wrapper.
            raise (e.cause if e.cause is not None else e) from None
        finally:
            display.close()
            ray.kill(board)

    def close(self) -> None:
        if self._started:
            ray.shutdown()

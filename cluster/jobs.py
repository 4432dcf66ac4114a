"""Recovery runs as Ray Jobs: submit, status, logs, stop (``recoup submit`` / ``recoup job``).

A submitted run is ``python -m recoup run run_config.yaml OVERRIDES`` executed by the Ray
cluster's job manager on the head node, in a runtime environment whose ``working_dir`` is
a small staged folder uploaded with the job:

    recoup/                 the recoup package as this machine runs it (orchestrator/,
                            stages/, cluster/ laid out as installed: recoup.orchestrator ...)
    run_config.yaml         the config file named on the command line, verbatim

The job therefore runs exactly the code and config of the submitting checkout (Ray puts
the working dir first on the ``PYTHONPATH`` of the driver and of every task and actor it
starts, so stage tasks and Ray Train workers import the same copy), while the heavy
dependencies (torch with CUDA, transformers, deepspeed, ray) come from the cluster image:
the ``setup_commands`` of ``ray_cluster.yaml`` install them once per node. A ``pip``
runtime environment per job would reinstall torch on every node for every job, minutes each.
Why staged and not the repository root: the checkout maps the top-level folders onto
``recoup.*`` through its editable install, which the cluster nodes do not have; the staged
folder has the installed package layout, so it imports the same way everywhere.

Resume: a run directory on shared storage holds the manifests, so a job resubmitted with
the same ``run.dir`` reuses every finished stage (its log says ``reused``), continues a
sharded stage at its first missing shard and training from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import recoup

STAGED_CONFIG = "run_config.yaml"
#: what marks a job as a recoup run in the cluster's job list
METADATA_KEY = "recoup_run_dir"
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
_POLL_S = 1.0
#: seconds a request to the dashboard may wait for an answer (connect, then each read);
#: a host that accepts connections and never answers must not hang ``recoup submit``
NET_TIMEOUT_ENV = "RECOUP_NET_TIMEOUT_S"
DEFAULT_NET_TIMEOUT_S = 30.0
#: the upload of the working dir may take longer than an ordinary request
UPLOAD_TIMEOUT_FACTOR = 10
_SUBMISSION_ID = re.compile(r"[^A-Za-z0-9_-]+")


class JobError(RuntimeError):
    """A job request a person can act on (bad address, unknown job, failed job)."""


@dataclass(frozen=True, kw_only=True)
class SubmitRequest:
    """What ``recoup submit`` sends."""

    config: Path
    overrides: tuple[str, ...] = ()
    run_dir: str
    #: extra environment variables of the job (driver and all its tasks)
    env_vars: Mapping[str, str] | None = None
    #: job manager resources for the driver process (it only orchestrates: 0 GPUs)
    entrypoint_num_cpus: float = 0.0
    submission_id: str | None = None


def job_errors() -> tuple[type[BaseException], ...]:
    """Errors of a job command that are the user's to fix (unknown job, unreachable or
    refusing dashboard): the CLI prints them as one sentence, not a traceback."""
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token authentication
        return (JobError, ConnectionError)
    return (JobError, ConnectionError, AuthenticationError)


def package_dirs() -> dict[str, Path]:
    """Source folder of each part of the installed ``recoup`` package, keyed by the
    sub-package name ("" for ``recoup`` itself)."""
    import recoup.cluster
    import recoup.orchestrator
    import recoup.stages

    return {"": Path(recoup.__path__[0]),
            "orchestrator": Path(recoup.orchestrator.__path__[0]),
            "stages": Path(recoup.stages.__path__[0]),
            "cluster": Path(recoup.cluster.__path__[0])}


def _ignore(folder: str, names: list[str]) -> set[str]:
    return {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))
            or (Path(folder, n).is_dir() and n in ("orchestrator", "stages", "cluster")
                and Path(folder).name == "recoup")}


def stage_working_dir(dest: Path, config: Path) -> Path:
    """Lay out the job's working dir in ``dest``: the package and the config file."""
    parts = package_dirs()
    pkg = dest / "recoup"
    shutil.copytree(parts[""], pkg, ignore=_ignore)
    for name, src in parts.items():
        if name:
            shutil.copytree(src, pkg / name, ignore=_ignore)
    shutil.copy2(config, dest / STAGED_CONFIG)
    return dest


@contextmanager
def staged_working_dir(config: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="recoup-job-") as tmp:
        yield stage_working_dir(Path(tmp), config)


def entrypoint(overrides: Sequence[str]) -> str:
    """The job's shell command, run in the staged working dir."""
    return shlex.join(["python", "-m", "recoup", "run", STAGED_CONFIG, *overrides,
                       "--no-progress"])


def default_submission_id(run_dir: str) -> str:
    """Readable and unique: ``recoup-<run name>-<time>-<4 hex>``."""
    name = _SUBMISSION_ID.sub("-", Path(run_dir.rstrip("/")).name or "run").strip("-")
    return f"recoup-{name[:40]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _use_token_if_present() -> None:
    """Send the cluster's auth token when this machine has one.

    Ray (2.5x+) clusters started where a token exists require it on every request, but the
    job client only sends it under ``RAY_AUTH_MODE=token``. Like ``ray.init`` does for a
    local cluster, switch that on when ``RAY_AUTH_MODE`` is unset and a token is present
    (``~/.ray/auth_token``, ``$RAY_AUTH_TOKEN_PATH`` or ``$RAY_AUTH_TOKEN``).
    """
    try:
        from ray._private.authentication import authentication_token_setup as setup
    except ImportError:  # a Ray without token authentication
        return
    # It logs a warning meant for `ray start` ("enabled for this Ray cluster"): not ours.
    quiet = logging.getLogger(setup.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        setup.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        quiet.setLevel(level)


def net_timeout_s() -> float:
    """The network timeout: ``$RECOUP_NET_TIMEOUT_S`` when set (a positive number), else
    :data:`DEFAULT_NET_TIMEOUT_S`."""
    import math
    import os

    raw = os.environ.get(NET_TIMEOUT_ENV)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise JobError(f"${NET_TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
        return value
    return DEFAULT_NET_TIMEOUT_S


def client(address: str) -> Any:
    """A JobSubmissionClient for the dashboard at ``address`` (``http://HEAD:8265``) whose
    every HTTP request has a timeout; a timeout or refused connection is a JobError naming
    the address."""
    import requests
    from ray.job_submission import JobSubmissionClient

    timeout = net_timeout_s()

    class _TimedClient(JobSubmissionClient):
        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            slow = endpoint.startswith("/api/packages")
            kwargs.setdefault("timeout", (timeout, timeout * (UPLOAD_TIMEOUT_FACTOR
                                                              if slow else 1)))
            try:
                return super()._do_request(method, endpoint, **kwargs)
            except requests.exceptions.Timeout:
                raise JobError(f"the Ray dashboard at {address} did not answer within "
                               f"{timeout:g} s (is it the dashboard port, usually 8265?)"
                               ) from None
            except requests.exceptions.ConnectionError as e:
                raise JobError(f"cannot reach the Ray dashboard at {address}: {e}") from None

    _use_token_if_present()
    try:
        return _TimedClient(address)
    except JobError:
        raise
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise JobError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def submit(address: str, req: SubmitRequest) -> str:
    """Submit the run; returns the job's submission id."""
    c = client(address)
    sid = req.submission_id or default_submission_id(req.run_dir)
    with staged_working_dir(req.config) as wd:
        runtime_env: dict[str, Any] = {"working_dir": str(wd)}
        if req.env_vars:
            runtime_env["env_vars"] = dict(req.env_vars)
        return c.submit_job(
            entrypoint=entrypoint(req.overrides), runtime_env=runtime_env, submission_id=sid,
            metadata={METADATA_KEY: req.run_dir, "recoup_version": recoup.__version__,
                      "config": req.config.name},
            entrypoint_num_cpus=req.entrypoint_num_cpus,
        )


def _call(fn: Callable[[], Any], job_id: str) -> Any:
    try:
        return fn()
    except RuntimeError as e:
        if "does not exist" in str(e) or "404" in str(e):
            raise JobError(f"no job {job_id!r} on this cluster") from None
        raise


def status(address: str, job_id: str) -> dict[str, Any]:
    """Status, message, run dir and times of a job."""
    info = _call(lambda: client(address).get_job_info(job_id), job_id)
    return {
        "job_id": job_id,
        "status": str(getattr(info.status, "value", info.status)),
        "message": info.message or "",
        "run_dir": (info.metadata or {}).get(METADATA_KEY, ""),
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(address: str, job_id: str) -> str:
    return _call(lambda: client(address).get_job_logs(job_id), job_id)


def follow_logs(address: str, job_id: str, echo: Callable[[str], None]) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    c = client(address)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            echo(chunk)

    _call(lambda: asyncio.run(tail()), job_id)
    return wait(address, job_id, timeout_s=None)


def stop(address: str, job_id: str) -> bool:
    """Ask the job to stop; False if it had already ended."""
    return bool(_call(lambda: client(address).stop_job(job_id), job_id))


def wait(address: str, job_id: str, *, timeout_s: float | None,
         poll_s: float = _POLL_S) -> str:
    """Block until the job ends; returns SUCCEEDED, FAILED or STOPPED."""
    c = client(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = str(getattr(s := _call(lambda: c.get_job_status(job_id), job_id), "value", s))
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() > deadline:
            raise JobError(f"job {job_id} is still {state} after {timeout_s:g} s")
        time.sleep(poll_s)


def list_runs(address: str) -> list[dict[str, Any]]:
    """The recoup jobs the cluster knows, newest first."""
    jobs = [j for j in client(address).list_jobs() if METADATA_KEY in (j.metadata or {})]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    return [{"job_id": j.submission_id, "status": str(getattr(j.status, "value", j.status)),
             "run_dir": j.metadata[METADATA_KEY], "start_time": j.start_time} for j in jobs]

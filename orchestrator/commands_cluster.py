"""Cluster subcommands: ``recoup submit``, ``recoup job status|logs|stop|list``, ``recoup plan``.

``submit`` and ``job`` talk to a Ray cluster's dashboard (``--address http://HEAD:8265``,
or ``$RAY_API_SERVER_ADDRESS``) through :mod:`recoup.cluster.jobs`; ``plan`` needs no
cluster and no weights (:mod:`recoup.orchestrator.plan`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from recoup.orchestrator.config import cli_number

ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
EXIT_FAILED = 1
EXIT_USAGE = 2


def _friendly(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Job errors (unknown job, unreachable dashboard) as one sentence, like the CLI's own."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from recoup.cluster.jobs import job_errors

        try:
            return fn(args)
        except job_errors() as e:
            if args.debug:
                raise
            print(f"recoup: error: {e}", file=sys.stderr)
            return EXIT_USAGE

    return run


positive_number = cli_number(float, lambda v: math.isfinite(v) and v > 0,
                             "must be a finite number above 0")
fraction = cli_number(float, lambda v: math.isfinite(v) and 0 <= v < 1,
                      "must be a fraction in [0, 1)")
positive_int = cli_number(int, lambda v: v >= 1, "must be 1 or more")


def _address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ValueError(f"no cluster address: pass --address http://HEAD:8265 or set "
                         f"${ADDRESS_ENV} (on a laptop: `ray dashboard ray_cluster.yaml` "
                         "forwards the head's dashboard to http://127.0.0.1:8265)")
    return address


def _env_vars(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {p!r} is not of the form KEY=VALUE")
        out[key] = value
    return out


def _job_overrides(cfg: Any, overrides: list[str]) -> list[str]:
    """The overrides the job runs with: the user's, plus joining the job's own cluster."""
    out = list(overrides)
    if cfg.cluster.mode == "ray" and cfg.cluster.address is None:
        out.append("cluster.address=auto")
    return out


def _check_paths_for_cluster(cfg: Any) -> None:
    """A job runs in a temporary folder on the head node: relative paths would land there."""
    if not Path(cfg.run.dir).is_absolute():
        raise ValueError(
            f"run.dir {cfg.run.dir} is relative; a submitted run needs a path that every "
            "node sees (shared storage), e.g. --run-dir /shared/runs/NAME"
        )
    if cfg.run.data_dir is not None and not Path(cfg.run.data_dir).is_absolute():
        raise ValueError(f"run.data_dir {cfg.run.data_dir} is relative; give the path on the "
                         "cluster's shared storage")


@_friendly
def cmd_submit(args: argparse.Namespace) -> int:
    from recoup.cluster import jobs
    from recoup.orchestrator.config import load_config
    from recoup.orchestrator.runconfig import RunConfig

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    config = Path(args.config)
    cfg = load_config(RunConfig, config, overrides)  # fail here, not on the cluster
    _check_paths_for_cluster(cfg)
    if cfg.cluster.mode == "inprocess":
        print("recoup: warning: cluster.mode is inprocess: the whole run executes in the job's "
              "driver process on the head node, not on the cluster's GPU workers",
              file=sys.stderr)
    address = _address(args)
    req = jobs.SubmitRequest(config=config, overrides=tuple(_job_overrides(cfg, overrides)),
                             run_dir=str(cfg.run.dir), env_vars=_env_vars(args.env) or None,
                             submission_id=args.submission_id)
    job_id = jobs.submit(address, req)
    print(job_id, flush=True)
    print(f"run directory: {cfg.run.dir}\nfollow it with: recoup job logs {job_id} --follow "
          f"--address {address}", file=sys.stderr, flush=True)
    if not args.wait:
        return 0
    final = jobs.follow_logs(address, job_id, lambda s: print(s, end="", flush=True))
    print(f"job {job_id}: {final}", file=sys.stderr)
    return 0 if final == "SUCCEEDED" else EXIT_FAILED


def _when(t: float | None) -> str:
    # Ray reports milliseconds since the epoch.
    return "-" if not t else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t / 1000))


@_friendly
def cmd_job_status(args: argparse.Namespace) -> int:
    from recoup.cluster import jobs

    s = jobs.status(_address(args), args.job_id)
    print(f"{s['job_id']}  {s['status']}")
    print(f"  run dir:  {s['run_dir'] or '-'}")
    print(f"  started:  {_when(s['start_time'])}   ended: {_when(s['end_time'])}")
    if s["message"]:
        print(f"  message:  {s['message']}")
    return 0


@_friendly
def cmd_job_logs(args: argparse.Namespace) -> int:
    from recoup.cluster import jobs

    address = _address(args)
    if args.follow:
        final = jobs.follow_logs(address, args.job_id, lambda s: print(s, end="", flush=True))
        print(f"job {args.job_id}: {final}", file=sys.stderr)
        return 0
    print(jobs.logs(address, args.job_id), end="")
    return 0


@_friendly
def cmd_job_stop(args: argparse.Namespace) -> int:
    from recoup.cluster import jobs

    address = _address(args)
    if not jobs.stop(address, args.job_id):
        print(f"job {args.job_id} had already ended")
        return 0
    if args.wait:
        final = jobs.wait(address, args.job_id, timeout_s=args.timeout)
        print(f"job {args.job_id}: {final}")
    else:
        print(f"job {args.job_id}: stop requested")
    return 0


@_friendly
def cmd_job_list(args: argparse.Namespace) -> int:
    from recoup.cluster import jobs

    rows = jobs.list_runs(_address(args))
    for r in rows:
        print(f"{r['job_id']}  {r['status']:<9}  {_when(r['start_time'])}  {r['run_dir']}")
    if not rows:
        print("no recoup jobs on this cluster")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from recoup.orchestrator import plan
    from recoup.orchestrator.config import load_config
    from recoup.orchestrator.runconfig import RunConfig

    cfg = load_config(RunConfig, Path(args.config), list(args.overrides))
    headroom = plan.DEFAULT_HEADROOM if args.headroom is None else args.headroom
    if not 0 <= headroom < 1:
        raise ValueError(f"--headroom {headroom} must be in [0, 1)")
    gpu_gb = plan.DEFAULT_GPU_MEMORY_GB if args.gpu_memory is None else args.gpu_memory
    per_node = plan.DEFAULT_GPUS_PER_NODE if args.gpus_per_node is None else args.gpus_per_node
    nodes, origin = None, ""
    if args.cluster:
        path = Path(args.cluster)
        if not path.is_file():
            raise FileNotFoundError(f"--cluster {path} does not exist")
        nodes = tuple(plan.nodes_from_cluster_yaml(yaml.safe_load(path.read_text())))
        origin = f"{path.name} ({len(nodes)} nodes at most)"
    hw = plan.Hardware(gpu_bytes=gpu_gb * plan.GB, headroom=headroom,
                       gpus_per_node=per_node, nodes=nodes, nodes_origin=origin)
    shape = plan.resolve_model(cfg, args.model)
    estimates = plan.plan_stages(cfg, shape, hw)
    if args.json:
        print(json.dumps({"model": shape.name, "params": shape.params,
                          "weights_bytes": shape.weights_bytes,
                          "usable_gpu_bytes": hw.usable,
                          "stages": [dataclasses.asdict(e) for e in estimates]}, indent=2))
    else:
        print(plan.format_plan(cfg, shape, hw, estimates))
    return 0


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help=f"Ray dashboard, e.g. http://127.0.0.1:8265 "
                   f"(default: ${ADDRESS_ENV})")


def register(sub: Any) -> None:
    s = sub.add_parser(
        "submit", help="run a pipeline on a Ray cluster as a Ray Job",
        description="Submit `recoup run CONFIG OVERRIDES` to a Ray cluster. The job carries "
        "this checkout's recoup package and the config file; the cluster provides the "
        "dependencies (see ray_cluster.yaml). Resubmitting with the same run directory "
        "resumes: finished stages are reused.",
        epilog="example: recoup submit configs/llama-13b.yaml --address http://127.0.0.1:8265",
    )
    s.add_argument("config", help="YAML run config")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    s.add_argument("--run-dir", help="run directory on shared storage (overrides run.dir)")
    _add_address(s)
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable of the job (repeatable), e.g. HF_HOME=/shared/hf")
    s.add_argument("--submission-id", help="job id to use (default: recoup-<run>-<time>-<hex>)")
    s.add_argument("--wait", action="store_true",
                   help="print the job's log until it ends; exit 0 only if it succeeded")
    s.set_defaults(fn=cmd_submit)

    job = sub.add_parser("job", help="status, logs or stop of a submitted run")
    jsub = job.add_subparsers(dest="job_command", required=True)
    st = jsub.add_parser("status", help="state of a job and its run directory")
    st.add_argument("job_id")
    _add_address(st)
    st.set_defaults(fn=cmd_job_status)
    lg = jsub.add_parser("logs", help="the job's output (the `recoup run` log)")
    lg.add_argument("job_id")
    lg.add_argument("--follow", action="store_true", help="keep printing until the job ends")
    _add_address(lg)
    lg.set_defaults(fn=cmd_job_logs)
    sp = jsub.add_parser("stop", help="stop a running job (resubmit to resume it)")
    sp.add_argument("job_id")
    sp.add_argument("--wait", action="store_true", help="wait until it has stopped")
    sp.add_argument("--timeout", type=positive_number, default=60.0, help="seconds --wait waits")
    _add_address(sp)
    sp.set_defaults(fn=cmd_job_stop)
    ls = jsub.add_parser("list", help="the recoup jobs the cluster knows")
    _add_address(ls)
    ls.set_defaults(fn=cmd_job_list)

    pl = sub.add_parser(
        "plan", help="memory, disk and GPUs each stage needs, from the model config alone",
        description="Estimate per stage: device memory per worker, host memory, bytes "
        "written, and GPUs, for the model of the config (built on the meta device: no "
        "weights are read). Every figure is printed with its parts.",
        epilog="example: recoup plan configs/llama-70b.yaml --gpu-memory 80",
    )
    pl.add_argument("config", help="YAML run config")
    pl.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides")
    pl.add_argument("--model", help="model shape to plan for instead of prepare.source: a "
                    "built-in name (Llama-2-7b-hf, Llama-2-13b-hf, Llama-2-70b-hf, "
                    "smollm2-135m) or a Hugging Face config.json / folder")
    pl.add_argument("--gpu-memory", type=positive_number, metavar="GB",
                    help="memory of one GPU in GB (1e9 bytes); default 80")
    pl.add_argument("--headroom", type=fraction,
                    help="share of each GPU kept free for CUDA context and fragmentation; "
                    "default 0.1")
    pl.add_argument("--gpus-per-node", type=positive_int, help="GPUs of one node; default 8")
    pl.add_argument("--cluster", metavar="YAML",
                    help="Ray cluster-launcher config whose node types bound the cluster "
                    "(checks that each stage's worker group can be placed)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(fn=cmd_plan)

"""`recoup submit` / `recoup job` against a real Ray head started by the test.

The head binds to 127.0.0.1 and lives in its own temp dir, ports and process session, so it
never touches another Ray on the machine; it is torn down by killing exactly the processes
it started (its session, and their descendants), not with `ray stop`, which would stop every
Ray of this user on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from recoup.cluster import jobs
from recoup.orchestrator import store
from recoup.orchestrator.cli import main

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PIPELINE = ("prepare", "degrade")  # the cluster path, not the stages, is under test here
JOB_TIMEOUT_S = 300
_PORT_OPTIONS = ("port", "dashboard-port", "ray-client-server-port",
                 "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port", "node-manager-port",
                 "object-manager-port")
_OBJECT_STORE_BYTES = 150 * 1024**2
_STOP_GRACE_S = 5  # then SIGKILL: the GCS server may ignore SIGTERM for a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, command line) of every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if fields[0] != "Z":  # a zombie is already dead; its parent reaps it
            out[int(d)] = (int(fields[1]), int(fields[3]), cmd)
    return out


def _started_by_us(sid: int, marker: str) -> set[int]:
    """Processes of the head's session or naming its temp dir, and all their descendants."""
    procs = _processes()
    mine = {p for p, (_, s, cmd) in procs.items() if s == sid or marker in cmd}
    while True:
        more = {p for p, (pp, _, _) in procs.items() if pp in mine and p not in mine}
        if not more:
            break
        mine |= more
    mine.discard(os.getpid())
    return mine


def _kill(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A one-node Ray cluster with its dashboard on 127.0.0.1; yields the dashboard URL."""
    if shutil.which("ray", path=str(VENV_BIN)) is None:
        pytest.skip("the ray CLI is not installed next to this Python")
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: unix socket paths
    ports = {name: _free_port() for name in _PORT_OPTIONS}
    cmd = [str(VENV_BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
           "--num-gpus=0", f"--object-store-memory={_OBJECT_STORE_BYTES}",
           "--disable-usage-stats", f"--temp-dir={temp_dir}",
           *(f"--{name}={port}" for name, port in ports.items())]
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0",
           # Ray turns 127.0.0.1 into the host's routable address unless told this
           # "cluster" is local-only; keep every advertised address on the loopback.
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(var, None)
    starter = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    sid = starter.pid
    try:
        out, _ = starter.communicate(timeout=180)
        if starter.returncode != 0:
            pytest.fail(f"ray start failed:\n{out[-3000:]}")
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        if starter.poll() is None:
            starter.kill()
        _kill(_started_by_us(sid, temp_dir), signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        while (left := _started_by_us(sid, temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        _kill(left, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(["submit", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _manifests(run_dir: Path) -> dict[str, store.Manifest]:
    return {s: store.read_manifest(run_dir / s) for s in PIPELINE}


def test_submit_resubmit_logs_status_stop(ray_head: str, tmp_path: Path, data_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    common = [str(REPO / "configs" / "tiny.yaml"), "--address", ray_head,
              "--run-dir", str(run_dir), f"run.data_dir={data_dir}",
              f"run.pipeline=[{','.join(PIPELINE)}]", "cluster.mode=ray", "cluster.stage_cpus=1"]

    # 1. a fresh run: every stage runs as a Ray task of the job, on the test's cluster
    rc, out, _ = _submit(common, capsys)
    assert rc == 0
    job_id = out.splitlines()[0].strip()
    assert jobs.wait(ray_head, job_id, timeout_s=JOB_TIMEOUT_S) == "SUCCEEDED", (
        jobs.logs(ray_head, job_id)[-3000:])
    first = _manifests(run_dir)
    assert main(["job", "logs", job_id, "--address", ray_head]) == 0
    log = capsys.readouterr().out
    assert f"run directory: {run_dir}" in log
    assert all(f"{s:<10} done" in log for s in PIPELINE), log[-3000:]
    assert main(["job", "status", job_id, "--address", ray_head]) == 0
    status = capsys.readouterr().out
    assert "SUCCEEDED" in status and str(run_dir) in status

    # 2. resubmitted on the same run dir: every stage is reused, nothing is rewritten
    rc, out, _ = _submit([*common, "--wait"], capsys)
    assert rc == 0
    for stage in PIPELINE:
        assert f"{stage:<10} reused" in out, out[-3000:]
    assert _manifests(run_dir) == first

    # 3. a job stopped while it runs ends STOPPED; the cluster lists both runs
    rc, out, _ = _submit([*common[:4], str(tmp_path / "stopped"), *common[5:]], capsys)
    stopped_id = out.splitlines()[0].strip()
    assert main(["job", "stop", stopped_id, "--wait", "--address", ray_head]) == 0
    assert f"job {stopped_id}: STOPPED" in capsys.readouterr().out
    assert main(["job", "list", "--address", ray_head]) == 0
    listed = capsys.readouterr().out
    assert job_id in listed and stopped_id in listed
    assert main(["job", "status", "raysubmit_nope", "--address", ray_head]) == 2
    assert "no job 'raysubmit_nope'" in capsys.readouterr().err

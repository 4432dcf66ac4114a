"""Recovery training under DeepSpeed ZeRO, on Ray Train workers or in this process.

:func:`run_training` launches :func:`train_loop` on ``engine.workers`` Ray Train
``TorchTrainer`` workers (gloo on CPU, nccl on GPU), or, with ``cluster.mode ==
'inprocess'``, runs the very same loop once in this process on a single-process gloo
group. DeepSpeed is initialised either way, so the in-process path is the code path
of the cluster.

What to train comes from a *task factory* (a module-level function, pickled by
reference) and its spec, both carried in the loop's config dict: the worker imports
nothing from globals. The task gives the module (trainable parameters have
``requires_grad``), its samples, the loss of a micro-batch, and how to save the trained
parameters. This module owns the rest: the DeepSpeed engine, the deterministic data
order, checkpoints and their resume, logging.

Determinism (what makes a resumed run end where an uninterrupted one ends):

- the samples of micro-batch ``g`` on rank ``r`` are a pure function of (seed, g, r):
  a stream of seeded per-epoch permutations, cut in order;
- the torch RNG is reseeded from (seed, g, r) before every micro-batch (dropout);
- model, optimizer and LR-schedule state come back from the DeepSpeed checkpoint.

Checkpoints (``OUT/checkpoints``): DeepSpeed tags ``step-NNNNNN`` saved every
``checkpoint_every`` steps without the frozen base weights; one counts only once
``latest.json`` names it (written atomically by rank 0 after every rank saved). A
``job.json`` holds the fingerprint of the job; checkpoints of another job are deleted
before training, never resumed. ``OUT/log.jsonl`` gets one line per optimizer step from
rank 0 (step, loss, lr, tokens, elapsed); lines past the resumed step are dropped.

Worker failures: when a Ray Train worker process dies (a lost node, an OOM kill), Ray Train
restarts the whole worker group, up to ``cluster.train_max_failures`` times; the restarted
loop resumes from the last complete checkpoint exactly as a resumed ``recoup run`` does, so
the run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from recoup.cluster.config import ClusterConfig
from recoup.cluster.engine import EngineConfig, deepspeed_config, lr_factor, use_bf16
from recoup.orchestrator.store import TMP_MARK, atomic_write_json

CHECKPOINTS = "checkpoints"
PARAMS = "params"
LOG = "log.jsonl"
RESULT = "train_result.json"
_JOB = "job.json"
_LATEST = "latest.json"
_SEED_MIX = 1_000_003
"""Prime mixing (seed, micro-batch, rank) into one RNG seed."""


class TrainTask(Protocol):
    """What a training worker trains. Built inside the worker by the task factory."""

    #: the module DeepSpeed wraps; its trainable parameters have requires_grad
    module: torch.nn.Module

    def num_samples(self) -> int: ...

    def batch(self, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
        """The micro-batch of these sample indices, on ``device``."""

    def loss(self, engine: Any, batch: Mapping[str, torch.Tensor],
             ) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, its parts for logging, tokens in the micro-batch); ``engine(**inputs)``
        runs the wrapped module."""

    def save(self, folder: Path) -> dict[str, Any]:
        """Write the trained parameters to ``folder`` (rank 0, parameters gathered)."""


TaskFactory = Callable[[Any, torch.device], TrainTask]


class TrainingStopped(RuntimeError):
    """Raised after ``stop_after_steps``: a stand-in for a crash, used by resume tests."""


@dataclass(frozen=True)
class CrashHook:
    """Test hook: the first worker to delete ``file`` after optimizer step ``after_step``
    ends its own process with ``os._exit`` (no cleanup, no exception: what an OOM kill or a
    lost node looks like to Ray Train). Only one worker wins the file, so the restarted
    group trains on. Never set in real runs; in-process it would end the driver."""

    file: Path
    after_step: int

    def maybe_crash(self, step: int) -> None:
        if step != self.after_step:
            return
        try:
            os.unlink(self.file)
        except FileNotFoundError:
            return
        os._exit(1)


# --------------------------------------------------------------------------- pure helpers


def sample_indices(n: int, *, seed: int, micro_batch: int, world_size: int, g: int,
                   rank: int) -> list[int]:
    """Indices of micro-batch ``g`` (global, counting accumulation steps) on ``rank``.

    The samples form a stream of per-epoch permutations, each seeded by (seed, epoch);
    micro-batch ``g`` takes the ``world_size * micro_batch`` stream entries from position
    ``g * world_size * micro_batch``, rank ``r`` the ``r``-th ``micro_batch`` of them.
    """
    if n < 1:
        raise ValueError("no training samples")
    start = (g * world_size + rank) * micro_batch
    out = []
    perms: dict[int, torch.Tensor] = {}
    for pos in range(start, start + micro_batch):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            gen = torch.Generator().manual_seed(seed * _SEED_MIX + epoch)
            perms[epoch] = torch.randperm(n, generator=gen)
        out.append(int(perms[epoch][i]))
    return out


def micro_seed(seed: int, g: int, rank: int, world_size: int) -> int:
    return (seed * _SEED_MIX + g * world_size + rank) % (2**63)


def tag_of(step: int) -> str:
    return f"step-{step:06d}"


# --------------------------------------------------------------------------- checkpoints


def latest_checkpoint(folder: Path) -> tuple[str, int] | None:
    """(tag, step) of the newest complete checkpoint in ``folder``, or None."""
    path = folder / _LATEST
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if not (folder / info["tag"]).is_dir():
        return None
    return info["tag"], int(info["step"])


def prepare_checkpoints(folder: Path, fingerprint: str) -> int:
    """Keep ``folder``'s checkpoints only if they belong to job ``fingerprint``.

    Returns the step training will resume from (0: from scratch). Runs on the driver
    before any worker starts, so workers never race on the cleanup.
    """
    job = folder / _JOB
    if job.is_file() and json.loads(job.read_text()).get("fingerprint") == fingerprint:
        latest = latest_checkpoint(folder)
        return latest[1] if latest else 0
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_json(job, {"fingerprint": fingerprint})
    return 0


def _save_checkpoint(engine: Any, folder: Path, step: int, keep: int, rank: int) -> None:
    import torch.distributed as dist

    tag = tag_of(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state={"step": step},
                           save_latest=False, exclude_frozen_parameters=True)
    dist.barrier()
    if rank == 0:
        atomic_write_json(folder / _LATEST, {"tag": tag, "step": step})
        tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-"))
        for old in tags[:-keep]:
            shutil.rmtree(folder / old, ignore_errors=True)
    dist.barrier()


# --------------------------------------------------------------------------- logging


@dataclass
class StepLog:
    """``log.jsonl``: one JSON line per optimizer step, written by rank 0 only."""

    path: Path
    enabled: bool

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps past ``step`` (they will be trained again)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- the loop


def _set_accelerator(device_type: str) -> None:
    """DeepSpeed picks its accelerator once, on import: CPU runs must say so before."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if device_type == "cpu" and name != "cpu":
        raise RuntimeError(
            f"DeepSpeed was already loaded for {name!r} in this process; a CPU run needs "
            "DS_ACCELERATOR=cpu set before deepspeed is imported"
        )


def _worker_device(device: str) -> torch.device:
    """This worker's device: on GPU the one of its local rank (Ray Train and torchrun
    set LOCAL_RANK and let a node's workers see all of its GPUs)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    return dev


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One training worker: everything comes through ``config`` (see :func:`run_training`).

    Expects torch.distributed to be initialised (by Ray Train, or by the in-process
    launcher). Returns the summary on rank 0 (and writes it to ``OUT/train_result.json``).
    """
    import torch.distributed as dist

    engine_cfg: EngineConfig = config["engine"]
    device = _worker_device(config["device"])
    _set_accelerator(device.type)
    import deepspeed
    from tqdm.auto import tqdm

    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir = Path(config["out_dir"])
    ckpt_dir = out_dir / CHECKPOINTS
    torch.manual_seed(engine_cfg.seed)  # the same trainable init on every rank
    task: TrainTask = config["make_task"](config["task_spec"], device)
    bf16 = use_bf16(engine_cfg, device.type)
    params = [p for p in task.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=engine_cfg.lr, betas=engine_cfg.betas,
                                  weight_decay=engine_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=engine_cfg.warmup_steps, total_steps=engine_cfg.steps,
        schedule=engine_cfg.schedule))
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=task.module, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(engine_cfg, world_size=world, bf16=bf16),
        dist_init_required=False,
    )
    start = 0
    latest = latest_checkpoint(ckpt_dir)
    if latest is not None:
        tag, start = latest
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=True)
    log = StepLog(out_dir / LOG, enabled=rank == 0)
    log.truncate_after(start)
    n = task.num_samples()
    accum = engine_cfg.grad_accum
    tokens_total = 0
    stop = config.get("stop_after_steps")
    bar = tqdm(total=engine_cfg.steps, initial=start, desc="train", unit="step",
               disable=rank != 0 or not config.get("progress", True))
    t0, cpu0 = time.time(), time.process_time()
    for step in range(start, engine_cfg.steps):
        stats = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, micro, tokens
        lr = optimizer.param_groups[0]["lr"]
        parts_sum: dict[str, float] = {}
        for micro in range(accum):
            g = step * accum + micro
            torch.manual_seed(micro_seed(engine_cfg.seed, g, rank, world))
            idx = sample_indices(n, seed=engine_cfg.seed, micro_batch=engine_cfg.micro_batch,
                                 world_size=world, g=g, rank=rank)
            batch = task.batch(idx, device)
            loss, parts, tokens = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            stats += torch.tensor([float(loss.detach()), 1.0, float(tokens)],
                                  dtype=torch.float64, device=device)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v
        dist.all_reduce(stats)  # on the device: nccl reduces GPU tensors only
        stats = stats.cpu()
        tokens_total += int(stats[2])
        record = {"step": step + 1, "loss": float(stats[0] / stats[1]), "lr": lr,
                  "tokens": int(stats[2]), "elapsed_s": round(time.time() - t0, 3)}
        record.update({k: v / accum for k, v in parts_sum.items()})  # rank 0's parts
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if done % engine_cfg.checkpoint_every == 0 or done == engine_cfg.steps:
            _save_checkpoint(engine, ckpt_dir, done, engine_cfg.keep_checkpoints, rank)
        if config.get("crash") is not None:
            config["crash"].maybe_crash(done)
        if stop is not None and done >= stop and done < engine_cfg.steps:
            bar.close()
            raise TrainingStopped(f"stopped after step {done} (stop_after_steps)")
    bar.close()
    elapsed = time.time() - t0
    cpu = torch.tensor([time.process_time() - cpu0], dtype=torch.float64, device=device)
    dist.all_reduce(cpu)  # CPU seconds of all ranks: throughput that contention cannot hide
    saved = _gather_and_save(task, out_dir / PARAMS, rank)
    result: dict[str, Any] = {}
    if rank == 0:
        history = read_log(out_dir / LOG)  # the whole run, across resumes
        result = {
            "steps": engine_cfg.steps, "resumed_from": start, "world_size": world,
            "first_loss": history[0]["loss"], "final_loss": history[-1]["loss"],
            "tokens": sum(r["tokens"] for r in history),
            "session_tokens": tokens_total, "session_seconds": round(elapsed, 3),
            "session_cpu_seconds": round(float(cpu), 3),
            "tokens_per_s": tokens_total / elapsed if tokens_total and elapsed > 0 else None,
            "zero_stage": engine_cfg.zero_stage, "bf16": bf16, **saved,
        }
        atomic_write_json(out_dir / RESULT, result)
    dist.barrier()
    return result


def _gather_and_save(task: TrainTask, folder: Path, rank: int) -> dict[str, Any]:
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the trainable ones
    (a collective) and let rank 0 write them."""
    import deepspeed

    params = [p for p in task.module.parameters() if p.requires_grad]
    saved: dict[str, Any] = {}
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            tmp = folder.with_name(f"{folder.name}{TMP_MARK}{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            saved = task.save(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
    return saved


# --------------------------------------------------------------------------- launchers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_inprocess(config: dict[str, Any]) -> dict[str, Any]:
    """The loop once, in this process, on a single-process gloo group (world size 1)."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; "
                           "in-process training needs its own single-process group")
    # What a launcher (torchrun, Ray Train) would set; DeepSpeed checks LOCAL_RANK.
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        backend = "nccl" if torch.device(config["device"]).type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=0, world_size=1)
        try:
            return train_loop(config)
        finally:
            _destroy_group()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _destroy_group() -> None:
    """Tear the group down through DeepSpeed when it knows it: DeepSpeed caches groups
    derived from the world group and would hand a dead one to the next run in this
    process."""
    import torch.distributed as dist

    try:
        import deepspeed.comm as ds_comm
    except ImportError:
        ds_comm = None
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_initialized():
        dist.destroy_process_group()


def _run_ray(config: dict[str, Any], engine: EngineConfig, cluster: ClusterConfig,
             device: torch.device, storage: Path) -> dict[str, Any]:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from recoup.cluster.runtime import start_ray

    started = start_ray(cluster)
    gpu = device.type == "cuda"
    resources = {"CPU": engine.cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
    try:
        trainer = TorchTrainer(
            train_loop,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=engine.workers, use_gpu=gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            # A dead worker restarts the group, whose train_loop resumes from the last
            # complete checkpoint (latest.json); prepare_checkpoints ran once, above.
            run_config=RunConfig(storage_path=str(storage), name="train",
                                 failure_config=FailureConfig(
                                     max_failures=cluster.train_max_failures)),
        )
        trainer.fit()
    except Exception as e:
        raise RuntimeError(f"recovery training failed on the Ray Train workers: "
                           f"{_root_cause(e)}") from e
    finally:
        if started:
            ray.shutdown()
    return json.loads((Path(config["out_dir"]) / RESULT).read_text())


def _root_cause(e: BaseException) -> str:
    seen = set()
    while e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def run_training(*, make_task: TaskFactory, task_spec: Any, engine: EngineConfig,
                 cluster: ClusterConfig, device: str, out_dir: Path, fingerprint: str,
                 progress: bool = True, stop_after_steps: int | None = None,
                 crash: CrashHook | None = None) -> dict[str, Any]:
    """Train ``make_task(task_spec, device)`` under DeepSpeed; resume from ``out_dir``'s
    checkpoints when they belong to ``fingerprint``. Returns the summary of rank 0.

    ``out_dir`` must be visible to every worker (one machine, or shared storage). On Ray,
    a worker that dies restarts the worker group up to ``cluster.train_max_failures``
    times, each time from the last checkpoint. ``stop_after_steps`` raises
    :class:`TrainingStopped` after that step and ``crash`` kills a worker (tests only).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_from = prepare_checkpoints(out_dir / CHECKPOINTS, fingerprint)
    if resume_from == 0:
        (out_dir / LOG).unlink(missing_ok=True)
    (out_dir / RESULT).unlink(missing_ok=True)
    config = {
        "make_task": make_task, "task_spec": task_spec, "engine": engine, "device": device,
        "out_dir": str(out_dir), "progress": progress, "stop_after_steps": stop_after_steps,
        "crash": crash,
    }
    if cluster.mode == "inprocess":
        return _run_inprocess(config)
    # absolute: Ray Train takes the storage path as a URI, which a relative path is not
    storage = out_dir.absolute() / f"ray{TMP_MARK}storage"
    try:
        return _run_ray(config, engine, cluster, torch.device(device), storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)


__all__ = (
    "CHECKPOINTS",
    "CrashHook",
    "LOG",
    "PARAMS",
    "RESULT",
    "StepLog",
    "TaskFactory",
    "TrainTask",
    "TrainingStopped",
    "latest_checkpoint",
    "micro_seed",
    "prepare_checkpoints",
    "read_log",
    "run_training",
    "sample_indices",
    "train_loop",
)

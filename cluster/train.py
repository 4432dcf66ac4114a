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

The factory is told how the engine will hold the model (:class:`WorkerSetup`): under
ZeRO-3 it gets the engine's DeepSpeed config and builds its frozen base partitioned from
the start, so no rank ever holds the whole model (the load of an ordinary module would put
it whole on every GPU before ``deepspeed.initialize`` partitions it); it also gets whether
to checkpoint activations and a folder for what it computes once per job.

Determinism and resume (data order, checkpoints every ``checkpoint_every`` steps without
the frozen base weights, the step log) live in :mod:`recoup.cluster.train_state`; model,
optimizer and LR-schedule state come back from the DeepSpeed checkpoint.

Worker failures: when a Ray Train worker process dies (a lost node, an OOM kill), Ray Train
restarts the whole worker group, up to ``cluster.train_max_failures`` times; the restarted
loop resumes from the last complete checkpoint exactly as a resumed ``recoup run`` does, so
the run ends where an uninterrupted one ends.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from recoup.cluster.config import ClusterConfig
from recoup.cluster.engine import (
    EngineConfig,
    deepspeed_config,
    lr_factor,
    use_bf16,
    use_checkpointing,
    with_zero3_limits,
)
from recoup.cluster.hostmem import fix_mmap_threshold
from recoup.cluster.progress import attached
from recoup.cluster.progress import current as current_channel
from recoup.cluster.train_state import (
    CHECKPOINTS,
    LOG,
    StepLog,
    latest_checkpoint,
    micro_seed,
    prepare_checkpoints,
    read_log,
    sample_indices,
    save_checkpoint,
)
from recoup.cluster.train_task import (
    TaskFactory,
    TrainTask,
    WorkerSetup,
    largest_block_params,
    match_zero_init,
    sample_lengths,
)
from recoup.orchestrator.store import TMP_MARK, atomic_write_json, commit_path, tmp_path_for

PARAMS = "params"
RESULT = "train_result.json"


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


# --------------------------------------------------------------------------- the loop


def _set_accelerator(device_type: str) -> None:
    """DeepSpeed picks its accelerator once, on import, from ``DS_ACCELERATOR`` or what it
    finds: a run says which before, and a DeepSpeed already loaded for another device (a
    ``DS_ACCELERATOR=cpu`` inherited from a shell or a CPU test) is refused here, not left
    to fail later on tensors of the wrong device."""
    if "deepspeed" not in sys.modules:
        if device_type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        elif device_type == "cuda" and os.environ.get("DS_ACCELERATOR") == "cpu":
            os.environ["DS_ACCELERATOR"] = "cuda"
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if device_type in ("cpu", "cuda") and name != device_type:
        raise RuntimeError(
            f"DeepSpeed was already loaded for {name!r} in this process; a {device_type} run "
            f"needs DS_ACCELERATOR={device_type} set before deepspeed is imported"
        )


def _worker_device(device: str) -> torch.device:
    """This worker's device, made the current CUDA device (DeepSpeed places partitions and
    its engine on the current device and ``LOCAL_RANK``). With several workers, the GPU of
    the local rank (Ray Train and torchrun set LOCAL_RANK and let a node's workers see all
    of its GPUs), whatever index ``device`` names; a single worker uses the index it is
    given (the in-process launcher sets LOCAL_RANK to it)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(dev)
    return dev


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """One training worker: everything comes through ``config`` (see :func:`run_training`).

    Expects torch.distributed to be initialised (by Ray Train, or by the in-process
    launcher). Returns the summary on rank 0 (and writes it to ``OUT/train_result.json``).
    """
    import torch.distributed as dist

    # freed blocks and activations go back to the OS (hostmem.py)
    fix_mmap_threshold(config["mmap_threshold"])
    engine_cfg: EngineConfig = config["engine"]
    device = _worker_device(config["device"])
    _set_accelerator(device.type)
    import deepspeed
    from tqdm.auto import tqdm

    from recoup.cluster.progress import bar as progress_bar

    rank, world = dist.get_rank(), dist.get_world_size()
    out_dir, ckpt_dir = Path(config["out_dir"]), Path(config["out_dir"]) / CHECKPOINTS
    torch.manual_seed(engine_cfg.seed)  # the same trainable init on every rank
    bf16 = use_bf16(engine_cfg, device.type)
    ds_config = deepspeed_config(engine_cfg, world_size=world, bf16=bf16)
    setup = WorkerSetup(
        device=device, rank=rank, world_size=world,
        zero_init=ds_config if engine_cfg.zero_stage == 3 else None,
        activation_checkpointing=use_checkpointing(engine_cfg, device.type),
        micro_batch=engine_cfg.micro_batch, work_dir=out_dir, job_key=config["fingerprint"],
        compute_dtype=torch.bfloat16 if bf16 else None,
        streamed=engine_cfg.frozen_weights == "streamed")
    task: TrainTask = config["make_task"](config["task_spec"], setup)
    if setup.zero_init is not None:
        match_zero_init(task.module, setup.compute_dtype)
    # sized by the model: DeepSpeed's defaults would keep every block gathered (engine.py)
    ds_config = with_zero3_limits(ds_config, largest_block_params(task.module))
    # a task may give parameter groups with their own peak lr (the schedule scales them all)
    params = task.param_groups(engine_cfg.lr) if hasattr(task, "param_groups") else [
        p for p in task.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=engine_cfg.lr, betas=engine_cfg.betas,
                                  weight_decay=engine_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_factor, warmup_steps=engine_cfg.warmup_steps, total_steps=engine_cfg.steps,
        schedule=engine_cfg.schedule))
    engine, optimizer, _, schedule = deepspeed.initialize(
        model=task.module, optimizer=optimizer, lr_scheduler=schedule,
        config=ds_config, dist_init_required=False,
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
    lengths = sample_lengths(task) if engine_cfg.group_by_length else None
    accum = engine_cfg.grad_accum
    tokens_total = 0
    stop = config.get("stop_after_steps")
    # rank 0's bar also feeds the driver's console (recoup.cluster.progress)
    bar = (progress_bar if rank == 0 else tqdm)(
        total=engine_cfg.steps, initial=start, desc="train", unit="step",
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
                                 world_size=world, g=g, rank=rank, lengths=lengths)
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
        if not math.isfinite(float(stats[0])):
            # every rank sees the reduced sum, so all stop here together; no checkpoint of
            # the poisoned weights is written and the stage fails instead of passing as done
            raise FloatingPointError(
                f"training loss is {float(stats[0] / stats[1])} at step {step + 1} of "
                f"{engine_cfg.steps} (non-finite); lower train.engine.lr or check the inputs")
        tokens_total += int(stats[2])
        record = {"step": step + 1, "loss": float(stats[0] / stats[1]), "lr": lr,
                  "tokens": int(stats[2]), "elapsed_s": round(time.time() - t0, 3)}
        record.update({k: v / accum for k, v in parts_sum.items()})  # rank 0's parts
        log.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        done = step + 1
        if done % engine_cfg.checkpoint_every == 0 or done == engine_cfg.steps:
            save_checkpoint(engine, ckpt_dir, done, engine_cfg.keep_checkpoints, rank)
        if config.get("crash") is not None:
            config["crash"].maybe_crash(done)
        if stop is not None and done >= stop and done < engine_cfg.steps:
            bar.close()
            raise TrainingStopped(f"stopped after step {done} (stop_after_steps)")
    bar.close()
    elapsed = time.time() - t0
    cpu = torch.tensor([time.process_time() - cpu0], dtype=torch.float64, device=device)
    dist.all_reduce(cpu)  # CPU seconds of all ranks: throughput that contention cannot hide
    saved = _gather_and_save(task, out_dir / PARAMS, rank, bf16)
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


def _gather_and_save(task: TrainTask, folder: Path, rank: int, bf16: bool) -> dict[str, Any]:
    """Under ZeRO-3 each rank holds a shard of every parameter: gather the trainable ones
    (a collective) and let rank 0 write them. A bf16 engine's module holds bf16 copies of
    its parameters; what is written is the optimizer's float32 master weights."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    params = [p for p in task.module.parameters() if p.requires_grad]
    # a collective too (the masters are partitioned): every rank, in the same order
    masters = {i: m for i, p in enumerate(params)
               if (m := safe_get_full_fp32_param(p)) is not None} if bf16 else {}
    saved: dict[str, Any] = {}
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank == 0:
            kept = {i: params[i].data for i in masters}
            for i in kept:
                params[i].data = masters[i].to(params[i].device).reshape(kept[i].shape)
            try:
                tmp = tmp_path_for(folder)
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                saved = task.save(tmp)
                commit_path(tmp, folder)
            finally:
                for i, data in kept.items():
                    params[i].data = data
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
    dev = torch.device(config["device"])
    local = str(dev.index or 0) if dev.type == "cuda" else "0"  # cuda:N -> DeepSpeed's GPU N
    env = {"RANK": "0", "LOCAL_RANK": local, "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        backend = "nccl" if dev.type == "cuda" else "gloo"
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


def _attached_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """A Ray Train worker: :func:`train_loop` with its output in the stage's log and its
    progress sent to the driver (``config["channel"]``)."""
    with attached(config.get("channel")):
        return train_loop(config)


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
            _attached_train_loop,
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
    """Train ``make_task(task_spec, setup)`` (``setup``: a :class:`WorkerSetup`) under
    DeepSpeed; resume from ``out_dir``'s checkpoints when they belong to ``fingerprint``.
    Returns the summary of rank 0.

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
        "crash": crash, "channel": current_channel(), "fingerprint": fingerprint,
        "mmap_threshold": cluster.mmap_threshold,
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
    "PARAMS",
    "RESULT",
    "CrashHook",
    "TaskFactory",
    "TrainTask",
    "TrainingStopped",
    "WorkerSetup",
    "run_training",
    "train_loop",
)

"""Causal LMs partitioned by DeepSpeed ZeRO-3 from construction on: no rank holds the whole.

ZeRO-3 shards every parameter over the data-parallel ranks. ``deepspeed.initialize`` on an
ordinary module partitions it only after it was loaded whole on every rank, which is 138 GB
per GPU for a 70B model. :func:`load_partitioned` instead builds the model inside
``deepspeed.zero.Init`` (each module's parameters are partitioned as soon as that module is
constructed; torch's and transformers' random inits are skipped, the checkpoint overwrites
them) and then copies the checkpoint in one module at a time: that module's parameters are
gathered (``GatheredParameters(modifier_rank=0)``), rank 0 reads their tensors from the
safetensors files and copies them in, and DeepSpeed broadcasts and re-partitions them on
exit. Peak per rank: its partition plus one gathered module on the device; in host memory one
module's tensors, on rank 0 only. transformers' own ZeRO-3 ``from_pretrained`` reads the
whole checkpoint into rank 0's host memory first, which is why it is not used.

A partitioned parameter is an empty placeholder whose real shape is ``ds_shape``:
:func:`full_shape`, :func:`full_numel` and :func:`gathered` let code that reads weights (keep
masks, parameter counts) work on partitioned and ordinary parameters alike, and
:func:`gathered_forward` runs inference on a partitioned model without a DeepSpeed engine
(each block's parameters gathered for its own call only). DeepSpeed is imported only where a
partitioned model is actually in play.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 manages (it has a DeepSpeed id)."""
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> torch.Size:
    """The parameter's shape as the model sees it, partitioned or not."""
    return p.ds_shape if is_partitioned(p) else p.shape


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, partitioned or not."""
    return int(p.ds_numel) if is_partitioned(p) else p.numel()


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Inside, every partitioned one of ``params`` holds its whole value (a collective: every
    rank must enter with the same parameters); ordinary parameters are left as they are.
    ``modifier_rank``: the rank whose in-place changes are broadcast on exit."""
    params = list(params)
    if not any(is_partitioned(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """The safetensors file holding each tensor of the checkpoint in ``folder``."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}: "
                            "not a model folder recoup wrote")


def _source_keys(model: nn.Module, stored: Mapping[str, Path], folder: Path) -> dict[int, str]:
    """Checkpoint key of each parameter (by ``id``); a tied parameter is found under any of
    its names. Raises naming the folder for a parameter the checkpoint lacks or a checkpoint
    tensor the model has no place for."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    keys: dict[int, str] = {}
    for pid, aliases in names.items():
        found = [n for n in aliases if n in stored]
        if not found:
            raise ValueError(f"{folder}: the checkpoint has no tensor for parameter {aliases[0]}")
        keys[pid] = found[0]
    known = {n for aliases in names.values() for n in aliases}
    buffers = {n for n, _ in model.named_buffers()}
    extra = sorted(set(stored) - known - buffers)
    if extra:
        raise ValueError(f"{folder}: checkpoint tensors {extra[:3]} are not parameters of a "
                         f"{type(model).__name__}")
    return keys


def read_tensors(stored: Mapping[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors (``stored``: :func:`checkpoint_files`), each file opened for this
    call only: a safetensors handle maps its whole file, and the pages read through handles
    kept open across a whole load would add up to the model (page cache, but resident in
    the process)."""
    from safetensors import safe_open

    wanted = list(names)
    out: dict[str, torch.Tensor] = {}
    for path in sorted({stored[n] for n in wanted}):
        with safe_open(str(path), "pt") as f:
            out.update({n: f.get_tensor(n) for n in wanted if stored[n] == path})
    return out


@torch.no_grad()
def fill_partitioned(model: nn.Module, folder: Path) -> None:
    """Copy the checkpoint in ``folder`` into ``model``, one module's parameters at a time
    (gathered, written by rank 0, broadcast and re-partitioned on exit; see the module
    docstring). Every rank must call it. Buffers the checkpoint holds are read by every rank
    (they are small and never partitioned)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    stored = checkpoint_files(folder)
    keys = _source_keys(model, stored, folder)
    seen: set[int] = set()
    for module in model.modules():
        params = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in params)
        if not params:
            continue
        with gathered(params, modifier_rank=0):
            if rank == 0:
                values = read_tensors(stored, (keys[id(p)] for p in params))
                for p in params:
                    key = keys[id(p)]
                    value = values[key]
                    if value.shape != p.shape:
                        raise ValueError(f"{stored[key]}: {key} is {tuple(value.shape)}"
                                         f", the model's parameter {tuple(p.shape)}")
                    p.data.copy_(value.to(p.dtype))
    buffers = dict(model.named_buffers())
    for name, value in read_tensors(stored, (n for n in buffers if n in stored)).items():
        buffers[name].copy_(value.to(buffers[name]))


def zero_init_dtype(ds_config: Mapping[str, Any]) -> torch.dtype:
    """The dtype ``deepspeed.zero.Init`` gives parameters under ``ds_config``: the engine's
    16-bit type when one is enabled, else float32 (what the engine computes in)."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def load_partitioned(folder: Path, ds_config: Mapping[str, Any]) -> Any:
    """The causal LM in ``folder`` (a plain HF folder, safetensors) built partitioned under
    ZeRO-3 with ``ds_config`` (the training engine's DeepSpeed config) and filled from the
    checkpoint, in eval mode, in the engine's precision (:func:`zero_init_dtype`). A
    collective: every rank of the group calls it. Its parameters are placed where ZeRO-3
    keeps them (the rank's accelerator, or the CPU with ``offload_param``)."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if dist.is_initialized():  # DeepSpeed's own view of the group (its config reads the
        # world size from it); deepspeed.initialize later finds it set up
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False,
                                   verbose=False, dist_init_required=False)
    config = AutoConfig.from_pretrained(folder)
    dtype = zero_init_dtype(ds_config)
    # prevent_arange_dtype_change: zero.Init casts new float tensors to its dtype, which
    # would round the RoPE frequencies (transformers enters it before zero.Init too). The
    # dtype comes from the config, not the dtype argument, which DeepSpeed 0.19 ignores on
    # an accelerator without float16 (the CPU).
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(
            config_dict_or_path=copy.deepcopy(dict(ds_config))):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fill_partitioned(model, folder)
    return model.eval()


def place_unpartitioned(module: nn.Module, device: torch.device | str) -> nn.Module:
    """``module.to(device)`` for what ZeRO-3 does not manage: ordinary parameters (trainable
    parts added after a partitioned load) and buffers; partitioned parameters stay where
    ZeRO-3 keeps them. On a model without partitioned parameters it is ``module.to``."""
    if not any(is_partitioned(p) for p in module.parameters()):
        return module.to(device)
    for m in module.modules():
        for p in m.parameters(recurse=False):
            if not is_partitioned(p):
                p.data = p.data.to(device)
        for name, buf in m.named_buffers(recurse=False):
            if buf is not None:
                m._buffers[name] = buf.to(device)
    return module


def _units(model: nn.Module) -> list[nn.Module]:
    """What :func:`gathered_forward` gathers at once: each decoder block (the first
    ``layers`` list: a causal LM's, also inside wrappers), and each other module with
    parameters of its own (embeddings, final norm, LM head)."""
    blocks = next((list(m.layers) for m in model.modules()
                   if isinstance(getattr(m, "layers", None), nn.ModuleList)), [])
    inside = {id(m) for b in blocks for m in b.modules()}
    rest = [m for m in model.modules()
            if id(m) not in inside and any(True for _ in m.parameters(recurse=False))]
    return blocks + rest


@contextlib.contextmanager
def gathered_forward(model: nn.Module) -> Iterator[nn.Module]:
    """Inside, calling ``model`` (inference, no gradients) gathers each unit's partitioned
    parameters (:func:`_units`) for that unit's own call and partitions them right after, so
    a rank holds its partition plus one block. Every rank must run the same forwards (each
    gather is a collective). A model without partitioned parameters runs as it is."""
    if not any(is_partitioned(p) for p in model.parameters()):
        yield model
        return
    import deepspeed

    open_: dict[int, Any] = {}

    def enter(unit: nn.Module, _args: Any) -> None:
        ctx = deepspeed.zero.GatheredParameters(list(unit.parameters()), modifier_rank=None)
        ctx.__enter__()
        open_[id(unit)] = ctx

    def leave(unit: nn.Module, _args: Any, _out: Any) -> None:
        open_.pop(id(unit)).__exit__(None, None, None)

    handles = []
    for unit in _units(model):
        handles.append(unit.register_forward_pre_hook(enter))
        handles.append(unit.register_forward_hook(leave))
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for ctx in open_.values():  # a forward that raised left its unit gathered
            ctx.__exit__(None, None, None)
        open_.clear()


__all__ = ("checkpoint_files", "fill_partitioned", "full_numel", "full_shape", "gathered",
           "gathered_forward", "is_partitioned", "load_partitioned", "place_unpartitioned",
           "read_tensors", "zero_init_dtype")

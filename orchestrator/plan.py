"""``recoup plan``: memory, disk and GPUs of every stage, from the model's config alone.

The model is built on the ``meta`` device (shapes, no weights), so planning a 70B run
takes seconds on a laptop. Each stage declares its own estimate beside its code
(``register_stage(estimate=...)``, records in :mod:`recoup.orchestrator.estimate`); this
module finds the model's shape, loops over the stages of the pipeline and prints the
figures with their parts, so that each can be checked by hand. A stage without an
estimate is printed as "no estimate", never skipped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from recoup.orchestrator.estimate import (
    DEFAULT_GPU_MEMORY_GB,
    DEFAULT_GPUS_PER_NODE,
    DEFAULT_HEADROOM,
    GB,
    EstimateInputs,
    Hardware,
    ModelShape,
    StageEstimate,
    gb,
)
from recoup.orchestrator.runconfig import RunConfig
from recoup.orchestrator.stage import get_stage, registered_stages
from recoup.stages.model import modelio

__all__ = (
    "BUILTIN_SHAPES",
    "DEFAULT_GPUS_PER_NODE",
    "DEFAULT_GPU_MEMORY_GB",
    "DEFAULT_HEADROOM",
    "GB",
    "Hardware",
    "ModelShape",
    "StageEstimate",
    "builtin_shape",
    "format_plan",
    "nodes_from_cluster_yaml",
    "plan_stages",
    "resolve_model",
    "shape_from_config",
)

#: Public model shapes (the ``config.json`` of the Hugging Face checkpoints), so that a
#: run on a cluster can be planned on a laptop without the weights.
BUILTIN_SHAPES: dict[str, dict[str, Any]] = {
    "Llama-2-7b-hf": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                          max_position_embeddings=4096, tie_word_embeddings=False),
    "Llama-2-13b-hf": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                           num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                           max_position_embeddings=4096, tie_word_embeddings=False),
    "Llama-2-70b-hf": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                           max_position_embeddings=4096, tie_word_embeddings=False),
    modelio.SMOLLM2_ALIAS: dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                max_position_embeddings=8192, tie_word_embeddings=True),
}


# --------------------------------------------------------------------------- the model


def _llama_config(fields: Mapping[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**fields)


def shape_from_config(hf_config: Any, *, name: str, origin: str, dtype: str) -> ModelShape:
    """Count parameters of ``hf_config``'s causal LM built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    modelio.check_supported(hf_config, name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    block = model.model.layers[0]
    linears = tuple((n, m.out_features, m.in_features) for n, m in block.named_modules()
                    if isinstance(m, torch.nn.Linear))
    params = sum(p.numel() for p in model.parameters())  # tied weights counted once
    return ModelShape(
        name=name, origin=origin,
        card=modelio.card_from_config(hf_config, dtype, params),
        params=params, block_params=sum(p.numel() for p in block.parameters()),
        block_linears=linears,
    )


@lru_cache(maxsize=8)
def builtin_shape(name: str, dtype: str) -> ModelShape:
    key = _builtin_key(name)
    if key is None:
        raise ValueError(f"no built-in model shape {name!r}; built in: "
                         f"{', '.join(BUILTIN_SHAPES)}")
    return shape_from_config(_llama_config(BUILTIN_SHAPES[key]), name=key,
                             origin="built-in shape", dtype=dtype)


def _builtin_key(name: str) -> str | None:
    low = name.lower()
    return next((k for k in BUILTIN_SHAPES if k.lower() == low), None)


def _hf_config_at(path: Path) -> Any:
    from transformers import AutoConfig

    folder = path.parent if path.is_file() else path
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def resolve_model(cfg: RunConfig, model: str | None = None) -> ModelShape:
    """The shape of the model a run config prepares, or of ``model`` when given.

    ``model`` (or, unset, ``prepare.source``) may be a built-in shape name, a Hugging Face
    folder or its ``config.json``, or the aliases ``tiny-llama`` / ``smollm2-135m``. A
    ``prepare.source`` folder that is not on this machine (``/models/Llama-2-13b-hf`` on a
    laptop) is matched to a built-in shape by its folder name.
    """
    dtype = cfg.prepare.dtype
    if model is not None:
        if _builtin_key(model):
            return builtin_shape(model, dtype)
        path = Path(model)
        if (path / "config.json").is_file() or (path.is_file() and path.suffix == ".json"):
            return shape_from_config(_hf_config_at(path), name=path.name, origin=str(path),
                                     dtype=dtype)
        raise ValueError(f"--model {model!r} is neither a built-in shape "
                         f"({', '.join(BUILTIN_SHAPES)}) nor a Hugging Face config.json/folder")
    source = cfg.prepare.source
    if source == modelio.TINY_ALIAS:
        t = cfg.prepare.tiny
        fields = dict(hidden_size=t.hidden, intermediate_size=t.intermediate,
                      num_hidden_layers=t.layers, num_attention_heads=t.heads,
                      num_key_value_heads=t.kv_heads, max_position_embeddings=t.max_positions,
                      vocab_size=len(modelio.byte_tokenizer()), tie_word_embeddings=False)
        return shape_from_config(_llama_config(fields), name=source,
                                 origin="prepare.tiny", dtype=dtype)
    path = Path(source)
    if (path / "config.json").is_file():
        return shape_from_config(_hf_config_at(path), name=path.name, origin=source, dtype=dtype)
    key = _builtin_key(source) or _builtin_key(path.name)
    if key is not None:
        where = "" if key == source else f"; prepare.source {source} is not on this machine"
        return replace(builtin_shape(key, dtype), origin=f"built-in shape{where}")
    raise ValueError(
        f"cannot tell the shape of prepare.source {source!r} without loading it; pass "
        f"--model with a built-in shape ({', '.join(BUILTIN_SHAPES)}) or a config.json"
    )


# --------------------------------------------------------------------------- hardware


def nodes_from_cluster_yaml(config: Mapping[str, Any]) -> list[dict[str, float]]:
    """Resources of every node a Ray cluster-launcher config can start: the head, and each
    worker type times its ``max_workers`` (the global ``max_workers`` caps the total)."""
    types = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    budget = int(config.get("max_workers", 0))
    nodes: list[dict[str, float]] = []
    for name, t in types.items():
        res = {k: float(v) for k, v in (t.get("resources") or {}).items()}
        if not res:
            raise ValueError(f"node type {name!r} declares no `resources`; recoup plan needs "
                             "them spelled out (e.g. {CPU: 96, GPU: 8})")
        if name == head:
            nodes.append(res)
            continue
        count = min(int(t.get("max_workers", budget)), budget)
        budget -= count
        nodes += [dict(res) for _ in range(count)]
    return nodes


# --------------------------------------------------------------------------- the plan


def no_estimate(stage: str) -> StageEstimate:
    """The row of a stage that declares no estimate: listed, its figures unknown."""
    return StageEstimate(stage=stage, workers=1, device_bytes=None, host_bytes=None,
                         disk_bytes=None, gpus_config=0, gpus_min=None, fits=True,
                         estimated=False, notes=("no estimate",))


def plan_stages(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> list[StageEstimate]:
    """An estimate for each stage of ``cfg.run.pipeline``, in order; "no estimate" for a
    stage that declares none."""
    sections = {name: getattr(cfg, spec.config_key)
                for name, spec in registered_stages().items() if hasattr(cfg, spec.config_key)}
    out = []
    for name in cfg.run.pipeline:
        spec = get_stage(name)
        if spec.estimate is None:
            out.append(no_estimate(name))
            continue
        out.append(spec.estimate(EstimateInputs(
            stage=name, shape=shape, config=spec.config_of(cfg), cluster=cfg.cluster,
            hardware=hw, device=cfg.run.device, pipeline=cfg.run.pipeline, sections=sections,
        )))
    return out


# --------------------------------------------------------------------------- report


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _gpus(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


def format_plan(cfg: RunConfig, shape: ModelShape, hw: Hardware,
                estimates: Sequence[StageEstimate]) -> str:
    card = shape.card
    lines = [
        f"model: {shape.name} ({shape.origin})",
        f"  {_count(shape.params)} parameters, {card.dtype}: weights "
        f"{gb(shape.weights_bytes)}; one decoder block {_count(shape.block_params)} "
        f"= {gb(shape.block_bytes)}",
        f"  {card.layers} layers x {card.heads} heads x d_head {card.d_head} "
        f"({card.kv_heads} KV heads), hidden {card.hidden}, MLP {card.intermediate}, "
        f"vocab {card.vocab}",
        f"GPU: {hw.gpu_bytes / GB:g} GB, {100 * (1 - hw.headroom):.0f}% usable = "
        f"{gb(hw.usable)}; "
        + (f"nodes from {hw.nodes_origin}" if hw.nodes is not None
           else f"{hw.gpus_per_node} GPUs per node")
        + "  (1 GB = 1e9 bytes)",
        "",
    ]
    header = ("stage", "workers", "device/worker", "host/worker", "disk", "GPUs(config)",
              "GPUs(min)", "fits")
    rows = [(e.stage, str(e.workers), gb(e.device_bytes), gb(e.host_bytes), gb(e.disk_bytes),
             _gpus(e.gpus_config), _gpus(e.gpus_min),
             "?" if not e.estimated else "yes" if e.fits else "NO")
            for e in estimates]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    peak = max((e.gpus_config for e in estimates), default=0)
    least = max((e.gpus_min or 0 for e in estimates), default=0)
    disk = sum(e.disk_bytes or 0 for e in estimates)
    lines += ["", f"GPUs at once: {peak:g} as configured, {least} at least (stages run one "
              f"after another); disk written: {gb(disk)} (stages with a known size)"]
    blocked = [e.stage for e in estimates if not e.fits]
    if blocked:
        lines.append(f"does not fit as configured: {', '.join(blocked)} (see the notes)")
    unknown = [e.stage for e in estimates if not e.estimated]
    if unknown:
        lines.append(f"no estimate: {', '.join(unknown)} (not in the totals above)")
    for e in estimates:
        if not e.parts and not e.notes:
            continue
        lines.append("")
        lines.append(f"{e.stage}:")
        lines += [f"  {gb(v):>9}  {k}" for k, v in e.parts.items()]
        lines += [f"  note: {n}" for n in e.notes]
    if cfg.run.device == "cpu":
        lines += ["", "run.device is cpu: 'device' memory is host memory on this run; the "
                      "GPU counts are what a GPU run would need"]
    return "\n".join(lines)

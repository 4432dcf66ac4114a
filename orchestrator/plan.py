"""``recoup plan``: memory, disk and GPUs of every stage, from the model's config alone.

The model is built on the ``meta`` device (shapes, no weights), so planning a 70B run
takes seconds on a laptop. Every figure is a sum of named parts, each a product of model
dimensions and config values; :func:`format_plan` prints the parts so that a figure can
be checked by hand. The figures are estimates of what recoup's own code holds at its
peak, not allocator readings: they leave out CUDA context, allocator fragmentation and
library workspaces, which the ``headroom`` fraction of each GPU is kept for.

Units: 1 GB = 10**9 bytes throughout (an "80 GB" GPU is taken as 80e9 bytes, about 7%
less than its 80 GiB, which errs on the safe side).

Where the code holds (one line per stage, see the ``*_parts`` functions):

- prepare: the model in host memory (dtype ``prepare.dtype``), written once.
- degrade: the whole model in host memory, one decoder block on the device plus the
  calibration activations (N x seq x hidden), the input statistics (float64: norms for
  wanda, Hessians for sparsegpt) and sparsegpt's per-linear solve.
- collect: per worker, the dense and the degraded model both resident, one layer's forward
  working set for a batch; on disk layers x heads x d_head x 4 views x itemsize per sample.
- svd / select: one CPU task per layer holding that layer's four views.
- train: per GPU under ZeRO-3, the frozen weights / world size, two gathered blocks, the
  trainable parameters with their Adam states, and the activations kept for backward for
  micro_batch x max_seq_len tokens through every layer (frozen linears keep no inputs).
- evaluate: the dense, degraded (and recovered) models together on one device, the KV
  cache and the logits of a batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from recoup.cluster.engine import use_bf16
from recoup.cluster.placement import placement_problem, worker_group
from recoup.orchestrator.runconfig import RunConfig
from recoup.stages.collect import activation_bytes_per_sample
from recoup.stages.compress.pruning import DEFAULT_STAT_DTYPE
from recoup.stages.lcc.activations import VIEWS
from recoup.stages.model import modelio

GB = 1e9
DEFAULT_GPU_MEMORY_GB = 80.0
DEFAULT_HEADROOM = 0.10
"""Share of each GPU left for the CUDA context, allocator fragmentation and kernels."""
DEFAULT_GPUS_PER_NODE = 8
ADAM_BYTES_PER_PARAM = 16
"""Mixed-precision Adam per trainable parameter: 16-bit weight and gradient (2 + 2), fp32
master weight and two fp32 moments (4 + 4 + 4), as in the ZeRO paper."""
ZERO3_LIVE_BLOCKS = 2
"""Decoder blocks whose weights ZeRO-3 holds gathered at once (the running one and the
prefetched next one)."""
FP32 = 4
STAT_ITEMSIZE = torch.empty(0, dtype=DEFAULT_STAT_DTYPE).element_size()
MAX_WORLD_SIZE = 4096
"""Largest training world size :func:`min_world_size` tries."""

_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
_LCC_METHODS = ("lcc", "lcc+lora")
_LORA_METHODS = ("lora", "lcc+lora")

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


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Parameter counts of a model, from its config on the meta device."""

    name: str
    #: how the shape was found, for the report
    origin: str
    card: modelio.ModelCard
    params: int
    block_params: int
    #: (name in the block, out_features, in_features) of each linear of one decoder block
    block_linears: tuple[tuple[str, int, int], ...]

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.card.dtype]

    @property
    def weights_bytes(self) -> int:
        return self.params * self.itemsize

    @property
    def block_bytes(self) -> int:
        return self.block_params * self.itemsize

    @property
    def linear_params(self) -> int:
        """Elements of every decoder block's linear weights: what degrade prunes."""
        return self.card.layers * sum(o * i for _, o, i in self.block_linears)


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


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """The GPUs a plan is made for."""

    gpu_bytes: float = DEFAULT_GPU_MEMORY_GB * GB
    headroom: float = DEFAULT_HEADROOM
    gpus_per_node: int = DEFAULT_GPUS_PER_NODE
    #: resources of every node the cluster can have (from a cluster YAML); None: any number
    #: of nodes with ``gpus_per_node`` GPUs
    nodes: tuple[Mapping[str, float], ...] | None = None
    nodes_origin: str = ""

    @property
    def usable(self) -> float:
        return self.gpu_bytes * (1.0 - self.headroom)


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


# --------------------------------------------------------------------------- pure figures


def gpus_for(nbytes: float, usable: float) -> int:
    """GPUs whose usable memory holds ``nbytes`` split evenly (at least 1 if any bytes)."""
    if nbytes <= 0:
        return 0
    return max(1, math.ceil(nbytes / usable))


def chosen_heads(cfg: RunConfig, card: modelio.ModelCard) -> int:
    """Heads the select stage keeps (same rounding as ``HeadScores.top``)."""
    sel = cfg.select.selector
    total = card.layers * card.heads
    if sel.top_count is not None:
        return min(sel.top_count, total)
    assert sel.top_fraction is not None
    return max(1, math.floor(sel.top_fraction * total + 0.5))


def forward_working_bytes(card: modelio.ModelCard, tokens: int, itemsize: int) -> int:
    """Transient tensors of one decoder layer's forward over ``tokens`` tokens: residual,
    normed input, q and attention output, k and v, and gate, up and their product."""
    per_token = 4 * card.hidden + 2 * card.kv_heads * card.d_head + 3 * card.intermediate
    return tokens * per_token * itemsize


def degrade_parts(shape: ModelShape, cfg: RunConfig) -> dict[str, int]:
    """Device bytes of the block-by-block degrade driver (see :mod:`stages.blockwise`)."""
    d = cfg.degrade
    card, item = shape.card, shape.itemsize
    parts = {"one decoder block": shape.block_bytes}
    calibrated = d.method in ("wanda", "sparsegpt")
    if calibrated:
        n, seq = d.calibration.num_samples, d.calibration.seq_len
        parts["calibration activations (N x seq x hidden)"] = n * seq * card.hidden * item
        parts["block working set (one micro-batch)"] = forward_working_bytes(
            card, min(d.micro_batch, n) * seq, item)
        inputs = _stat_inputs(shape)
        if d.method == "wanda":
            parts["input norms (float64)"] = STAT_ITEMSIZE * sum(inputs)
        else:
            parts["Hessians (float64, one per input)"] = STAT_ITEMSIZE * sum(i * i for i in inputs)
            parts["sparsegpt solve (largest linear)"] = max(
                3 * STAT_ITEMSIZE * i * i + FP32 * i * i + (FP32 + 1) * o * i
                for _, o, i in shape.block_linears)
    return parts


def _stat_inputs(shape: ModelShape) -> list[int]:
    """in_features of each distinct linear input of a block (q/k/v share one, gate/up one)."""
    by_name = {n.rsplit(".", 1)[-1]: i for n, _, i in shape.block_linears}
    groups = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
              ("down_proj",))
    return [by_name[g[0]] for g in groups if g[0] in by_name]


def collect_parts(shape: ModelShape, cfg: RunConfig) -> dict[str, int]:
    """Device bytes of one collect worker: both models, and a batch's forward working set
    at ``data.max_length`` tokens (no KV cache, no logits: the decoder runs alone)."""
    tokens = cfg.collect.batch_size * cfg.data.max_length
    return {
        "dense + degraded weights": 2 * shape.weights_bytes,
        "forward working set (batch x max_length)": forward_working_bytes(
            shape.card, tokens, shape.itemsize),
    }


def train_token_layer_bytes(card: modelio.ModelCard, itemsize: int) -> int:
    """Bytes one token keeps for backward in one decoder layer whose linears are frozen.

    A frozen linear needs only its weight to pass gradients to its input, so it keeps no
    activation. What stays: each RMSNorm's float32 input (2 x hidden x 4), the SDPA inputs
    and output (q, k, v expanded to every head, out: 4 x heads x d_head), and the MLP's
    gate, up and SiLU(gate) (3 x intermediate).
    """
    attn = 4 * card.heads * card.d_head
    return 2 * card.hidden * FP32 + itemsize * (attn + 3 * card.intermediate)


def lora_parts(shape: ModelShape, cfg: RunConfig, itemsize: int) -> tuple[int, int]:
    """(trainable LoRA parameters, extra activation bytes per token) of the adapted layers."""
    lora = cfg.train.lora
    layers = lora.auto_layers if lora.layers == "auto" else len(lora.layers)
    targets = [(o, i) for n, o, i in shape.block_linears if n.rsplit(".", 1)[-1] in lora.targets]
    params = layers * sum(lora.rank * (o + i) for o, i in targets)
    # An adapted linear's input is kept for A's gradient; q/k/v and gate/up share theirs.
    inputs = {i for n, _, i in shape.block_linears if n.rsplit(".", 1)[-1] in lora.targets}
    per_token = layers * itemsize * (sum(inputs) + lora.rank * len(targets))
    return params, per_token


def train_parts(shape: ModelShape, cfg: RunConfig, world_size: int) -> dict[str, int]:
    """Device bytes of one training worker (one GPU) under the configured ZeRO stage."""
    eng, card = cfg.train.engine, shape.card
    item = 2 if use_bf16(eng, "cuda") else FP32
    tokens = eng.micro_batch * cfg.train.max_seq_len
    parts: dict[str, int] = {}
    frozen = shape.params * item
    if eng.zero_stage == 3 and eng.offload_params:
        parts["frozen weights (offloaded to CPU)"] = 0
    elif eng.zero_stage == 3:
        parts["frozen weights / world size (ZeRO-3)"] = math.ceil(frozen / world_size)
        parts[f"{ZERO3_LIVE_BLOCKS} gathered blocks (ZeRO-3)"] = (
            ZERO3_LIVE_BLOCKS * shape.block_params * item)
    else:
        parts["frozen weights (ZeRO-2 keeps them whole)"] = frozen
    trainable = 0
    extra_per_token = 0
    if cfg.train.method in _LCC_METHODS:
        heads = chosen_heads(cfg, card)
        trainable += heads * 2 * card.d_head  # beta and b per chosen head
        parts["V of the chosen heads (float32)"] = heads * card.d_head * card.d_head * FP32
    if cfg.train.method in _LORA_METHODS:
        lora_params, extra_per_token = lora_parts(shape, cfg, item)
        trainable += lora_params
    # ZeRO-2 keeps the 16-bit trainable weights whole and shards grads and Adam states;
    # ZeRO-3 shards all of it. Offloading moves the fp32 master and moments to the CPU.
    whole = item if eng.zero_stage == 2 else 0
    sharded = ADAM_BYTES_PER_PARAM - whole - (3 * FP32 if eng.offload_optimizer else 0)
    parts["trainable params + grads + Adam"] = (
        trainable * whole + math.ceil(trainable * sharded / world_size))
    per_token = card.layers * train_token_layer_bytes(card, item) + extra_per_token
    parts["activations for backward (all layers)"] = tokens * per_token
    parts["logits (16-bit, float32 log-softmax and its grad)"] = tokens * card.vocab * (
        item + 2 * FP32)
    if cfg.train.loss.kl_weight > 0:
        parts["teacher: dense model, whole on every worker"] = shape.weights_bytes
        parts["teacher logits"] = tokens * card.vocab * (item + FP32)
    return parts


def min_world_size(shape: ModelShape, cfg: RunConfig, usable: float) -> int | None:
    """Fewest training workers whose per-GPU bytes fit ``usable``; None if none does."""
    if sum(train_parts(shape, cfg, MAX_WORLD_SIZE).values()) > usable:
        return None
    lo, hi = 1, MAX_WORLD_SIZE
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(train_parts(shape, cfg, mid).values()) <= usable:
            hi = mid
        else:
            lo = mid + 1
    return lo


def evaluate_parts(shape: ModelShape, cfg: RunConfig) -> dict[str, int]:
    """Device bytes of evaluate: every compared model resident, KV cache, two logits."""
    e, card, item = cfg.evaluate, shape.card, shape.itemsize
    models = 3 if "export" in cfg.run.pipeline else 2
    tokens = e.batch_size * e.seq_len
    return {
        f"{models} models (dense, degraded{', recovered' if models == 3 else ''})":
            models * shape.weights_bytes,
        "KV cache of a batch": 2 * card.layers * tokens * card.kv_heads * card.d_head * item,
        "forward working set": forward_working_bytes(card, tokens, item),
        "logits of dense and model, float32 log-softmax of both": tokens * card.vocab * (
            2 * item + 2 * FP32),
    }


def collect_samples(cfg: RunConfig) -> int | None:
    """Samples collect processes: the data stage's ``num_samples`` (None: all records)."""
    return cfg.data.source.num_samples


def layer_task_host_bytes(card: modelio.ModelCard, samples: int) -> int:
    """Host bytes of one svd/select layer task: the layer's four views as float32 and a
    float64 difference of two of them."""
    row = card.heads * card.d_head
    return samples * row * (len(VIEWS) * FP32 + STAT_ITEMSIZE)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, kw_only=True)
class StageEstimate:
    stage: str
    #: workers (or tasks) the stage runs at once as configured
    workers: int
    #: device bytes per worker; None for a stage that runs on CPUs only
    device_bytes: int | None
    host_bytes: int | None
    disk_bytes: int | None
    #: GPUs the stage occupies as configured, and the fewest it could run on
    gpus_config: float
    gpus_min: int | None
    fits: bool
    parts: Mapping[str, int] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _placement_note(hw: Hardware, bundles: list[dict[str, float]]) -> str | None:
    if not bundles or not any(b.get("GPU", 0) for b in bundles):
        return None
    if hw.nodes is not None:
        problem = placement_problem(hw.nodes, bundles)
        return None if problem is None else f"does not fit {hw.nodes_origin}: {problem}"
    per = max(b.get("GPU", 0) for b in bundles)
    if per > hw.gpus_per_node:
        return f"one worker asks {per:g} GPUs, more than a node's {hw.gpus_per_node}"
    return None


def plan_stages(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> list[StageEstimate]:
    """An estimate for each stage of ``cfg.run.pipeline``, in order."""
    out = []
    for stage in cfg.run.pipeline:
        fn = _PLANNERS.get(stage)
        if fn is not None:
            out.append(fn(cfg, shape, hw))
    return out


def _on_gpu(cfg: RunConfig) -> bool:
    return cfg.run.device.startswith("cuda")


def _single(cfg: RunConfig, stage: str) -> tuple[float, float]:
    return cfg.cluster.resources_for(stage)


def _plan_prepare(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    _, gpus = _single(cfg, "prepare")
    return StageEstimate(stage="prepare", workers=1, device_bytes=None,
                         host_bytes=shape.weights_bytes, disk_bytes=shape.weights_bytes,
                         gpus_config=gpus, gpus_min=0, fits=True,
                         notes=("loads and saves the model on the CPU",))


def _plan_degrade(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    cpus, gpus = _single(cfg, "degrade")
    parts = degrade_parts(shape, cfg)
    dev = sum(parts.values())
    prunes = cfg.degrade.method in ("magnitude", "wanda", "sparsegpt")
    masks = shape.linear_params if prunes else 0
    notes = []
    fits = dev <= hw.usable
    if not fits:
        notes.append("one block and its calibration data exceed one GPU: lower "
                     "degrade.calibration.num_samples or seq_len")
    if gpus < 1 and cfg.run.device != "cpu":
        notes.append("set cluster.stages.degrade.gpus=1 (its task asks for no GPU)")
    note = _placement_note(hw, [{"CPU": cpus, "GPU": max(gpus, 1)}])
    if note:
        notes.append(note)
        fits = False
    if masks:
        notes.append("host: the whole model plus bool keep-masks of every linear weight")
    return StageEstimate(stage="degrade", workers=1, device_bytes=dev,
                         host_bytes=shape.weights_bytes + masks,
                         disk_bytes=shape.weights_bytes + masks, gpus_config=gpus,
                         gpus_min=1 if dev <= hw.usable else None, fits=fits, parts=parts,
                         notes=tuple(notes))


def _plan_data(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    return StageEstimate(stage="data", workers=1, device_bytes=None, host_bytes=None,
                         disk_bytes=None, gpus_config=_single(cfg, "data")[1], gpus_min=0,
                         fits=True, notes=("CPU: tokenizer and the MiniLM encoder; its size "
                                           "does not depend on the model",))


def _plan_collect(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    c = cfg.collect
    parts = collect_parts(shape, cfg)
    dev = sum(parts.values())
    need = gpus_for(dev, hw.usable)
    per_sample = activation_bytes_per_sample(shape.card, c.dtype)
    n = collect_samples(cfg)
    notes = [f"activations on disk: {per_sample / 1e6:.2f} MB per sample "
             f"({shape.card.layers} layers x {shape.card.heads} heads x {shape.card.d_head} "
             f"x {len(VIEWS)} views x {_ITEMSIZE[c.dtype]} B)"]
    if n is None:
        notes.append("data.source.num_samples is unset (all records): disk total unknown")
    fits = c.num_gpus_per_worker >= need or not _on_gpu(cfg)
    if c.num_gpus_per_worker < need and _on_gpu(cfg):
        notes.append(f"needs {need} GPUs per worker (both models resident): set "
                     f"collect.num_gpus_per_worker={need}")
    gpw = max(c.num_gpus_per_worker, float(need))
    cpus = c.num_cpus_per_worker or 1.0
    note = _placement_note(hw, worker_group(c.workers, gpus=gpw, cpus=cpus))
    if note:
        notes.append(note)
        fits = False
    return StageEstimate(stage="collect", workers=c.workers, device_bytes=dev,
                         host_bytes=shape.weights_bytes,
                         disk_bytes=None if n is None else n * per_sample,
                         gpus_config=c.workers * c.num_gpus_per_worker, gpus_min=need,
                         fits=fits, parts=parts, notes=tuple(notes))


def _plan_layer_tasks(stage: str) -> Any:
    def plan(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
        section = getattr(cfg, stage)
        card = shape.card
        n = collect_samples(cfg)
        host = None if n is None else layer_task_host_bytes(card, n)
        disk = None
        notes = [f"{card.layers} CPU tasks (one per layer), {section.cpus_per_task:g} CPUs "
                 f"each, {section.workers or card.layers} at once"]
        if stage == "svd" and n is not None:
            r = min(n, card.d_head)
            disk = card.layers * card.heads * (card.d_head ** 2 * _ITEMSIZE[cfg.svd.dtype]
                                               + r * FP32)
        if stage == "select" and cfg.select.selector.method == "kl":
            notes.append("the kl selector runs the degraded model: not estimated here")
        return StageEstimate(stage=stage, workers=section.workers or card.layers,
                             device_bytes=None, host_bytes=host, disk_bytes=disk,
                             gpus_config=0, gpus_min=0, fits=True, notes=tuple(notes))

    return plan


def _plan_train(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    eng = cfg.train.engine
    w = eng.workers
    parts = train_parts(shape, cfg, w)
    dev = sum(parts.values())
    least = min_world_size(shape, cfg, hw.usable)
    notes = []
    fits = dev <= hw.usable
    if not fits:
        notes.append(f"{w} workers are too few: train.engine.workers >= {least}"
                     if least else "does not fit at any world size")
    load_peak = shape.weights_bytes
    if load_peak > hw.usable and _on_gpu(cfg):
        fits = False
        least = None
        notes.append(f"load peak {load_peak / GB:.1f} GB per GPU: each worker loads the whole "
                     "model onto its GPU before ZeRO-3 partitions it; needs a partitioned "
                     "load (deepspeed.zero.Init / meta-device init)")
    note = _placement_note(hw, worker_group(w, gpus=1, cpus=eng.cpus_per_worker))
    if note:
        notes.append(note)
        fits = False
    notes.append(f"host: {shape.weights_bytes / GB:.1f} GB per worker while loading "
                 f"({hw.gpus_per_node} workers per node: "
                 f"{hw.gpus_per_node * shape.weights_bytes / GB:.0f} GB per node)")
    return StageEstimate(stage="train", workers=w, device_bytes=dev,
                         host_bytes=shape.weights_bytes, disk_bytes=None,
                         gpus_config=w if _on_gpu(cfg) else 0, gpus_min=least, fits=fits,
                         parts=parts, notes=tuple(notes))


def _plan_export(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    return StageEstimate(stage="export", workers=1, device_bytes=None,
                         host_bytes=2 * shape.weights_bytes, disk_bytes=shape.weights_bytes,
                         gpus_config=_single(cfg, "export")[1], gpus_min=0, fits=True,
                         notes=("CPU: the degraded model, folded, then reloaded to check it",))


def _plan_evaluate(cfg: RunConfig, shape: ModelShape, hw: Hardware) -> StageEstimate:
    cpus, gpus = _single(cfg, "evaluate")
    parts = evaluate_parts(shape, cfg)
    dev = sum(parts.values())
    fits = dev <= hw.usable
    notes = []
    if not fits:
        notes.append(f"needs {gpus_for(dev, hw.usable)} GPUs' memory, but evaluate runs all "
                     "models on one device (model parallelism or one model at a time needed)")
    if gpus < 1 and cfg.run.device != "cpu":
        notes.append("set cluster.stages.evaluate.gpus=1 (its task asks for no GPU)")
    zs = cfg.evaluate.zeroshot
    if zs.tasks:
        notes.append(f"zero-shot: {zs.shards} shard tasks per model, each loading one model "
                     f"({_gb(shape.weights_bytes)})")
    return StageEstimate(stage="evaluate", workers=1, device_bytes=dev,
                         host_bytes=shape.weights_bytes, disk_bytes=None, gpus_config=gpus,
                         gpus_min=1 if fits else None, fits=fits, parts=parts,
                         notes=tuple(notes))


_PLANNERS = {
    "prepare": _plan_prepare, "degrade": _plan_degrade, "data": _plan_data,
    "collect": _plan_collect, "svd": _plan_layer_tasks("svd"),
    "select": _plan_layer_tasks("select"), "train": _plan_train, "export": _plan_export,
    "evaluate": _plan_evaluate,
}


# --------------------------------------------------------------------------- report


def _gb(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GB:.1f} GB" if n >= 0.05 * GB else f"{n / 1e6:.1f} MB"


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
        f"{_gb(shape.weights_bytes)}; one decoder block {_count(shape.block_params)} "
        f"= {_gb(shape.block_bytes)}",
        f"  {card.layers} layers x {card.heads} heads x d_head {card.d_head} "
        f"({card.kv_heads} KV heads), hidden {card.hidden}, MLP {card.intermediate}, "
        f"vocab {card.vocab}",
        f"GPU: {hw.gpu_bytes / GB:g} GB, {100 * (1 - hw.headroom):.0f}% usable = "
        f"{_gb(hw.usable)}; "
        + (f"nodes from {hw.nodes_origin}" if hw.nodes is not None
           else f"{hw.gpus_per_node} GPUs per node")
        + "  (1 GB = 1e9 bytes)",
        "",
    ]
    header = ("stage", "workers", "device/worker", "host/worker", "disk", "GPUs(config)",
              "GPUs(min)", "fits")
    rows = [(e.stage, str(e.workers), _gb(e.device_bytes), _gb(e.host_bytes), _gb(e.disk_bytes),
             _gpus(e.gpus_config), _gpus(e.gpus_min), "yes" if e.fits else "NO")
            for e in estimates]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines += [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    peak = max((e.gpus_config for e in estimates), default=0)
    least = max((e.gpus_min or 0 for e in estimates), default=0)
    disk = sum(e.disk_bytes or 0 for e in estimates)
    lines += ["", f"GPUs at once: {peak:g} as configured, {least} at least (stages run one "
              f"after another); disk written: {_gb(disk)} (stages with a known size)"]
    blocked = [e.stage for e in estimates if not e.fits]
    if blocked:
        lines.append(f"does not fit as configured: {', '.join(blocked)} (see the notes)")
    for e in estimates:
        if not e.parts and not e.notes:
            continue
        lines.append("")
        lines.append(f"{e.stage}:")
        lines += [f"  {_gb(v):>9}  {k}" for k, v in e.parts.items()]
        lines += [f"  note: {n}" for n in e.notes]
    if cfg.run.device == "cpu":
        lines += ["", "run.device is cpu: 'device' memory is host memory on this run; the "
                      "GPU counts are what a GPU run would need"]
    return "\n".join(lines)


__all__ = (
    "BUILTIN_SHAPES",
    "GB",
    "Hardware",
    "ModelShape",
    "StageEstimate",
    "chosen_heads",
    "collect_parts",
    "degrade_parts",
    "evaluate_parts",
    "format_plan",
    "gpus_for",
    "min_world_size",
    "nodes_from_cluster_yaml",
    "plan_stages",
    "resolve_model",
    "shape_from_config",
    "train_parts",
    "train_token_layer_bytes",
)

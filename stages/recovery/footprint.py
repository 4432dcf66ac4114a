"""What the train stage holds, for ``recoup plan``: pure arithmetic on the model's shape.

Three things run in the stage, each planned here: the ZeRO training workers
(:func:`train_parts`, :func:`worker_peak`, :func:`train_host_bytes`), the dense teacher's
pass before them (:func:`teacher_pass_parts`) and the training-free fit
(:func:`fit_parts`), which is a method of its own (``lcc-closed``, ``eora``) or the start of
a trained one (``closed_form`` / ``eora`` inits). The stage's estimate
(``stages/train.py``) puts them together; the settings arrive as the stage's config through
:class:`TrainSettings`, so nothing here imports the stage.
"""

from __future__ import annotations

import math
from typing import Protocol

from recoup.cluster import capacity
from recoup.cluster.engine import EngineConfig, use_bf16, use_checkpointing
from recoup.orchestrator.estimate import FP32, ModelShape, forward_working_bytes
from recoup.stages.model import layout
from recoup.stages.recovery.config import (
    ClosedFormConfig,
    LccConfig,
    LoraAdapterConfig,
    LossConfig,
)
from recoup.stages.recovery.methods import RecoveryMethod, get_method

F64 = 8


class TrainSettings(Protocol):
    """The train stage's settings as this module reads them (``TrainConfig``)."""

    @property
    def method(self) -> str: ...
    @property
    def lcc(self) -> LccConfig: ...
    @property
    def lora(self) -> LoraAdapterConfig: ...
    @property
    def loss(self) -> LossConfig: ...
    @property
    def engine(self) -> EngineConfig: ...
    @property
    def closed_form(self) -> ClosedFormConfig: ...
    @property
    def max_seq_len(self) -> int: ...


def teacher_top_k(cfg: TrainSettings) -> int | None:
    """None: no KL; 0: the exact KL (teacher resident); k: the cached top-k."""
    return cfg.loss.teacher_top_k if cfg.loss.kl_weight > 0 else None


def fits_wanted(method: RecoveryMethod, cfg: TrainSettings) -> tuple[bool, bool]:
    """(closed-form lcc fit, EoRA fit): what the method runs before training, or instead."""
    return (method.uses_lcc and (method.training_free or cfg.lcc.init == "closed_form"),
            method.uses_lora and (method.training_free or cfg.lora.init == "eora"))


def train_parts(shape: ModelShape, cfg: TrainSettings, world_size: int, *,
                heads: int) -> dict[str, int]:
    """Device bytes of one training worker (one GPU) under the configured ZeRO stage
    (:func:`recoup.cluster.capacity.zero_worker_parts`); ``heads``: the heads select keeps
    (compensated by the lcc methods). A plan is for a GPU run: activation checkpointing
    and bf16 as ``auto`` resolves them on GPU."""
    method = get_method(cfg.method)
    lora = cfg.lora
    return capacity.zero_worker_parts(
        shape, cfg.engine, world_size, tokens=cfg.engine.micro_batch * cfg.max_seq_len,
        heads=heads if method.needs_heads else 0,
        lora=capacity.LoraShape(
            layers=lora.layer_count(shape.card.layers),
            rank=lora.rank, targets=tuple(lora.targets),
            masked=lora.merge == "masked") if method.uses_lora else None,
        teacher_top_k=teacher_top_k(cfg),
        checkpointing=use_checkpointing(cfg.engine, "cuda"),
        kl_chunk_tokens=cfg.loss.chunk_tokens)


def teacher_pass_parts(shape: ModelShape, cfg: TrainSettings,
                       world_size: int) -> dict[str, int] | None:
    """Device bytes of the teacher pass before training (None: no cached teacher)."""
    k = teacher_top_k(cfg)
    if not k:
        return None
    return capacity.teacher_pass_parts(shape, cfg.engine, world_size,
                                       tokens=cfg.engine.micro_batch * cfg.max_seq_len, top_k=k)


def worker_peak(shape: ModelShape, cfg: TrainSettings, world_size: int, *, heads: int) -> int:
    """A worker's device peak: training, or the teacher pass before it when larger."""
    teacher = teacher_pass_parts(shape, cfg, world_size)
    return max(sum(train_parts(shape, cfg, world_size, heads=heads).values()),
               sum(teacher.values()) if teacher else 0)


def min_world_size(shape: ModelShape, cfg: TrainSettings, usable: float, *,
                   heads: int) -> int | None:
    """Fewest training workers whose per-GPU peak fits ``usable``; None if none does."""
    return capacity.min_world_size(
        lambda world: {"peak": worker_peak(shape, cfg, world, heads=heads)}, usable)


def train_host_bytes(shape: ModelShape, cfg: TrainSettings, world_size: int, *,
                     heads: int) -> tuple[int, str]:
    """Host bytes of one worker and what they are. ZeRO-3: rank 0 reads one module's
    tensors at a time (the largest: the embeddings or LM head, or a linear), plus the
    offloaded shares and the chosen heads' V the job carries; ZeRO 0-2: the whole model,
    loaded on the host before it moves to the GPU; streamed: one module's tensors. The
    exact KL's resident teacher adds a whole model loaded through the host; the DeepSpeed
    engine's own host memory comes on top in every case
    (:data:`~recoup.cluster.capacity.DEEPSPEED_ENGINE_HOST_BYTES`)."""
    card, eng = shape.card, cfg.engine
    # beside the model's reads: the chosen heads' V, the DeepSpeed engine's own memory
    carried = heads * card.d_head * card.d_head * FP32 if get_method(cfg.method).needs_heads \
        else 0
    carried += capacity.DEEPSPEED_ENGINE_HOST_BYTES
    if teacher_top_k(cfg) == 0:  # the exact KL's teacher loads whole through the host
        carried += shape.weights_bytes
    if eng.frozen_weights == "streamed":  # the reads land on the host first
        return (capacity.streamed_read_bytes(shape, shape.itemsize) + carried,
                "streamed base: one module's tensors (or rows) read at a time, and the "
                "DeepSpeed engine")
    if eng.zero_stage != 3:
        return shape.weights_bytes + carried, "the whole model while loading (ZeRO 0-2)"
    largest = max([card.vocab * card.hidden] + [o * i for _, o, i in shape.block_linears])
    host = largest * shape.itemsize + carried
    what = "partitioned load: rank 0 reads one module's tensors at a time, and the DeepSpeed " \
        "engine"
    item = 2 if use_bf16(eng, "cuda") else FP32
    if eng.offload_params:
        host += math.ceil(shape.params * item / world_size)
        what += ", plus its share of the offloaded weights"
    if eng.offload_optimizer:
        what += " (Adam state offloaded too, small: only the recovery parameters train)"
    return host, what


def calibration_count(cfg: TrainSettings, samples: int | None) -> int:
    """Calibration sequences of the fit: ``closed_form.samples`` of the ``samples`` training
    samples (None: unknown, then ``closed_form.samples``)."""
    n = cfg.closed_form.samples
    return n if samples is None else min(n, samples)


def fit_parts(shape: ModelShape, cfg: TrainSettings, *,
              samples: int | None = None) -> dict[str, int]:
    """Device bytes of the training-free fit (:func:`recoup.stages.recovery.inits.fit_starts`
    on one GPU): one block of each model read from its files, both models' hidden states of
    the calibration sequences between blocks (in host memory with ``closed_form.offload``:
    one micro-batch here), one micro-batch's forward, and for EoRA the float64 input
    covariances of the block's adapted linears, their eigenbases, the eigendecomposition of
    the widest input (its symmetrised copy, the eigenvectors and LAPACK's 2 n^2 workspace)
    and the original weights that the block's masked correction replaces until it is done.
    ``samples``: the training samples there are (:func:`calibration_count`); the
    calibration sequences are counted at ``max_seq_len`` (their upper bound)."""
    card, item = shape.card, shape.itemsize
    cf = cfg.closed_form
    seq = cfg.max_seq_len
    n = calibration_count(cfg, samples)
    states = min(cf.micro_batch, n) if cf.offload else n
    parts = {
        "one decoder block of each model": 2 * shape.block_bytes,
        f"both models' hidden states of {states} calibration sequences (x max_seq_len)":
            2 * states * seq * card.hidden * item,
        "forward working set (micro-batch x max_seq_len)":
            forward_working_bytes(card, cf.micro_batch * seq, item),
    }
    if fits_wanted(get_method(cfg.method), cfg)[1]:
        linears = {n: (o, i) for n, o, i in shape.block_linears}  # path -> (out, in)
        adapted = [n for n in linears if n.rsplit(".", 1)[-1] in cfg.lora.targets]
        # one covariance per input: linears of a group (q/k/v, gate/up) share theirs
        widths = sorted(linears[g[0]][1] for g in layout.LINEAR_GROUPS
                        if any(p in adapted for p in g)) or [0]
        parts["input covariances of a block's adapted linears (float64)"] = \
            sum(w * w for w in widths) * F64
        parts["eigenbases of the block's other inputs (float64)"] = \
            sum(w * w for w in widths[:-1]) * F64
        parts["eigendecomposition of the widest input (float64)"] = 4 * widths[-1] ** 2 * F64
        parts["original weights under the block's correction"] = \
            sum(linears[n][0] * linears[n][1] for n in adapted) * item
    return parts


def fit_host_bytes(shape: ModelShape, cfg: TrainSettings, *, heads: int,
                   samples: int | None = None) -> int:
    """Host bytes of the fit: what it returns (the EoRA factors of every adapted linear and
    the heads' components, float32) and, with ``closed_form.offload``, both models' hidden
    states. The masks and weights are read one linear or block at a time from the files
    (page cache); the save builds no model (``modelio.weightless_model``)."""
    card = shape.card
    lcc_fit, eora_fit = fits_wanted(get_method(cfg.method), cfg)
    host = heads * card.d_head * FP32 if lcc_fit else 0
    if eora_fit:  # the factors have the adapters' shapes
        factors, _ = capacity.lora_parts(shape, layers=cfg.lora.layer_count(card.layers),
                                         rank=cfg.lora.rank, targets=tuple(cfg.lora.targets),
                                         itemsize=FP32)
        host += factors * FP32
    if cfg.closed_form.offload:
        host += (2 * calibration_count(cfg, samples) * cfg.max_seq_len * card.hidden
                 * shape.itemsize)
    return host

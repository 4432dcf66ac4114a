"""Sequential, one-decoder-block-at-a-time pruning / fake-quantization of a Llama-family model.

Only one decoder block's weights sit on the compute device at a time, together with the
calibration activations flowing between blocks (or one micro-batch of them, with
`offload_activations=True`) and that block's input statistics. That is what lets a 70B
model be pruned on one GPU (DESIGN.md section 4).

Per block:

1. move the block alone to `device`;
2. if the method needs calibration (wanda, sparsegpt): run the block over all calibration
   samples in micro-batches with forward pre-hooks on its linears accumulating input
   statistics (one accumulator per distinct input: q/k/v share theirs, as do gate/up);
3. call the method's per-linear function on each of the 7 linears and write the result in
   place;
4. re-run the now-degraded block on the calibration activations, overwriting them, so the
   next block is calibrated on what the degraded model really feeds it;
5. move the block back where it came from.

The inputs of block 0 are built here from `embed_tokens`, `rotary_emb` and
`masking_utils.create_causal_mask` exactly as `LlamaModel.forward` (transformers 5.x) does,
so the model is never run end to end and no exception is used to stop a forward pass.
Calibration samples are full, unpadded sequences of one length: `calib_ids` is (N, seq).

The methods (what happens to each linear) live in :mod:`recoup.stages.compress.methods`,
registered by name; this module is the driver that walks the blocks.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from recoup.stages.compress.methods import (
    DegradeSpec,
    InputStatistic,
    StatisticFactory,
    get_method,
)
from recoup.stages.compress.pruning import sparsity_of
from recoup.stages.model import layout

# Linears of a Llama decoder block, grouped by the tensor they read: members of a group see
# the same input, so they share one statistic.
LINEAR_GROUPS = layout.LINEAR_GROUPS
LINEAR_NAMES = layout.LINEAR_NAMES

# Calibration samples per block forward; bounds activation memory inside a block.
DEFAULT_MICRO_BATCH = 8

PEAK_FROM_CUDA = "torch.cuda.max_memory_allocated"
PEAK_FROM_ACCOUNTING = "accounting"


# ----------------------------------------------------------------------------- block inputs


@dataclass
class BlockInputs:
    """Everything a decoder block's forward needs besides its weights.

    `hidden` (N, seq, hidden) is the activation buffer, overwritten block after block; it
    lives on the compute device, or on the CPU with offloading. `position_ids` (1, seq) and
    the rotary `position_embeddings` (cos, sin), each (1, seq, head_dim), broadcast over the
    batch and live on the compute device.
    """

    hidden: torch.Tensor
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]

    def nbytes(self) -> int:
        cos, sin = self.position_embeddings
        return sum(t.numel() * t.element_size() for t in (self.hidden, cos, sin))


def _decoder(model: nn.Module) -> nn.Module:
    return layout.llama_decoder(model)  # type: ignore[no-any-return]


def _check_calibration(calib_ids: torch.Tensor) -> None:
    if calib_ids.ndim != 2 or calib_ids.shape[0] < 1 or calib_ids.shape[1] < 1:
        raise ValueError(
            "calib_ids must be a non-empty (samples, seq_len) tensor of token ids, got shape "
            f"{tuple(calib_ids.shape)}."
        )
    if calib_ids.is_floating_point() or calib_ids.is_complex():
        raise ValueError(f"calib_ids must hold integer token ids, got dtype {calib_ids.dtype}.")


def embed_calibration(
    model: nn.Module,
    calib_ids: torch.Tensor,
    *,
    device: torch.device,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    offload_activations: bool = False,
) -> BlockInputs:
    """Inputs of decoder block 0 for `calib_ids` (N, seq), built like LlamaModel.forward.

    The embedding runs where `embed_tokens` lives (a gather; its weight is not moved), one
    micro-batch at a time; results land in one (N, seq, hidden) buffer on `device` (pinned
    CPU memory with `offload_activations` on a CUDA device). Positions are 0..seq-1.
    """
    _check_calibration(calib_ids)
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}.")
    decoder = _decoder(model)
    embed: nn.Module = decoder.embed_tokens
    weight = embed.weight
    n_samples, seq_len = calib_ids.shape
    buffer_device = torch.device("cpu") if offload_activations else device
    hidden = torch.empty(
        n_samples,
        seq_len,
        weight.shape[1],
        dtype=weight.dtype,
        device=buffer_device,
        pin_memory=offload_activations and device.type == "cuda",
    )  # (N, seq, hidden)
    with torch.no_grad():
        for start in range(0, n_samples, micro_batch):
            ids = calib_ids[start : start + micro_batch].to(weight.device)  # (b, seq)
            hidden[start : start + ids.shape[0]] = embed(ids).to(buffer_device)
        position_ids = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, seq)
        probe = hidden[:1].to(device)  # (1, seq, hidden): rotary reads only its device/dtype
        cos, sin = decoder.rotary_emb(probe, position_ids=position_ids)  # (1, seq, head_dim)
    return BlockInputs(hidden=hidden, position_ids=position_ids, position_embeddings=(cos, sin))


class BlockRunner:
    """Runs one decoder block over every calibration sample, micro-batch by micro-batch."""

    def __init__(
        self, config: object, inputs: BlockInputs, device: torch.device, micro_batch: int
    ) -> None:
        self.config = config
        self.inputs = inputs
        self.device = device
        self.micro_batch = micro_batch
        self._masks: dict[int, torch.Tensor | None] = {}

    def causal_mask(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The mask LlamaModel would build for this batch size (None for SDPA's is_causal)."""
        size = batch.shape[0]
        if size not in self._masks:
            self._masks[size] = create_causal_mask(
                config=self.config,
                inputs_embeds=batch,
                attention_mask=None,
                cache=None,
                position_ids=self.inputs.position_ids,
            )
        return self._masks[size]

    def mask_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._masks.values() if t is not None)

    def run(self, block: nn.Module, *, write_back: bool) -> None:
        """Forward every micro-batch; with write_back, outputs replace the inputs in place
        (sample i's output depends only on sample i's input, so this is safe)."""
        hidden = self.inputs.hidden
        with torch.no_grad():
            for start in range(0, hidden.shape[0], self.micro_batch):
                x = hidden[start : start + self.micro_batch].to(self.device)  # (b, seq, hidden)
                out = block(
                    x,
                    attention_mask=self.causal_mask(x),
                    position_ids=self.inputs.position_ids,
                    position_embeddings=self.inputs.position_embeddings,
                )
                y = out[0] if isinstance(out, tuple) else out  # (b, seq, hidden)
                if write_back:
                    hidden[start : start + x.shape[0]] = y.to(hidden.device)


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class BlockwiseResult:
    """Outcome of `degrade_blockwise`.

    masks: KEEP masks (bool, CPU) by parameter name, e.g.
        "model.layers.0.self_attn.q_proj.weight"; empty for quantization.
    sparsity: fraction of zeros of every degraded weight, by parameter name.
    peak_device_bytes: on a CUDA device, torch.cuda.max_memory_allocated since the driver
        started (so it includes whatever else the process holds on that device); elsewhere
        `accounted_peak_bytes`.
    peak_source: which of the two `peak_device_bytes` is (PEAK_FROM_CUDA or PEAK_FROM_ACCOUNTING).
    accounted_peak_bytes: the largest sum, over blocks, of the bytes the driver itself places
        on the compute device at once: block parameters and buffers, calibration activations
        (the whole buffer, or two micro-batches when offloaded), rotary embeddings, causal
        masks and input statistics. An accounting, not an allocator reading: it leaves out
        the block's internal activations and the per-linear functions' working copies.
    seconds_per_block: wall time of each block (statistics, degrading, re-run).
    """

    masks: dict[str, torch.Tensor]
    sparsity: dict[str, float]
    peak_device_bytes: int
    peak_source: str
    accounted_peak_bytes: int
    seconds_per_block: list[float] = field(default_factory=list)


def _module_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def _module_prefix(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a submodule of {type(model).__name__}.")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accumulate_into(stat: InputStatistic) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        stat.add(args[0])

    return hook


def _collect_statistics(
    block: nn.Module,
    runner: BlockRunner,
    factory: StatisticFactory,
    spec: DegradeSpec,
    device: torch.device,
) -> list[InputStatistic]:
    """One statistic per LINEAR_GROUPS entry, accumulated over all calibration samples."""
    stats: list[InputStatistic] = []
    handles = []
    try:
        for group in LINEAR_GROUPS:
            first: nn.Linear = block.get_submodule(group[0])
            stat = factory(first.in_features, device, spec.stat_dtype)
            stats.append(stat)
            handles.append(first.register_forward_pre_hook(_accumulate_into(stat)))
        runner.run(block, write_back=False)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _accounted_bytes(
    block: nn.Module,
    stats: list[InputStatistic | None],
    runner: BlockRunner | None,
    offloaded: bool,
) -> int:
    """Bytes the driver holds on the compute device while this block is degraded: see
    BlockwiseResult.accounted_peak_bytes."""
    total = _module_bytes(block) + sum(s.nbytes() for s in stats if s is not None)
    if runner is None:
        return total
    inputs = runner.inputs
    if offloaded:  # one micro-batch in and one out; rotary tables stay on the device
        row = inputs.hidden[0]  # (seq, hidden)
        batch = min(runner.micro_batch, inputs.hidden.shape[0])
        total += 2 * batch * row.numel() * row.element_size()
        total += sum(t.numel() * t.element_size() for t in inputs.position_embeddings)
    else:
        total += inputs.nbytes()
    return total + runner.mask_bytes()


def degrade_blockwise(
    model: nn.Module,
    calib_ids: torch.Tensor | None,
    spec: DegradeSpec,
    *,
    device: torch.device,
    micro_batch: int = DEFAULT_MICRO_BATCH,
    offload_activations: bool = False,
    keep_masks: bool = True,
    progress: bool = True,
) -> BlockwiseResult:
    """Prune or fake-quantize the 7 linears of every decoder block of `model`, in place.

    model: a Hugging Face Llama-family causal LM (`model.model.layers[i]` with
        `self_attn.{q,k,v,o}_proj` and `mlp.{gate,up,down}_proj`), typically on the CPU;
        each block visits `device` and returns to where it was. Embeddings, norms and the
        LM head are not modified.
    calib_ids: (N, seq) calibration token ids; needed by wanda and sparsegpt, ignored (may
        be None) by magnitude and rtn, which run no forward pass at all. N and seq are
        whatever the caller chose.
    spec: what to do (DegradeSpec).
    micro_batch: samples per block forward; bounds the block's internal activation memory.
    offload_activations: keep the (N, seq, hidden) activation buffer in CPU memory and move
        one micro-batch at a time, for calibration sets that do not fit next to a block.
    keep_masks: return KEEP masks (1 byte per pruned weight in host memory).
    progress: show a tqdm bar over blocks on stderr.
    """
    method = get_method(spec.method)
    decoder = _decoder(model)
    layers = decoder.layers
    if method.statistic is not None and calib_ids is None:
        raise ValueError(f"'{spec.method}' needs calibration token ids; calib_ids is None.")
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be at least 1, got {micro_batch}.")
    prefix = _module_prefix(model, layers)

    was_training = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    runner: BlockRunner | None = None
    if method.statistic is not None and calib_ids is not None:
        inputs = embed_calibration(
            model,
            calib_ids,
            device=device,
            micro_batch=micro_batch,
            offload_activations=offload_activations,
        )
        runner = BlockRunner(model.config, inputs, device, micro_batch)

    masks: dict[str, torch.Tensor] = {}
    sparsity: dict[str, float] = {}
    seconds: list[float] = []
    accounted_peak = 0
    try:
        bar = tqdm(
            range(len(layers)),
            desc=f"degrade {spec.method}",
            unit="block",
            file=sys.stderr,
            disable=not progress,
        )
        for index in bar:
            _synchronize(device)
            started = time.perf_counter()
            block: nn.Module = layers[index]
            home = _module_device(block)
            block.to(device)
            try:
                stats: list[InputStatistic | None] = [None] * len(LINEAR_GROUPS)
                if runner is not None and method.statistic is not None:
                    stats = [*_collect_statistics(block, runner, method.statistic, spec, device)]
                accounted_peak = max(
                    accounted_peak, _accounted_bytes(block, stats, runner, offload_activations)
                )
                with torch.no_grad():
                    for group_index, group in enumerate(LINEAR_GROUPS):
                        for name in group:
                            linear: nn.Linear = block.get_submodule(name)
                            new_weight, keep = method.apply(
                                linear.weight.data, stats[group_index], spec
                            )
                            linear.weight.data.copy_(new_weight)
                            key = f"{prefix}.{index}.{name}.weight"
                            sparsity[key] = sparsity_of(linear.weight.data)
                            if keep is not None and keep_masks:
                                masks[key] = keep.cpu()
                        stats[group_index] = None  # free the statistic before the next group
                if runner is not None and index + 1 < len(layers):
                    runner.run(block, write_back=True)
            finally:
                block.to(home)
            _synchronize(device)
            seconds.append(time.perf_counter() - started)
    finally:
        model.train(was_training)

    if device.type == "cuda":
        peak, source = int(torch.cuda.max_memory_allocated(device)), PEAK_FROM_CUDA
    else:
        peak, source = accounted_peak, PEAK_FROM_ACCOUNTING
    return BlockwiseResult(
        masks=masks,
        sparsity=sparsity,
        peak_device_bytes=peak,
        peak_source=source,
        accounted_peak_bytes=accounted_peak,
        seconds_per_block=seconds,
    )

"""Training-free compensation, block by block: closed-form lost components and EoRA.

The dense and the degraded model advance together one decoder block at a time over the
calibration sequences (the data stage's samples, prompt + response, every real token).
Only one block of each model is on the device at a time, with the hidden states of both
models between blocks (or, with ``offload``, in host memory), as the degrade driver does
(:mod:`recoup.stages.compress.blockwise`), so a 70B model is compensated on one GPU.

At block ``i``:

1. both blocks run on their own model's hidden states; the ``o_proj`` inputs of both are
   caught, and for the heads to compensate the sums of ``z_dense - z_degraded`` over real
   tokens accumulate (:func:`closed_form.head_shift_sum`); the dense outputs move on;
2. the mean shift becomes the block's compensation ``c`` (a pre-hook on the degraded
   ``o_proj``, from now on);
3. for EoRA, the degraded block runs again (compensated) while each linear group's input
   covariance ``X^T X`` accumulates; each target linear gets its rank-r factors
   (:func:`eora.factors_in` of ``W_dense - W_degraded``) and, for the rest of this block,
   the masked corrected weight ``W_hat + M * B A`` (what the export will merge);
4. the degraded block, compensated and corrected, runs a last time and its outputs move
   on: block ``i + 1`` of the degraded model sees what the recovered model feeds it.

Right padding with a causal mask leaves every real token's output untouched by the padding,
so sequences of different lengths share micro-batches; padded positions are left out of
every sum. The models come as :class:`BlockSource` s: the train stage reads both from their
files one block at a time (:func:`recoup.stages.recovery.inits.fit_starts`), so neither is
ever whole in memory; tests pass models in memory. Nothing here starts DeepSpeed: the
train stage calls :func:`fit_blockwise` on ``run.device`` and writes the result as
ordinary trained parameters.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from recoup.stages.compress.pruning import HessianAccumulator
from recoup.stages.lcc.compensation import HeadId
from recoup.stages.model import layout
from recoup.stages.recovery import closed_form
from recoup.stages.recovery.eora import EIG_RTOL, Eigenbasis, eigenbasis, factors_in
from recoup.stages.recovery.masked_lora import masked_lora_merge

DEFAULT_CALIBRATION_SAMPLES = 64
"""Calibration sequences of a training-free fit unless ``train.closed_form.samples`` says."""
DEFAULT_MICRO_BATCH = 8
"""Sequences per block forward of a training-free fit (bounds memory)."""


@dataclass(frozen=True, kw_only=True)
class FitPlan:
    """What to fit. ``heads``: layer -> heads whose closed-form ``c`` is fitted (and applied
    from that block on); ``eora``: layer -> linears (paths in the block, e.g.
    ``self_attn.q_proj``) that get rank-``rank`` EoRA factors; ``masks``: keep mask of
    linear weights by parameter name (the masked correction the export will merge; a name
    it lacks keeps its weight's non-zero pattern); ``masked`` False: the correction applied
    unmasked, as an unmerged adapter runs."""

    heads: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    eora: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    rank: int = 0
    masks: Mapping[str, Tensor] = field(default_factory=dict)
    masked: bool = True
    eig_rtol: float = EIG_RTOL


@dataclass(frozen=True)
class FitResult:
    """``components``: (layer, head) -> ``c`` (d_head,) float32; ``factors``: linear module
    name (``model.layers.{i}.self_attn.q_proj``) -> (B (out, r), A (r, in)) float32 with
    ``B A`` the EoRA correction; ``tokens``: real calibration tokens per block."""

    components: dict[HeadId, Tensor]
    factors: dict[str, tuple[Tensor, Tensor]]
    tokens: int
    seconds_per_block: list[float]


class BlockSource(Protocol):
    """A causal LM as the fit reads it: one decoder block at a time. An in-memory model
    (:class:`ModelBlocks`) or a saved one read from its files
    (:class:`recoup.stages.model.block_capture.BlockWeights`, whose other blocks never
    leave the disk: a 70B pair fits one GPU and little host memory)."""

    config: Any

    @property
    def num_layers(self) -> int: ...

    def embedding(self) -> Tensor: ...

    def rotary(self, device: torch.device) -> nn.Module: ...

    def block(self, index: int, device: torch.device) -> AbstractContextManager[nn.Module]: ...


class ModelBlocks:
    """A model in memory as a :class:`BlockSource`: each block visits the device for the
    ``with`` body and goes back where it was."""

    def __init__(self, model: nn.Module) -> None:
        self.config = model.config
        self.decoder = layout.llama_decoder(model)

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def embedding(self) -> Tensor:
        return self.decoder.embed_tokens.weight

    def rotary(self, device: torch.device) -> nn.Module:
        return self.decoder.rotary_emb

    @contextmanager
    def block(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        module: nn.Module = self.decoder.layers[index]
        home = _module_device(module)
        was = module.training
        module.eval().to(device)
        try:
            yield module
        finally:
            module.train(was).to(home)


@dataclass
class _Batch:
    """One micro-batch of right-padded sequences: both models' hidden states (b, T, hidden),
    the real-token mask (b, T) and what a block forward needs besides its weights."""

    keep: Tensor
    position_ids: Tensor
    rotary: tuple[Tensor, Tensor]
    causal: Any
    dense: Tensor
    degraded: Tensor


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(b, T) right-padded ids and (b, T) real-token mask."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    keep = torch.arange(t)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]  # (b, T)
    return ids, keep


@torch.no_grad()
def _embed(dense: BlockSource, degraded: BlockSource, samples: Sequence[Sequence[int]], *,
           pad_id: int, micro_batch: int, device: torch.device, offload: bool) -> list[_Batch]:
    """Block-0 inputs of both models, sequences grouped by length into micro-batches (the
    embedding a row lookup where the matrix is)."""
    emb_d, emb_g = dense.embedding(), degraded.embedding()  # (V, hidden) each
    rotary = dense.rotary(device)
    store = torch.device("cpu") if offload else device
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i]), i))
    batches = []
    for start in range(0, len(order), micro_batch):
        ids, keep = _pad([samples[i] for i in order[start: start + micro_batch]], pad_id)
        h_d = F.embedding(ids.to(emb_d.device), emb_d)  # (b, T, hidden)
        h_g = F.embedding(ids.to(emb_g.device), emb_g)  # (b, T, hidden)
        pos = torch.arange(ids.shape[1], device=device)[None, :]  # (1, T)
        probe = h_d[:1].to(device)
        cos, sin = rotary(probe, position_ids=pos)  # (1, T, d_head) each
        causal = create_causal_mask(config=dense.config, inputs_embeds=h_d.to(device),
                                    attention_mask=None, cache=None, position_ids=pos)
        batches.append(_Batch(keep=keep.to(device), position_ids=pos, rotary=(cos, sin),
                              causal=causal, dense=h_d.to(store), degraded=h_g.to(store)))
    return batches


def _forward(block: nn.Module, batch: _Batch, x: Tensor, device: torch.device) -> Tensor:
    out = block(x.to(device), attention_mask=batch.causal, position_ids=batch.position_ids,
                position_embeddings=batch.rotary)
    return out[0] if isinstance(out, tuple) else out  # (b, T, hidden)


def _catch(slot: dict[str, Tensor], key: str) -> Callable[..., None]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
        slot[key] = args[0]
    return hook


def _add_vector(c: Tensor) -> Callable[..., Any]:
    def hook(_m: nn.Module, args: tuple[Any, ...]) -> Any:
        return (args[0] + c.to(args[0].dtype),) + tuple(args[1:])
    return hook


@torch.no_grad()
def _measure_shift(dense_block: nn.Module, deg_block: nn.Module, batches: list[_Batch],
                   n_heads: int, device: torch.device) -> tuple[Tensor, int]:
    """Sum of ``z_dense - z_degraded`` per head over real tokens (n_heads, d_head), and the
    token count; the dense outputs replace the dense hidden states (they move on)."""
    slot: dict[str, Tensor] = {}
    handles = [layout.o_proj_of(dense_block).register_forward_pre_hook(_catch(slot, "d")),
               layout.o_proj_of(deg_block).register_forward_pre_hook(_catch(slot, "g"))]
    total: Tensor | None = None
    tokens = 0
    try:
        for b in batches:
            y = _forward(dense_block, b, b.dense, device)
            _forward(deg_block, b, b.degraded, device)
            part = closed_form.head_shift_sum(slot["d"], slot["g"], b.keep, n_heads)
            total = part if total is None else total + part
            tokens += int(b.keep.sum())
            b.dense = y.to(b.dense.device)
    finally:
        for h in handles:
            h.remove()
    assert total is not None
    return total, tokens


@torch.no_grad()
def _advance(block: nn.Module, batches: list[_Batch], which: Literal["dense", "degraded"],
             device: torch.device) -> None:
    for b in batches:
        x = getattr(b, which)
        setattr(b, which, _forward(block, b, x, device).to(x.device))


@torch.no_grad()
def _covariances(block: nn.Module, batches: list[_Batch], paths: Sequence[str],
                 device: torch.device) -> dict[str, Tensor]:
    """``X^T X`` (in, in) over real tokens of the input of each linear in ``paths`` (one
    accumulation per group of linears that read the same tensor)."""
    groups = {p: next(g for g in layout.LINEAR_GROUPS if p in g) for p in paths}
    current: dict[str, Tensor] = {}
    accs: dict[tuple[str, ...], HessianAccumulator] = {}
    handles = []

    def stat(acc: HessianAccumulator) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            acc.add(args[0][current["keep"]])  # (tokens, in): padding left out
        return hook

    try:
        for group in dict.fromkeys(groups.values()):
            first: nn.Linear = block.get_submodule(group[0])
            accs[group] = HessianAccumulator(first.in_features, device=device)
            handles.append(first.register_forward_pre_hook(stat(accs[group])))
        for b in batches:
            current["keep"] = b.keep
            _forward(block, b, b.degraded, device)
    finally:
        for h in handles:
            h.remove()
    return {p: accs[g].xxt for p, g in groups.items()}


def _correct_block(i: int, bd: nn.Module, bg: nn.Module, batches: list[_Batch],
                   paths: Sequence[str], plan: FitPlan, device: torch.device,
                   restore: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """EoRA on block ``i``: the factors of each linear in ``paths`` (by module name) from
    the compensated degraded block's input covariances, each linear's weight replaced by
    its masked corrected weight (the original kept in ``restore``). A function of its own
    so that the block's float64 covariances and eigenbases are freed when it returns, not
    held through the blocks that follow."""
    covs = _covariances(bg, batches, paths, device)
    bases: dict[int, Eigenbasis] = {}  # one eigh per shared input
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for path in paths:
        w_d = bd.get_submodule(path).weight
        w_g = bg.get_submodule(path).weight
        cov = covs[path]
        if id(cov) not in bases:
            bases[id(cov)] = eigenbasis(cov, eig_rtol=plan.eig_rtol)
        B, A = factors_in(w_d.double() - w_g.double(), bases[id(cov)], plan.rank)
        name = f"model.layers.{i}.{path}"
        out[name] = (B.float().cpu(), A.float().cpu())
        keep = plan.masks.get(f"{name}.weight") if plan.masked \
            else torch.ones_like(w_g, dtype=torch.bool)
        keep = (w_g != 0) if keep is None else keep.to(device)
        if keep.shape != w_g.shape:
            raise ValueError(f"{name}: its keep mask is {tuple(keep.shape)}, "
                             f"the weight {tuple(w_g.shape)}")
        restore[path] = w_g.detach().clone()
        w_g.copy_(masked_lora_merge(w_g, A, B, 1.0, keep))
    return out


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


@torch.no_grad()  # the blocks' weights are parameters: EoRA's float64 algebra on them
def fit_blockwise(dense: BlockSource | nn.Module, degraded: BlockSource | nn.Module,
                  samples: Sequence[Sequence[int]], plan: FitPlan, *, pad_id: int,
                  device: torch.device | str, micro_batch: int = DEFAULT_MICRO_BATCH,
                  offload: bool = False, progress: bool = True) -> FitResult:
    """Fit ``plan`` block by block (see the module docstring); neither model is changed.

    ``dense`` and ``degraded``: the same Llama-layout causal LM with different weights, as
    :class:`BlockSource` s (a saved model read block by block) or models in memory,
    typically on the CPU (each block visits ``device`` and goes back). ``samples``: token id
    sequences, all of their tokens real.
    """
    device = torch.device(device)
    if not samples or any(len(s) == 0 for s in samples):
        raise ValueError("training-free compensation needs non-empty calibration sequences")
    src_d = ModelBlocks(dense) if isinstance(dense, nn.Module) else dense
    src_g = ModelBlocks(degraded) if isinstance(degraded, nn.Module) else degraded
    if src_d.num_layers != src_g.num_layers:
        raise ValueError(f"the dense model has {src_d.num_layers} layers, the degraded "
                         f"{src_g.num_layers}")
    if plan.eora and plan.rank < 1:
        raise ValueError("EoRA needs a rank of at least 1")
    n_heads = int(src_d.config.num_attention_heads)
    batches = _embed(src_d, src_g, samples, pad_id=pad_id, micro_batch=micro_batch,
                     device=device, offload=offload)
    tokens = sum(int(b.keep.sum()) for b in batches)
    components: dict[HeadId, Tensor] = {}
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    seconds: list[float] = []
    n = src_d.num_layers
    for i in tqdm(range(n), desc="training-free fit", unit="block", file=sys.stderr,
                  disable=not progress):
        started = time.perf_counter()
        with src_d.block(i, device) as bd, src_g.block(i, device) as bg:
            handles = []
            restore: dict[str, Tensor] = {}
            try:
                heads = plan.heads.get(i, ())
                if heads:
                    total, count = _measure_shift(bd, bg, batches, n_heads, device)
                    shift = closed_form.mean_shift(total, count)  # (n_heads, d_head)
                    components.update(closed_form.components_of(i, shift, heads))
                    c = closed_form.full_vector(shift, heads).to(device)
                    handles.append(layout.o_proj_of(bg).register_forward_pre_hook(
                        _add_vector(c)))
                else:
                    _advance(bd, batches, "dense", device)
                paths = plan.eora.get(i, ())
                if paths:
                    factors.update(_correct_block(i, bd, bg, batches, paths, plan, device,
                                                  restore))
                if i + 1 < n:
                    _advance(bg, batches, "degraded", device)
            finally:
                for h in handles:
                    h.remove()
                for path, w in restore.items():  # an in-memory model is left as it was
                    bg.get_submodule(path).weight.copy_(w)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - started)
    return FitResult(components=components, factors=factors, tokens=tokens,
                     seconds_per_block=seconds)


__all__ = ("DEFAULT_CALIBRATION_SAMPLES", "DEFAULT_MICRO_BATCH", "FitPlan", "FitResult",
           "fit_blockwise")

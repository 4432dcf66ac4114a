"""o_proj inputs captured block by block: one decoder block on the device at a time.

:func:`recoup.stages.model.capture.capture_sequences` runs the whole decoder per batch, so
the whole model must sit on the device; a collect worker holding a dense and a degraded
70B model that way needs four 80 GB GPUs. Here the loops are turned around, as the degrade
driver (:mod:`recoup.stages.compress.blockwise`) does:

1. every batch of the sequences is padded as :func:`capture.pad_batch` pads it, embedded,
   and its hidden states kept on the device, with its causal mask and rotary tables;
2. block ``i`` is read from the model's safetensors files onto the device
   (:class:`BlockWeights`), every batch runs through it, a pre-hook on its ``o_proj``
   reducing the input to rows (:func:`capture.reduce_rows`), the outputs replacing the
   hidden states;
3. the block is dropped before block ``i + 1`` is read.

Device memory is one decoder block plus the hidden states of the sequences; host memory is
one block and the embedding matrix (the weight files are memory-mapped, so the workers of
one node share them in the page cache). Batches, padding, masks, position ids and rotary
tables are those of the decoder's own forward pass (``LlamaModel.forward``, transformers
5.x), so the rows equal :func:`capture.capture_sequences`' for the same batches: bit for
bit in float32 on the CPU.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recoup.stages.model import capture, layout
from recoup.stages.model.capture import PaddingSide, Position
from recoup.stages.model.partitioned import read_tensors
from recoup.stages.model.tokenize import TokenSeq

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, for a single-file or sharded save."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE}; collect "
                                "reads the model's weights block by block from safetensors")
    with safe_open(single, framework="pt") as f:
        return dict.fromkeys(f.keys(), single)


class BlockWeights:
    """A saved causal LM read one piece at a time: its module skeleton on the ``meta``
    device (no memory), the tensors of one block (or of the embedding) read from its
    safetensors files when asked for."""

    def __init__(self, folder: Path, dtype: torch.dtype) -> None:
        from recoup.stages.model.modelio import meta_model

        self.folder = folder
        self.dtype = dtype
        skeleton = meta_model(folder)
        self.config = skeleton.config  # with the attention implementation filled in
        self.decoder = layout.llama_decoder(skeleton)
        self.prefix = next(n for n, m in skeleton.named_modules() if m is self.decoder)
        self.files = weight_files(folder)

    @property
    def num_layers(self) -> int:
        return len(self.decoder.layers)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every stored tensor under ``prefix`` (e.g. ``model.layers.3.``), keyed by the
        rest of its name, on the CPU."""
        names = [n for n in self.files if n.startswith(prefix)]
        if not names:
            raise ValueError(f"{self.folder}: its safetensors files hold no tensor under "
                             f"{prefix!r}")
        return {n[len(prefix):]: t for n, t in read_tensors(self.files, names).items()}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every stored tensor, read from the file headers only."""
        from safetensors import safe_open

        out: dict[str, tuple[int, ...]] = {}
        for file in sorted(set(self.files.values())):
            with safe_open(file, framework="pt") as f:
                out.update({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
        return out

    def embedding(self) -> torch.Tensor:
        """The token embedding matrix (vocab, hidden) on the CPU, in the model's dtype."""
        name = f"{self.prefix}.embed_tokens.weight"
        return read_tensors(self.files, [name])[name].to(self.dtype)

    def rotary(self, device: torch.device) -> nn.Module:
        """The decoder's rotary embedding, built anew (it holds no stored weights: its
        tables come from the config) and moved to ``device``."""
        return type(self.decoder.rotary_emb)(config=self.config).to(device)

    @contextmanager
    def block(self, index: int, device: torch.device) -> Iterator[nn.Module]:
        """Decoder block ``index`` with its weights on ``device``, for the ``with`` body
        only: afterwards its parameters are back on the meta device, their memory free."""
        module: nn.Module = self.decoder.layers[index]
        state = {k: v.to(device=device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                 for k, v in self.tensors(f"{self.prefix}.layers.{index}.").items()}
        module.load_state_dict(state, strict=True, assign=True)
        del state
        try:
            yield module
        finally:
            module.to("meta")


def check_same_architecture(dense: BlockWeights, other: BlockWeights) -> None:
    """Dense and degraded must be the same network up to weight values (from the files'
    headers: no weights are read)."""
    a, b = dense.shapes(), other.shapes()
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:3]
        raise ValueError(f"{other.folder}: its tensors differ from the dense model's "
                         f"{dense.folder} (e.g. {only})")
    for k in a:
        if a[k] != b[k]:
            raise ValueError(f"{other.folder}: tensor {k} has shape {b[k]}, the dense "
                             f"model's has {a[k]}")


@dataclass(kw_only=True)
class _BatchState:
    """A batch between blocks: its hidden states and what every block's forward reads."""

    index: torch.Tensor  # (B,) positions of its sequences in the caller's list
    hidden: torch.Tensor  # (B, T, hidden), overwritten block after block
    mask: Any  # the decoder's causal mask for this batch (None: SDPA's is_causal)
    position_ids: torch.Tensor  # (B, T)
    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (B, T, d_head)
    select: torch.Tensor  # (B, T) bool, the tokens of each sequence's row


def _mask_function(config: Any) -> Any:
    """The causal mask builder the decoder's forward uses (Mistral: sliding window)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    if getattr(config, "sliding_window", None) is not None:
        return create_sliding_window_causal_mask
    return create_causal_mask


def embed_batches(weights: BlockWeights, batches: list[tuple[list[int], capture.Batch]],
                  device: torch.device) -> list[_BatchState]:
    """Embed every batch and build its mask and rotary tables, as the decoder's forward
    would (the embedding is a row lookup, done on the CPU)."""
    embed = weights.embedding()  # (V, hidden)
    rotary = weights.rotary(device)
    make_mask = _mask_function(weights.config)
    states = []
    for index, batch in batches:
        hidden = F.embedding(batch.input_ids, embed).to(device)  # (B, T, hidden)
        positions = batch.position_ids.to(device)  # (B, T)
        mask = make_mask(config=weights.config, inputs_embeds=hidden,
                         attention_mask=batch.attention_mask.to(device), cache=None,
                         position_ids=positions)
        states.append(_BatchState(index=torch.tensor(index), hidden=hidden, mask=mask,
                                  position_ids=positions, rotary=rotary(hidden, positions),
                                  select=batch.select.to(device)))
    return states


@torch.no_grad()
def capture_blockwise(weights: BlockWeights, seqs: Sequence[TokenSeq], *, batch_size: int,
                      pad_id: int, padding_side: PaddingSide, position: Position,
                      device: torch.device) -> torch.Tensor:
    """Rows of every sequence, (L, N, H * d_head) float32 on the CPU: what
    :func:`capture.capture_sequences` returns, with one decoder block on ``device`` at a
    time (the batches are :func:`capture.plan_batches`', so the numbers are the same)."""
    if not seqs:
        raise ValueError("no sequences to capture")
    plan = capture.plan_batches([len(s.ids) for s in seqs], batch_size)
    batches = [(index, capture.pad_batch([seqs[i] for i in index], pad_id=pad_id,
                                         padding_side=padding_side, position=position))
               for index in plan]
    states = embed_batches(weights, batches, device)
    out: torch.Tensor | None = None
    last = weights.num_layers - 1
    for layer in range(weights.num_layers):
        with weights.block(layer, device) as block:
            o_proj = layout.o_proj_of(block)
            if out is None:
                out = torch.empty(weights.num_layers, len(seqs), o_proj.in_features)
            for state in states:
                rows: list[torch.Tensor] = []

                def hook(_m: nn.Module, args: tuple[torch.Tensor, ...],
                         select: torch.Tensor = state.select, rows: list = rows) -> None:
                    x = args[0]  # (B, T, H * d_head)
                    rows.append(capture.reduce_rows(x, select.to(x.device)).cpu())

                handle = o_proj.register_forward_pre_hook(hook)
                try:
                    y = block(state.hidden, attention_mask=state.mask,
                              position_ids=state.position_ids,
                              position_embeddings=state.rotary, use_cache=False)
                finally:
                    handle.remove()
                if len(rows) != 1:
                    raise RuntimeError(f"block {layer} ran its o_proj {len(rows)} times")
                out[layer, state.index] = rows[0]  # (B, W) into (L, N, W)
                if layer < last:  # the last block's output is not needed
                    state.hidden = y[0] if isinstance(y, tuple) else y  # (B, T, hidden)
    assert out is not None
    return out

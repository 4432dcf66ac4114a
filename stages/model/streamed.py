"""A causal LM whose frozen weights stay in their checkpoint, read when their module runs.

Recovery trains a few million parameters on a frozen base of billions. ZeRO-3 spreads that
base over the workers (a 70B model needs three 80 GB GPUs for it), and ZeRO-Infinity
offloads it to NVMe, writing a copy first. The frozen base is already on disk, though,
in the safetensors files the degrade stage wrote, and it never changes: so here it is not
held at all. Each module with frozen weights of its own (a block's linears and norms, the
embeddings, the final norm, the LM head) reads them from the files when it is called and
lets them go when it returns:

- forward: a linear's weight lives for its own call (the checkpointed block's autograd
  graph does not keep it);
- backward, with activation checkpointing (required: without it the autograd graph keeps
  every block's weights for the backward, which is the whole model again), each block is
  recomputed, its modules read their weights once more, and they are freed when the
  block's backward is done: one block's weights at a time. (transformers checkpoints a
  block's ``forward``, not its call, so hooks on the block itself would not run in the
  recompute; hooks on the modules inside it do. The recompute also stops as soon as it
  has what the backward needs, cutting a module's call short before its release: so each
  read first drops whatever an earlier call left loaded, and at most one module's weights
  outlive their call.)
- the embeddings and the LM head (``by_rows``), the two largest tensors, are never read
  whole: the lookup reads the rows of the batch's tokens, and the head computes its
  logits a chunk of vocabulary rows at a time, in the forward and again in the backward
  (:class:`_ChunkedLinear`), so the graph keeps none of its weight while the loss's
  vocabulary-wide tensors are live.

A worker then holds about one block, the LM head and the activations, whatever the model's
size, at the price of reading the model twice per micro-batch (from the page cache when the
host has room for it; see ``train.engine.frozen_weights``). The reads go through ``read``
on an open file, not through safetensors' memory map: mapped pages count in the process's
resident set while the map is open, which would double every read's footprint.

Only frozen parameters (``requires_grad`` False) are streamed, found in the checkpoint by
their name with PEFT's wrapper prefix and ``base_layer`` left out, so a model with adapters
and compensation attached is streamed after they are built
(:func:`recoup.stages.recovery.task.build_model`). What remains registered on the module is
what trains, which is all a DeepSpeed engine then sees.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from recoup.cluster.capacity import STREAMED_ROW_CHUNK_BYTES
from recoup.stages.model import layout
from recoup.stages.model.partitioned import checkpoint_files

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
#: wrapper parts of a parameter's name that the plain checkpoint does not have
_PEFT_PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data, the JSON header) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _read_exact(f: Any, into: memoryview) -> None:
    """Fill ``into`` from ``f`` (one read call returns at most about 2 GB on Linux)."""
    done = 0
    while done < len(into):
        got = f.readinto(into[done:])
        if not got:
            raise OSError(f"{f.name}: the file ends before the tensor does")
        done += got


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes are in its safetensors file, and what they are."""

    path: Path
    offset: int  # of its first byte in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


Headers = dict[Path, tuple[int, dict[str, Any]]]
"""A cache of parsed safetensors headers by file: (byte offset of the data, the header)."""


def _locate(stored: Mapping[str, Path], name: str, headers: Headers) -> _Stored:
    """Where ``name`` is (``stored``: its file), its file's header parsed once into
    ``headers``."""
    path = stored[name]
    if path not in headers:
        headers[path] = _header(path)
    start, header = headers[path]
    info = header[name]
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: {name} has dtype {info['dtype']}, which recoup does not read")
    a, b = info["data_offsets"]
    return _Stored(path, start + a, b - a, dtype, tuple(info["shape"]))


def read_unmapped(stored: Mapping[str, Path], names: Iterable[str],
                  headers: Headers | None = None) -> dict[str, Tensor]:
    """The named tensors (``stored``: :func:`~recoup.stages.model.partitioned.checkpoint_files`)
    read with ``read`` into fresh CPU memory, never mapped: the process holds the tensors
    and nothing else (the file's pages stay in the page cache, outside its resident set).
    ``headers``: a cache of the files' parsed headers, for a caller that reads often."""
    wanted = list(names)
    headers = {} if headers is None else headers
    out: dict[str, Tensor] = {}
    for path in sorted({stored[n] for n in wanted}):
        with open(path, "rb", buffering=0) as f:
            for name in (n for n in wanted if stored[n] == path):
                where = _locate(stored, name, headers)
                raw = torch.empty(where.nbytes, dtype=torch.uint8)
                f.seek(where.offset)
                _read_exact(f, memoryview(raw.numpy()))
                out[name] = raw.view(where.dtype).reshape(where.shape)
    return out


class RowReader:
    """Rows of one stored 2-D tensor (vocabulary x hidden), read with ``read`` without the
    rest: an embedding lookup reads its tokens' rows, the LM head a chunk at a time."""

    def __init__(self, stored: Mapping[str, Path], key: str, headers: Headers):
        where = _locate(stored, key, headers)
        self.path, self.offset, self.dtype = where.path, where.offset, where.dtype
        self.rows, self.cols = where.shape
        self.row_bytes = self.cols * self.dtype.itemsize
        #: rows per chunk of the LM head (at least one)
        self.chunk = max(1, STREAMED_ROW_CHUNK_BYTES // self.row_bytes)

    def span(self, first: int, stop: int) -> Tensor:
        """Rows ``first:stop`` (stop - first, cols) on the CPU, as stored."""
        raw = torch.empty((stop - first) * self.row_bytes, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset + first * self.row_bytes)
            _read_exact(f, memoryview(raw.numpy()))
        return raw.view(self.dtype).reshape(stop - first, self.cols)

    def take(self, ids: Tensor) -> Tensor:
        """The rows of ``ids`` (any shape) -> (*ids.shape, cols), each distinct row read
        once."""
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        out = torch.empty(len(unique), self.cols, dtype=self.dtype)
        with open(self.path, "rb", buffering=0) as f:
            for j, i in enumerate(unique.tolist()):
                if not 0 <= i < self.rows:
                    raise IndexError(f"token id {i} is outside the vocabulary of {self.rows}")
                f.seek(self.offset + i * self.row_bytes)
                _read_exact(f, memoryview(out[j].view(torch.uint8).numpy()))
        return out[inverse.to(out.device)]  # (*ids.shape, cols)


class _ChunkedLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen ``W`` read a chunk of rows at a time (:class:`RowReader`),
    in the forward and again in the backward: the graph keeps nothing of ``W``, and no
    more than one chunk of it is in memory."""

    @staticmethod
    def forward(x: Tensor, rows: RowReader, device: torch.device,  # type: ignore[override]
                dtype: torch.dtype) -> Tensor:
        out = x.new_empty(*x.shape[:-1], rows.rows)  # (..., V)
        for a in range(0, rows.rows, rows.chunk):
            b = min(a + rows.chunk, rows.rows)
            w = rows.span(a, b).to(device=device, dtype=dtype)  # (chunk, H)
            out[..., a:b] = x @ w.T
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        _, ctx.rows, ctx.device, ctx.dtype = inputs

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        rows = ctx.rows
        grad_x = None
        for a in range(0, rows.rows, rows.chunk):
            b = min(a + rows.chunk, rows.rows)
            w = rows.span(a, b).to(device=ctx.device, dtype=ctx.dtype)  # (chunk, H)
            part = grad[..., a:b] @ w  # (..., H)
            grad_x = part if grad_x is None else grad_x + part
        return grad_x, None, None, None


def checkpoint_key(param_name: str) -> str:
    """The checkpoint's name of a parameter of a (possibly PEFT-wrapped) model."""
    return param_name.removeprefix(_PEFT_PREFIX).replace(_BASE_LAYER, "")


@dataclass(frozen=True)
class _Slot:
    """One frozen tensor: where it goes (module, attribute) and where it is read."""

    owner: nn.Module
    attr: str
    key: str
    placeholder: Tensor  # meta, of its shape and dtype: what the module holds between calls


class StreamedWeights:
    """The frozen parameters of ``model`` taken off it and read from ``folder``'s checkpoint
    around each call of the module that owns them (module docstring), onto ``device`` in
    ``dtype`` (floating tensors; others as stored). ``by_rows``: embeddings and linears
    (the LM head) whose weight is read a few rows at a time instead (:class:`RowReader`).
    The module is built for this: nothing is put back."""

    def __init__(self, model: nn.Module, folder: Path, *, device: torch.device,
                 dtype: torch.dtype, by_rows: Iterable[nn.Module] = ()):
        self.folder = folder
        self.device = device
        self.dtype = dtype
        self.stored = checkpoint_files(folder)
        self.reads = 0  # module reads so far (a block recomputed in backward reads again;
        # the modules read by rows not counted)
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                aliases.setdefault(id(p), []).append(checkpoint_key(name))
        key_of: dict[int, str] = {}
        for pid, names in aliases.items():
            found = [n for n in names if n in self.stored]
            if not found:
                raise ValueError(f"{folder}: the checkpoint has no tensor for the frozen "
                                 f"parameter {names[0]}")
            key_of[pid] = found[0]
        rowwise = {id(m) for m in by_rows}
        self._headers: Headers = {}
        self._loaded: list[_Slot] = []  # slots holding their weights now
        self.slots: dict[int, list[_Slot]] = {}
        for unit in list(model.modules()):  # each module with frozen weights of its own
            slots = [_Slot(unit, attr, key_of[id(p)],
                           torch.empty(p.shape, dtype=self._dtype_for(p), device="meta"))
                     for attr, p in list(unit._parameters.items())
                     if p is not None and not p.requires_grad]
            if not slots:
                continue
            for s in slots:
                del unit._parameters[s.attr]
                setattr(unit, s.attr, s.placeholder)
            self.slots[id(unit)] = slots
            if id(unit) in rowwise:
                self._by_rows(unit, slots)
                continue
            unit.register_forward_pre_hook(self._load)
            unit.register_forward_hook(self._release)
        nested = [n for n, m in model.named_modules() if id(m) in self.slots
                  and any(id(c) in self.slots for c in m.modules() if c is not m)]
        if nested:  # a read drops every other module's weights: calls must not nest
            raise ValueError(f"{nested[0]} and a module inside it both hold frozen weights; "
                             "streaming reads leaf modules' weights only")

    def _dtype_for(self, p: Tensor) -> torch.dtype:
        return self.dtype if p.is_floating_point() else p.dtype

    def _load(self, unit: nn.Module, _args: Any) -> None:
        self.release_all()  # a call cut short (module docstring); frozen modules are leaves
        slots = self.slots[id(unit)]
        values = read_unmapped(self.stored, {s.key for s in slots}, self._headers)
        self.reads += 1
        for s in slots:
            value = values[s.key]
            if value.shape != s.placeholder.shape:
                raise ValueError(f"{self.stored[s.key]}: {s.key} is {tuple(value.shape)}, "
                                 f"the model's parameter {tuple(s.placeholder.shape)}")
            setattr(s.owner, s.attr, value.to(device=self.device, dtype=s.placeholder.dtype))
        self._loaded = list(slots)

    def _release(self, _unit: nn.Module, _args: Any, _out: Any) -> None:
        self.release_all()

    def _by_rows(self, unit: nn.Module, slots: list[_Slot]) -> None:
        """Give ``unit`` (an embedding, or a linear without bias) a forward that reads its
        weight by rows from the checkpoint."""
        if len(slots) != 1 or slots[0].attr != "weight":
            raise ValueError(f"{type(unit).__name__}: only a weight (no bias) is read by rows")
        rows = RowReader(self.stored, slots[0].key, self._headers)
        device, dtype = self.device, slots[0].placeholder.dtype
        if isinstance(unit, nn.Embedding):
            unit.forward = lambda ids: rows.take(ids).to(device=device, dtype=dtype)
        elif isinstance(unit, nn.Linear):
            unit.forward = lambda x: _ChunkedLinear.apply(x, rows, device, dtype)
        else:
            raise ValueError(f"{type(unit).__name__} cannot be read by rows")

    def release_all(self) -> None:
        """Drop the weights any module holds now (after a backward whose recompute stopped
        inside a module's call)."""
        for s in self._loaded:
            setattr(s.owner, s.attr, s.placeholder)
        self._loaded = []


def real_rotary(model: nn.Module, device: torch.device | str) -> None:
    """Give a model built without weights (stand-in or meta buffers) its rotary tables: they
    come from the config, not the checkpoint. Every other buffer must be real already."""
    dec = layout.llama_decoder(model)
    config = getattr(dec, "config", None) or model.config
    dec.rotary_emb = type(dec.rotary_emb)(config=config).to(device)


def streamed_model(folder: Path, dtype: torch.dtype, device: torch.device | str) -> Any:
    """The causal LM in ``folder`` for inference with every weight streamed (a teacher pass
    that holds one block at a time), in eval mode; its ``streamed`` attribute counts the
    reads."""
    from recoup.stages.model.modelio import weightless_model

    model = weightless_model(folder, dtype)
    real_rotary(model, device)
    model.streamed = StreamedWeights(
        model, folder, device=torch.device(device), dtype=dtype,
        by_rows=[model.get_input_embeddings(), model.get_output_embeddings()])
    return model.eval()


class CheckpointTensors(Mapping[str, Tensor]):
    """The checkpoint's tensors by name, each read when asked for: what code that reads a
    few weights of a streamed model gets instead of its (absent) parameters."""

    def __init__(self, folder: Path, names: Iterable[str] | None = None):
        self.stored = checkpoint_files(folder)
        self.names = list(self.stored) if names is None else list(names)
        missing = [n for n in self.names if n not in self.stored]
        if missing:
            raise ValueError(f"{folder}: the checkpoint has no tensor {missing[0]}")

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.names:
            raise KeyError(name)
        return read_unmapped(self.stored, [name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


__all__ = ("CheckpointTensors", "StreamedWeights", "checkpoint_key", "read_unmapped",
           "real_rotary", "streamed_model")

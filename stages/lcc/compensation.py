"""RestoreLCC compensation: a trainable constant per chosen attention head, and its fold.

For a chosen (layer, head) the degraded model's ``o_proj`` input ``z`` (tokens,
n_heads * d_head) gets ``c = V^T beta + b`` added to that head's slice at every token.
``V`` (d_head, d_head) comes from the svd stage with its ROWS the right singular vectors,
so ``V^T beta`` is ``beta @ V`` here; ``beta`` and ``b`` (d_head,) are trained.

``c`` does not depend on the input, so ``o_proj(z + c) = W_o z + W_o c``: the export
folds it into an ``o_proj`` bias (:func:`fold_bias`) and the weights, sparsity included,
stay as they were.

The trainable parameters live in :class:`Compensation`, an ``nn.Module`` that is *called*
from a forward pre-hook on each ``o_proj``. Calling the module (rather than reading its
tensors from a closure) is what lets DeepSpeed ZeRO-3 gather its partitioned parameters
before use: ZeRO-3 fetches a module's parameters in that module's own pre-forward hook.
Nothing here reads files, imports Ray or DeepSpeed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from recoup.stages.lcc.heads import HeadId
from recoup.stages.model.layout import o_proj_modules

DEFAULT_INIT_STD = 1e-3
"""Standard deviation of the normal init of ``beta`` and ``b`` (the reference's N(0, 1e-3))."""

_KEY = re.compile(r"^layer\.(\d+)\.head\.(\d+)\.(beta|b|V)$")


def state_key(head: HeadId, name: str) -> str:
    """Key of one tensor in ``lcc.safetensors``: ``layer.{L}.head.{H}.{beta|b|V}``."""
    return f"layer.{head[0]}.head.{head[1]}.{name}"


def fold_bias(W_o: Tensor, c_full: Tensor) -> Tensor:
    """The ``o_proj`` bias equivalent to adding ``c_full`` to its input: ``W_o @ c_full``.

    ``W_o`` (hidden, n_heads * d_head) is the weight the model runs with (the degraded one,
    with any merged LoRA delta); ``c_full`` (n_heads * d_head,) holds every head's ``c`` in
    its slice and zeros elsewhere. Computed in float64, returned in ``W_o``'s dtype.
    """
    if W_o.ndim != 2 or c_full.shape != (W_o.shape[1],):
        raise ValueError(
            f"fold_bias needs W_o (out, in) and c (in,); got {tuple(W_o.shape)} and "
            f"{tuple(c_full.shape)}"
        )
    return (W_o.detach().double() @ c_full.detach().double()).to(W_o.dtype)  # (out,)


def beta_from_component(c: Tensor, V: Tensor) -> Tensor:
    """Coordinates of ``c`` in the rows of ``V``: ``beta`` with ``beta @ V == c``.

    ``c`` (k, d_head), ``V`` (k, d_head, d_head) with orthonormal rows -> (k, d_head).
    Used to start ``beta`` at the mean lost component (with ``b = 0``).
    """
    return torch.einsum("ke,kde->kd", c, V)  # beta_d = <c, V_d>


class LayerCompensation(nn.Module):
    """The chosen heads of one layer: ``c_k = beta_k @ V_k + b_k`` for each of its k heads.

    Called as ``module(z)`` with ``z`` (..., n_heads * d_head), the ``o_proj`` input, and
    returns ``z`` with each chosen head's ``c`` added to its slice.
    """

    def __init__(self, *, layer: int, heads: Sequence[int], n_heads: int, V: Tensor,
                 beta: Tensor, b: Tensor):
        super().__init__()
        k = len(heads)
        d_head = V.shape[-1]
        if V.shape != (k, d_head, d_head) or beta.shape != (k, d_head) or b.shape != (k, d_head):
            raise ValueError(
                f"layer {layer}: V must be ({k}, d, d) and beta, b ({k}, d); got "
                f"{tuple(V.shape)}, {tuple(beta.shape)}, {tuple(b.shape)}"
            )
        if len(set(heads)) != k or not all(0 <= h < n_heads for h in heads):
            raise ValueError(
                f"layer {layer}: heads {list(heads)} must be distinct in [0, {n_heads})"
            )
        self.layer = layer
        self.heads = tuple(int(h) for h in heads)
        self.n_heads = n_heads
        self.d_head = d_head
        self.register_buffer("V", V.detach().clone())  # (k, d_head, d_head), fixed
        self.register_buffer("index", torch.tensor(self.heads, dtype=torch.long), persistent=False)
        self.beta = nn.Parameter(beta.detach().clone())  # (k, d_head)
        self.b = nn.Parameter(b.detach().clone())  # (k, d_head)

    def components(self) -> Tensor:
        """(k, d_head): ``c`` of each chosen head of this layer, in ``self.heads`` order.
        In the parameters' dtype: a bf16 engine casts beta and b but keeps buffers (V) as
        they are."""
        V = self.V.to(self.beta.dtype)  # (k, d_head, d_head)
        return torch.einsum("kd,kde->ke", self.beta, V) + self.b

    def full_vector(self) -> Tensor:
        """(n_heads * d_head,): every chosen head's ``c`` in its slice, zeros elsewhere."""
        c = self.components()  # (k, d_head)
        full = c.new_zeros(self.n_heads, self.d_head).index_copy(0, self.index, c)
        return full.reshape(-1)  # (n_heads * d_head,)

    def forward(self, z: Tensor) -> Tensor:
        return z + self.full_vector().to(z.dtype)  # (..., n_heads * d_head)


InitKind = Literal["normal", "lost_component"]


class Compensation(nn.Module):
    """All chosen heads, grouped by layer: ``layers[str(L)]`` is a :class:`LayerCompensation`.

    Build it with :meth:`create` (fresh init) or :meth:`from_state` (a saved file); put it
    on a model with :func:`attach`.
    """

    def __init__(self, layers: Iterable[LayerCompensation], *, n_heads: int, d_head: int):
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_head
        ordered = sorted(layers, key=lambda m: m.layer)
        self.layers = nn.ModuleDict({str(m.layer): m for m in ordered})

    @classmethod
    def create(cls, chosen: Sequence[HeadId], V: Mapping[HeadId, Tensor], *, n_heads: int,
               init: InitKind = "normal", std: float = DEFAULT_INIT_STD,
               lost: Mapping[HeadId, Tensor] | None = None,
               generator: torch.Generator | None = None) -> Compensation:
        """Fresh compensation for ``chosen`` heads with fixed directions ``V[head]`` (d, d).

        ``init="normal"``: ``beta, b ~ N(0, std)`` (the reference). ``init="lost_component"``:
        ``beta`` so that ``beta @ V`` equals ``lost[head]`` (d,) and ``b = 0``, i.e. training
        starts from the mean activation shift the degradation caused.
        """
        if not chosen:
            raise ValueError("no heads chosen: the compensation would be empty")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"chosen heads repeat: {list(chosen)}")
        missing = [h for h in chosen if h not in V]
        if missing:
            raise ValueError(f"no V for chosen heads {missing[:5]}")
        d_head = next(iter(V.values())).shape[-1]
        by_layer: dict[int, list[int]] = {}
        for layer, head in sorted(chosen):
            by_layer.setdefault(layer, []).append(head)
        mods = []
        for layer, heads in by_layer.items():
            ids = [(layer, h) for h in heads]
            Vs = torch.stack([V[i].float() for i in ids])  # (k, d_head, d_head)
            if init == "normal":
                beta = torch.randn(len(ids), d_head, generator=generator) * std
                b = torch.randn(len(ids), d_head, generator=generator) * std
            elif init == "lost_component":
                if lost is None or any(i not in lost for i in ids):
                    raise ValueError("init 'lost_component' needs the lost component of every "
                                     "chosen head")
                c = torch.stack([lost[i].float() for i in ids])  # (k, d_head)
                beta = beta_from_component(c, Vs)
                b = torch.zeros_like(beta)
            else:
                raise ValueError(
                    f"unknown compensation init {init!r}; use normal or lost_component"
                )
            mods.append(LayerCompensation(layer=layer, heads=heads, n_heads=n_heads, V=Vs,
                                          beta=beta, b=b))
        return cls(mods, n_heads=n_heads, d_head=d_head)

    @property
    def chosen(self) -> list[HeadId]:
        return [(m.layer, h) for m in self.layers.values() for h in m.heads]

    def full_vectors(self) -> dict[int, Tensor]:
        """layer -> (n_heads * d_head,) vector added to that layer's ``o_proj`` input."""
        return {m.layer: m.full_vector() for m in self.layers.values()}

    def state_tensors(self) -> dict[str, Tensor]:
        """Flat ``{layer.L.head.H.beta|b|V: (d_head,) or (d_head, d_head)}`` on CPU."""
        out: dict[str, Tensor] = {}
        for m in self.layers.values():
            for i, h in enumerate(m.heads):
                head = (m.layer, h)
                out[state_key(head, "beta")] = m.beta[i].detach().cpu().clone()
                out[state_key(head, "b")] = m.b[i].detach().cpu().clone()
                out[state_key(head, "V")] = m.V[i].detach().cpu().clone()
        return out

    @classmethod
    def from_state(cls, tensors: Mapping[str, Tensor], *, n_heads: int) -> Compensation:
        """Inverse of :meth:`state_tensors` (the contents of ``lcc.safetensors``)."""
        parts: dict[HeadId, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            m = _KEY.match(key)
            if m is None:
                raise ValueError(f"unexpected key {key!r} in compensation state")
            parts.setdefault((int(m.group(1)), int(m.group(2))), {})[m.group(3)] = value
        incomplete = [h for h, p in parts.items() if set(p) != {"beta", "b", "V"}]
        if incomplete or not parts:
            raise ValueError(f"compensation state incomplete for heads {incomplete[:5]}")
        by_layer: dict[int, list[int]] = {}
        for layer, head in sorted(parts):
            by_layer.setdefault(layer, []).append(head)
        mods = []
        for layer, heads in by_layer.items():
            ids = [(layer, h) for h in heads]
            mods.append(LayerCompensation(
                layer=layer, heads=heads, n_heads=n_heads,
                V=torch.stack([parts[i]["V"] for i in ids]),
                beta=torch.stack([parts[i]["beta"] for i in ids]),
                b=torch.stack([parts[i]["b"] for i in ids]),
            ))
        d_head = mods[0].d_head
        return cls(mods, n_heads=n_heads, d_head=d_head)


@dataclass
class Attached:
    """Handles of the pre-hooks :func:`attach` put on a model; ``remove()`` detaches them."""

    handles: list[Any]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def attach(model: nn.Module, comp: Compensation) -> Attached:
    """Add each layer's compensation to its ``o_proj`` input with forward pre-hooks.

    The hooks call the :class:`LayerCompensation` module (see the module docstring for why
    it must be a call). Works on a plain causal LM and on a PEFT-wrapped one; with LoRA on
    ``o_proj`` the adapter sees the compensated input too, as it would after the fold.
    """
    o_projs = o_proj_modules(model)
    handles = []
    for key, mod in comp.layers.items():
        layer = int(key)
        if layer >= len(o_projs):
            raise ValueError(f"compensation for layer {layer}, the model has {len(o_projs)}")
        expected = comp.n_heads * comp.d_head
        in_features = getattr(o_projs[layer], "in_features", expected)
        if in_features != expected:
            raise ValueError(f"layer {layer}: o_proj takes {in_features} inputs, the compensation "
                             f"is for {comp.n_heads} heads x {comp.d_head}")

        def hook(_module: nn.Module, args: tuple[Any, ...], comp_layer: nn.Module = mod) -> Any:
            return (comp_layer(args[0]),) + tuple(args[1:])

        handles.append(o_projs[layer].register_forward_pre_hook(hook))
    return Attached(handles)


__all__ = (
    "Attached",
    "Compensation",
    "DEFAULT_INIT_STD",
    "HeadId",
    "LayerCompensation",
    "attach",
    "beta_from_component",
    "fold_bias",
    "state_key",
)

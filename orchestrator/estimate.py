"""Resource estimates: the records a stage's ``estimate=`` function reads and returns.

Each stage declares its own estimate beside its code (``register_stage(estimate=...)``):
a function of the model's shape, the stage's own config section and the cluster settings
to a :class:`StageEstimate`. ``recoup plan`` (:mod:`recoup.orchestrator.plan`) builds the
shape on the ``meta`` device and loops over the stages of the pipeline; a stage without an
estimate is listed as "no estimate", never skipped.

Every figure is a sum of named parts, each a product of model dimensions and config
values, so a figure can be checked by hand. The figures are what recoup's own code holds
at its peak, not allocator readings: they leave out CUDA context, allocator fragmentation
and library workspaces, which the ``headroom`` fraction of each GPU is kept for.

Units: 1 GB = 10**9 bytes throughout (an "80 GB" GPU is taken as 80e9 bytes, about 7%
less than its 80 GiB, which errs on the safe side).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from recoup.cluster.placement import placement_problem

if TYPE_CHECKING:
    from recoup.cluster.config import ClusterConfig
    from recoup.stages.model.modelio import ModelCard

GB = 1e9
FP32 = 4
FP64 = 8
DEFAULT_GPU_MEMORY_GB = 80.0
DEFAULT_HEADROOM = 0.10
"""Share of each GPU left for the CUDA context, allocator fragmentation and kernels."""
DEFAULT_GPUS_PER_NODE = 8
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Parameter counts of a model, from its config on the meta device."""

    name: str
    #: how the shape was found, for the report
    origin: str
    card: ModelCard
    params: int
    block_params: int
    #: (name in the block, out_features, in_features) of each linear of one decoder block
    block_linears: tuple[tuple[str, int, int], ...]

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.card.dtype]

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
    #: False for a stage that declares no estimate (its figures are unknown, not zero)
    estimated: bool = True


@dataclass(frozen=True, kw_only=True)
class EstimateInputs:
    """What a stage's estimate reads. Its own section is ``config``; sizes that another
    stage sets (collect's samples come from data, train's heads from select) are read from
    that stage's section in ``sections``, by stage name."""

    stage: str
    shape: ModelShape
    #: this stage's own config section
    config: Any
    cluster: ClusterConfig
    hardware: Hardware
    #: ``run.device``: 'cpu' plans say what a GPU run would need
    device: str
    pipeline: tuple[str, ...]
    #: every stage's config section, by stage name
    sections: Mapping[str, Any]

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def task_resources(self) -> tuple[float, float]:
        """(CPUs, GPUs) of this stage's own task (single-task stages)."""
        return self.cluster.resources_for(self.stage)


Estimate = Callable[[EstimateInputs], StageEstimate]


def gpus_for(nbytes: float, usable: float) -> int:
    """GPUs whose usable memory holds ``nbytes`` split evenly (at least 1 if any bytes)."""
    if nbytes <= 0:
        return 0
    return max(1, math.ceil(nbytes / usable))


def gpus_spread(weights_bytes: int, working_bytes: int, layer_bytes: int,
                usable: float) -> int | None:
    """GPUs one worker needs to hold a model whose weights accelerate's ``device_map``
    spreads over them, each GPU also holding ``working_bytes`` (a batch's activations).

    1 when weights and working set fit one GPU. Otherwise the weights are split in whole
    layers, so a GPU's share can exceed an even split by up to one layer: each GPU keeps
    room for the working set and one more layer (``layer_bytes``). None when a GPU cannot
    hold even that.
    """
    if weights_bytes + working_bytes <= usable:
        return 1
    room = usable - working_bytes - layer_bytes
    if room <= 0:
        return None
    return max(2, math.ceil(weights_bytes / room))


def forward_working_bytes(card: ModelCard, tokens: int, itemsize: int) -> int:
    """Transient tensors of one decoder layer's forward over ``tokens`` tokens: residual,
    normed input, q and attention output, k and v, and gate, up and their product."""
    per_token = 4 * card.hidden + 2 * card.kv_heads * card.d_head + 3 * card.intermediate
    return tokens * per_token * itemsize


def placement_note(hw: Hardware, bundles: list[dict[str, float]]) -> str | None:
    """Why a group of GPU workers cannot be placed on ``hw``'s nodes; None when it can."""
    if not bundles or not any(b.get("GPU", 0) for b in bundles):
        return None
    if hw.nodes is not None:
        problem = placement_problem(hw.nodes, bundles)
        return None if problem is None else f"does not fit {hw.nodes_origin}: {problem}"
    per = max(b.get("GPU", 0) for b in bundles)
    if per > hw.gpus_per_node:
        return f"one worker asks {per:g} GPUs, more than a node's {hw.gpus_per_node}"
    return None


def gb(n: float | None) -> str:
    """Bytes for people: GB above 50 MB, else MB; '-' for unknown."""
    if n is None:
        return "-"
    return f"{n / GB:.1f} GB" if n >= 0.05 * GB else f"{n / 1e6:.1f} MB"


def chosen_count(top_count: int | None, top_fraction: float | None, total: int) -> int:
    """Heads the select stage keeps of ``total`` (same rounding as ``HeadScores.top``)."""
    if top_count is not None:
        return min(top_count, total)
    assert top_fraction is not None
    return max(1, math.floor(top_fraction * total + 0.5))


def layer_task_host_bytes(card: ModelCard, samples: int, views: int) -> int:
    """Host bytes of one svd/select layer task: the layer's ``views`` activation views as
    float32 and a float64 difference of two of them."""
    row = card.heads * card.d_head
    return samples * row * (views * FP32 + FP64)


def layer_tasks_estimate(inp: EstimateInputs, *, host_bytes: int | None,
                         disk_bytes: int | None, notes: tuple[str, ...] = ()) -> StageEstimate:
    """A stage of one CPU task per decoder layer (svd, select): ``cpus_per_task`` and
    ``workers`` of its own section say how many run at once."""
    section, card = inp.config, inp.shape.card
    at_once = section.workers or card.layers
    first = (f"{card.layers} CPU tasks (one per layer), {section.cpus_per_task:g} CPUs each, "
             f"{at_once} at once")
    return StageEstimate(stage=inp.stage, workers=at_once, device_bytes=None,
                         host_bytes=host_bytes, disk_bytes=disk_bytes, gpus_config=0,
                         gpus_min=0, fits=True, notes=(first, *notes))

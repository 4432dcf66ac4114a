"""Does a group of resource bundles fit a cluster? Pure functions on resource dicts.

A *bundle* is what one worker asks for (``{"GPU": 1, "CPU": 4}``); a *node* is what one
machine offers (``{"GPU": 8, "CPU": 96}``). Ray places every bundle of a placement group
on a single node, and a training group (Ray Train ``TorchTrainer``) or an actor pool waits
forever, without an error, when its bundles cannot all be placed. These functions answer
the question before anything is launched: from ``ray.nodes()`` on a live cluster
(:func:`recoup.cluster.runtime.check_placement`), or from the node types of a cluster
launcher YAML (``recoup plan --cluster ray_cluster.yaml``).

No Ray import here: the inputs are plain mappings, so the logic is unit-tested on dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

Resources = Mapping[str, float]
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
#: Ray Train's default placement strategy for its worker group.
DEFAULT_STRATEGY: Strategy = "PACK"
_EPS = 1e-9


def _fits_in(bundle: Resources, free: Mapping[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items() if v > 0)


def _take(bundle: Resources, free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _size(bundle: Resources) -> tuple[float, ...]:
    # Scarce resources first: a GPU is harder to place than a CPU.
    return (bundle.get("GPU", 0.0), bundle.get("CPU", 0.0), sum(bundle.values()))


def _spread_match(nodes: Sequence[Resources], bundles: Sequence[Resources]) -> bool:
    """Each bundle on its own node: a bipartite matching (augmenting paths)."""
    owner: dict[int, int] = {}  # node -> bundle

    def assign(b: int, seen: set[int]) -> bool:
        for n, node in enumerate(nodes):
            if n in seen or not _fits_in(bundles[b], node):
                continue
            seen.add(n)
            if n not in owner or assign(owner[n], seen):
                owner[n] = b
                return True
        return False

    return all(assign(b, set()) for b in range(len(bundles)))


def placement_problem(nodes: Sequence[Resources], bundles: Sequence[Resources],
                      strategy: Strategy = DEFAULT_STRATEGY) -> str | None:
    """None if ``bundles`` can be placed on ``nodes`` under ``strategy``; else one sentence.

    ``nodes`` are the resources each node offers (free ones, for a live check). PACK and
    SPREAD only differ in preference, not in feasibility: every bundle must fit on some
    node with what earlier bundles left. They are decided by first-fit decreasing, which
    is exact for identical bundles (a training group) and a safe heuristic otherwise (it
    may say "no" for a mix of bundles that a cleverer packing would place).
    STRICT_PACK needs one node for all; STRICT_SPREAD a distinct node per bundle.
    """
    bundles = [b for b in bundles if any(v > 0 for v in b.values())]
    if not bundles:
        return None
    need = _total(bundles)
    have = _total(nodes)
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + _EPS < v}
    if short:
        what = ", ".join(f"{_num(v)} {k} (the cluster has {_num(h)})"
                         for k, (v, h) in sorted(short.items()))
        return f"{len(bundles)} bundle{_s(bundles)} need {what} in total"
    biggest = max(bundles, key=_size)
    if not any(_fits_in(biggest, n) for n in nodes):
        return (f"no node can hold one bundle of {_fmt(biggest)} "
                f"(largest node: {_fmt(max(nodes, key=_size)) if nodes else 'none'})")
    if strategy == "STRICT_PACK":
        if any(_fits_in(need, n) for n in nodes):
            return None
        return f"STRICT_PACK needs one node with {_fmt(need)}; none has that much"
    if strategy == "STRICT_SPREAD":
        if _spread_match(nodes, bundles):
            return None
        return (f"STRICT_SPREAD needs {len(bundles)} distinct nodes that each hold a bundle; "
                f"the cluster has {len(nodes)} nodes")
    free = [dict(n) for n in nodes]
    for i, b in enumerate(sorted(bundles, key=_size, reverse=True)):
        node = next((f for f in free if _fits_in(b, f)), None)
        if node is None:
            return (f"bundle {i + 1} of {len(bundles)} ({_fmt(b)}) finds no node with room "
                    f"left; the bundles fit in total but not node by node")
        _take(b, node)
    return None


def fits(nodes: Sequence[Resources], bundles: Sequence[Resources],
         strategy: Strategy = DEFAULT_STRATEGY) -> bool:
    """True if ``bundles`` can all be placed on ``nodes`` (see :func:`placement_problem`)."""
    return placement_problem(nodes, bundles, strategy) is None


def worker_group(workers: int, *, gpus: float, cpus: float) -> list[dict[str, float]]:
    """The bundles of ``workers`` identical workers (a training group, an actor pool)."""
    bundle = {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}
    return [dict(bundle) for _ in range(workers)]


def _total(items: Sequence[Resources]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in items:
        for k, v in r.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _s(items: Sequence[object]) -> str:
    return "" if len(items) == 1 else "s"


def _num(v: float) -> str:
    return f"{v:g}"


def _fmt(r: Resources) -> str:
    return "{" + ", ".join(f"{k}: {_num(v)}" for k, v in sorted(r.items()) if v > 0) + "}"

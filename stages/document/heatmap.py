"""A heat map of head scores: layers down, heads across, the chosen heads outlined.

Pure in the sense that matters here: scores and chosen heads in, one PNG file out, no
other state. Uses matplotlib's Agg backend through the object API (no ``pyplot`` global
figure state), so it works on headless machines and inside Ray workers.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from recoup.orchestrator.store import atomic_path

HeadId = tuple[int, int]

CELL_INCHES = 0.32
"""Side of one (layer, head) cell; 30 x 9 heads make a figure of about 4.9 x 10.6 in."""
MIN_SIDE_INCHES = 3.0
"""Smallest figure side, so that a 2 x 4 grid still has room for labels and a colour bar."""
DPI = 110


def plot_head_scores(scores: torch.Tensor, chosen: Iterable[HeadId], path: Path,
                     *, title: str) -> None:
    """Write a PNG heat map of ``scores`` (n_layers, n_heads) to ``path`` atomically.

    Row ``l``, column ``h`` is head ``(l, h)``; every chosen head gets a black outline,
    so the picture shows where in the network the selection landed.
    """
    if scores.ndim != 2 or 0 in scores.shape:
        raise ValueError(f"scores must be (n_layers, n_heads), got {tuple(scores.shape)}")
    n_layers, n_heads = scores.shape
    values = scores.detach().to(device="cpu", dtype=torch.float64).numpy()
    width = max(MIN_SIDE_INCHES, CELL_INCHES * n_heads + 2.0)
    height = max(MIN_SIDE_INCHES, CELL_INCHES * n_layers + 1.2)
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="score")
    for layer, head in chosen:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(f"chosen head {(layer, head)} is outside the "
                             f"{n_layers} x {n_heads} grid")
        ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False,
                               edgecolor="black", linewidth=1.5))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")

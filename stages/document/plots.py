"""The report's plots, each a PNG as bytes (matplotlib's Agg backend, object API, no
global figure state): zero-shot accuracy bars, head scores, singular value spectra, layer
sensitivity and the training loss. A plot whose stage is not in the run is left out.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recoup.stages.document.facts import MODELS, RunFacts

PLOT_DPI = 100


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def plot_task_accuracy(series: Mapping[str, Mapping[str, Mapping[str, float]]],
                       order: Sequence[str] = ()) -> bytes:
    """Grouped bars: per task, one bar per series (model or run); acc and acc_norm panels.
    ``series``: label -> task -> {"acc", "acc_norm"?}; tasks in ``order``, then the rest."""
    tasks = list(dict.fromkeys([*order, *(t for s in series.values() for t in s)]))
    keys = [k for k in ("acc", "acc_norm")
            if any(k in s.get(t, {}) for s in series.values() for t in tasks)]
    fig = _figure(max(6.0, 1.2 * len(tasks) * len(keys) + 2), 3.6)
    width = 0.8 / max(1, len(series))
    for p, key in enumerate(keys):
        ax = fig.add_subplot(1, len(keys), p + 1)
        shown = [t for t in tasks if any(key in s.get(t, {}) for s in series.values())]
        for i, (label, per_task) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(shown))]
            ys = [100 * per_task.get(t, {}).get(key, float("nan")) for t in shown]
            ax.bar(xs, ys, width=width, label=label)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels(shown, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{key} (%)")
        ax.set_ylim(0, 100)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def _read_heads(select_dir: Path) -> dict[str, Any] | None:
    """``heads.json`` as the plots read it; None when it is missing or unreadable."""
    from recoup.stages.lcc.heads_file import read_heads

    try:
        method, chosen, scores = read_heads(select_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"method": method, "chosen": chosen,
            "scores": scores.to_records() if scores is not None else []}


def head_scores_png(select_dir: Path) -> bytes | None:
    """The select stage's heat map (``scores.png``), drawn from ``heads.json`` if absent."""
    png = select_dir / "scores.png"
    if png.is_file():
        return png.read_bytes()
    heads = _read_heads(select_dir)
    if not heads or not heads.get("scores"):
        return None
    import tempfile

    import torch

    from recoup.stages.document.heatmap import plot_head_scores

    n_layers = 1 + max(int(s["layer"]) for s in heads["scores"])
    n_heads = 1 + max(int(s["head"]) for s in heads["scores"])
    grid = torch.full((n_layers, n_heads), float("nan"))
    for s in heads["scores"]:
        grid[int(s["layer"]), int(s["head"])] = float(s["score"])
    chosen = [(int(a), int(b)) for a, b in heads.get("chosen", [])]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scores.png"
        plot_head_scores(grid, chosen, path, title=f"head scores ({heads.get('method', '?')})")
        return path.read_bytes()


_SVD_FILE = re.compile(r"^layer=(\d+)\.safetensors$")


def _svd_spectra(svd_dir: Path) -> dict[int, Any]:
    """layer -> S (n_heads, r) from the svd stage's files."""
    from safetensors import safe_open

    out = {}
    for path in sorted(svd_dir.glob("layer=*.safetensors")):
        match = _SVD_FILE.match(path.name)
        if match:
            with safe_open(str(path), framework="pt") as f:
                out[int(match.group(1))] = f.get_tensor("S").float()
    return out


def spectra_png(svd_dir: Path, select_dir: Path | None, n: int) -> bytes | None:
    """Singular values of ΔZ for ``n`` heads: the best chosen heads, else the heads with
    the largest top singular value. Log scale: how concentrated the lost part is."""
    if n == 0:
        return None
    spectra = _svd_spectra(svd_dir)
    if not spectra:
        return None
    heads = _read_heads(select_dir) if select_dir is not None else None
    picked = [(int(a), int(b)) for a, b in (heads or {}).get("chosen", [])
              if int(a) in spectra][:n]
    if not picked:
        tops = sorted(((float(S[h, 0]), layer, h) for layer, S in spectra.items()
                       for h in range(S.shape[0])), reverse=True)
        picked = [(layer, h) for _, layer, h in tops[:n]]
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot()
    for layer, h in picked:
        s = spectra[layer][h]
        ax.semilogy(range(1, len(s) + 1), s.clamp_min(1e-12).tolist(), marker=".",
                    label=f"layer {layer}, head {h}")
    ax.set_xlabel("singular value index")
    ax.set_ylabel("singular value of ΔZ")
    ax.set_title("spectra of the lost activations (dense − degraded)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def read_train_log(train_dir: Path) -> list[dict[str, Any]]:
    path = train_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_png(log: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Training loss per optimizer step, and the learning rate on a second axis."""
    points = [(r["step"], r["loss"]) for r in log if "step" in r and "loss" in r]
    if not points:
        return None
    fig = _figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.plot([p[0] for p in points], [p[1] for p in points], color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr = [(r["step"], r["lr"]) for r in log if "step" in r and "lr" in r]
    if lr:
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in lr], [p[1] for p in lr], color="tab:gray", linestyle="--",
                 linewidth=1)
        ax2.set_ylabel("learning rate", color="tab:gray")
    ax.set_title("training loss", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def sensitivity_png(errors: Sequence[float], lora_layers: Sequence[int]) -> bytes | None:
    """One bar per decoder layer: how far compression moved its output; LoRA layers dark."""
    if not errors:
        return None
    fig = _figure(6.0, 3.0)
    ax = fig.add_subplot()
    chosen = set(lora_layers)
    ax.bar(range(len(errors)), errors,
           color=["tab:red" if i in chosen else "tab:gray" for i in range(len(errors))])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("layer sensitivity" + (" (red: LoRA layers)" if chosen else ""), fontsize=9)
    fig.tight_layout()
    return _png(fig)


@dataclass(frozen=True, kw_only=True)
class Plot:
    title: str
    png: bytes
    caption: str = ""


def plots(facts: RunFacts, spectra_heads: int) -> list[Plot]:
    out = []
    models = facts.evaluation.get("models", {})
    series = {k: models[k]["zeroshot"] for k in MODELS if models.get(k, {}).get("zeroshot")}
    if series:
        out.append(Plot(title="Zero-shot accuracy per task",
                        png=plot_task_accuracy(series, facts.evaluation["zeroshot_tasks"])))
    if "select" in facts.folders and (png := head_scores_png(facts.folders["select"])):
        method = facts.metrics("select").get("method", "")
        out.append(Plot(title="Head scores", png=png,
                        caption=f"selector {method}; chosen heads outlined".strip()))
    if "svd" in facts.folders and (png := spectra_png(facts.folders["svd"],
                                                      facts.folders.get("select"),
                                                      spectra_heads)):
        out.append(Plot(title="Singular value spectra", png=png))
    if "sensitivity" in facts.manifests:
        lora = facts.metrics("train").get("lora_layers", [])  # {} when train is absent
        if png := sensitivity_png(facts.metrics("sensitivity")["errors"], lora):
            out.append(Plot(title="Layer sensitivity", png=png))
    if "train" in facts.folders and (png := loss_png(read_train_log(facts.folders["train"]))):
        out.append(Plot(title="Training loss", png=png))
    return out

"""report: one table and a few plots that say whether a recovery worked.

The table puts dense, degraded and recovered side by side for every metric the evaluate
stage measured (WikiText-2 perplexity, KL to dense, zero-shot accuracy per task and on
average), with the fraction of the dense-vs-degraded gap that recovery closed, the
trainable-parameter overhead, the sparsity kept, and the wall time of every stage. It is
written as Markdown (``report.md``) and as one self-contained HTML page (``report.html``:
inline CSS, plots as base64 PNG, no scripts, nothing fetched) with per-task accuracy
bars, the head-score heat map, singular value spectra of the best heads and the training
loss. A plot or row whose stage is not in the run is left out.

Everything is read from complete stage folders (manifest present and current), so the
same code serves the ``report`` stage, ``recoup report RUN_DIR`` and
``recoup compare RUN_DIR...`` (one column per run, for ablations).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from recoup.orchestrator import store
from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.stage import Metrics, StageContext, get_stage, register_stage
from recoup.orchestrator.store import atomic_write_text

MARKDOWN = "report.md"
HTML = "report.html"
MODELS = ("dense", "degraded", "recovered")
#: The stages a report reads when they are in the pipeline, in pipeline order.
SOURCE_STAGES = ("prepare", "synthesize", "degrade", "data", "sensitivity", "collect", "svd",
                 "select", "train", "export", "evaluate")
PLOT_DPI = 100


class ReportConfig(StrictModel):
    title: str | None = Field(None, description="Report title; unset: the run folder's name.")
    spectra_heads: int = Field(
        4, ge=0,
        description="Heads whose singular value spectra are plotted: the best-scored chosen "
        "heads (select), else the heads with the largest top singular value.",
    )


# --------------------------------------------------------------------------- run facts


@dataclass(frozen=True, kw_only=True)
class RunFacts:
    """The complete stages of one run: folder and manifest of each, in pipeline order."""

    name: str
    folders: dict[str, Path]
    manifests: dict[str, store.Manifest]
    #: stages present in the run but not usable (stale, failed, ...), with the reason
    skipped: dict[str, str] = field(default_factory=dict)

    def metrics(self, stage: str) -> dict[str, Any]:
        m = self.manifests.get(stage)
        return m.metrics if m is not None else {}

    def config(self, stage: str) -> dict[str, Any]:
        m = self.manifests.get(stage)
        return m.config if m is not None else {}

    @property
    def evaluation(self) -> dict[str, Any]:
        return self.metrics("evaluate")


def facts_from_folders(name: str, folders: Mapping[str, Path]) -> RunFacts:
    """Facts from stage folders the runner already verified (the report stage's inputs),
    ordered as the pipeline runs them."""
    order = {s: i for i, s in enumerate(SOURCE_STAGES)}
    names = sorted(folders, key=lambda s: (order.get(s, len(order)), s))
    return RunFacts(name=name, folders={s: folders[s] for s in names},
                    manifests={s: store.read_manifest(folders[s]) for s in names})


def facts_from_run_dir(run_dir: Path) -> RunFacts:
    """Facts from a run directory: every stage of its last config that is done (manifest
    current, outputs of the recorded sizes); the others are listed as skipped."""
    from recoup.orchestrator.runner import load_run_dir_config, plan_run

    cfg = load_run_dir_config(run_dir)
    folders: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for plan in plan_run(cfg, verify="size"):
        if plan.name == "report":
            continue
        if plan.state == "done":
            folders[plan.name] = run_dir / plan.name
        elif (run_dir / plan.name).exists():
            why = plan.reasons[0][:120] if plan.reasons else ""
            if len(plan.reasons) > 1:
                why += f"; {len(plan.reasons) - 1} more reasons"
            skipped[plan.name] = plan.state + (f" ({why})" if why else "")
    facts = facts_from_folders(run_dir.resolve().name, folders)
    return RunFacts(name=facts.name, folders=facts.folders, manifests=facts.manifests,
                    skipped=skipped)


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True, kw_only=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    #: css class of each row (e.g. "total"), parallel to rows
    kinds: tuple[str, ...] = ()
    #: indices of columns of text (left-aligned); the others hold numbers
    text_columns: tuple[int, ...] = (0,)

    def markdown(self) -> str:
        def cell(s: str) -> str:
            return s.replace("|", "\\|")

        lines = ["| " + " | ".join(cell(h) for h in self.header) + " |",
                 "|" + "|".join("---" if i in self.text_columns else "---:"
                                for i in range(len(self.header))) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self, table_id: str) -> str:
        head = "".join(f'<th class="text">{html.escape(h)}</th>' if i in self.text_columns
                       else f"<th>{html.escape(h)}</th>" for i, h in enumerate(self.header))
        body = []
        kinds = self.kinds or ("",) * len(self.rows)
        for row, kind in zip(self.rows, kinds, strict=True):
            cls = f' class="{kind}"' if kind else ""
            body.append(f"<tr{cls}>" + "".join(
                f'<td class="text">{html.escape(c)}</td>' if i in self.text_columns
                else f"<td>{html.escape(c)}</td>" for i, c in enumerate(row)) + "</tr>")
        return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>'
                + "".join(body) + "</tbody></table>")


def gap_fraction(dense: float, degraded: float, recovered: float, *,
                 higher_is_better: bool) -> float | None:
    """Share of the dense-vs-degraded gap recovered (1 = back to dense, 0 = no better than
    degraded, negative = worse); None when degradation cost nothing on this metric (equal,
    or degraded better than dense: there is no gap to close)."""
    lost = dense - degraded if higher_is_better else degraded - dense
    if lost <= 0:
        return None
    return (degraded - recovered) / (degraded - dense)


@dataclass(frozen=True, kw_only=True)
class Metric:
    label: str
    #: model name -> value
    values: dict[str, float]
    fmt: str
    higher_is_better: bool

    def cell(self, model: str) -> str:
        v = self.values.get(model)
        return "—" if v is None else format(v, self.fmt)

    def gap(self) -> float | None:
        if not all(m in self.values for m in MODELS):
            return None
        return gap_fraction(*(self.values[m] for m in MODELS),
                            higher_is_better=self.higher_is_better)


def _pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if abs(x) >= 5e-4 else "0.0%"  # no "-0.0%"


def quality_metrics(evaluation: Mapping[str, Any]) -> list[Metric]:
    """The evaluate stage's numbers as rows: perplexity, KL, each task's acc (and acc_norm
    where lm-eval defines it), the averages. Accuracies in percent."""
    models: dict[str, dict[str, Any]] = evaluation.get("models", {})
    if not models:
        return []
    out = [
        Metric(label="WikiText-2 perplexity ↓",
               values={k: v["ppl"] for k, v in models.items() if "ppl" in v}, fmt=".2f",
               higher_is_better=False),
        Metric(label="KL to dense ↓",
               values={k: v["kl_to_dense"] for k, v in models.items() if "kl_to_dense" in v},
               fmt=".4f", higher_is_better=False),
    ]
    for task in evaluation.get("zeroshot_tasks", []):
        for key in ("acc", "acc_norm"):
            vals = {k: 100 * v["zeroshot"][task][key] for k, v in models.items()
                    if key in v.get("zeroshot", {}).get(task, {})}
            if vals:
                out.append(Metric(label=f"{task} {key} (%)", values=vals, fmt=".1f",
                                  higher_is_better=True))
    for key in ("acc", "acc_norm"):
        vals = {k: 100 * v["zeroshot_avg"][key] for k, v in models.items()
                if key in v.get("zeroshot_avg", {})}
        if vals:
            out.append(Metric(label=f"average {key} (%)", values=vals, fmt=".1f",
                              higher_is_better=True))
    return out


def trainable(facts: RunFacts) -> tuple[int, float] | None:
    """(trainable parameters, fraction of the base model) from export, else train."""
    for stage in ("export", "train"):
        m = facts.metrics(stage)
        if "trainable_params" in m and "trainable_fraction" in m:
            return int(m["trainable_params"]), float(m["trainable_fraction"])
    return None


def _sparsity(facts: RunFacts) -> dict[str, float]:
    models = facts.evaluation.get("models", {})
    out = {k: v["linear_sparsity"] for k, v in models.items() if "linear_sparsity" in v}
    degrade = facts.metrics("degrade")
    if "degraded" not in out and "linear_sparsity" in degrade:
        out["degraded"] = degrade["linear_sparsity"]
    return out


def results_table(facts: RunFacts) -> Table:
    """Dense / degraded / recovered per metric, the gap closed, then the costs."""
    metrics = quality_metrics(facts.evaluation)
    models = facts.evaluation.get("models", {})
    has_rec = "recovered" in models
    cols = ["dense", "degraded"] + (["recovered", "gap closed"] if has_rec else [])
    rows: list[tuple[str, ...]] = []
    for m in metrics:
        row = [m.label, m.cell("dense"), m.cell("degraded")]
        if has_rec:
            row += [m.cell("recovered"), _pct(m.gap())]
        rows.append(tuple(row))
    sparsity = _sparsity(facts)
    if sparsity:
        row = ["linear sparsity (%)"] + [_pct(sparsity.get(c)).rstrip("%")
                                         if c in sparsity else "—" for c in cols[:2]]
        if has_rec:
            rec, deg = sparsity.get("recovered"), sparsity.get("degraded")
            kept = f"kept {_pct(rec / deg)}" if rec is not None and deg else "—"
            row += [_pct(rec).rstrip("%") if rec is not None else "—", kept]
        rows.append(tuple(row))
    tp = trainable(facts)
    if tp is not None:
        cell = f"{tp[0]:,} ({100 * tp[1]:.4f}%)"
        row = ["trainable parameters", "—", "—"] + ([cell, ""] if has_rec else [])
        rows.append(tuple(row))
    return Table(header=("metric", *cols), rows=tuple(rows))


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {s:02.0f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes):02d} min"


def _stage_summary(stage: str, metrics: Mapping[str, Any]) -> str:
    try:
        return get_stage(stage).summarize(dict(metrics))
    except (KeyError, TypeError, ValueError):  # an older manifest without some metric
        return ""


def timing_table(facts: RunFacts) -> Table:
    """Wall time of every complete stage (from its manifest) and its one-line summary."""
    rows = [(s, _duration(m.duration_s), _stage_summary(s, m.metrics))
            for s, m in facts.manifests.items()]
    total = sum(m.duration_s for m in facts.manifests.values())
    rows.append(("total", _duration(total), ""))
    return Table(header=("stage", "wall time", "summary"), rows=tuple(rows),
                 kinds=("",) * (len(rows) - 1) + ("total",), text_columns=(0, 2))


def notes(facts: RunFacts) -> list[str]:
    """How the numbers were measured, in sentences under the table."""
    ev = facts.evaluation
    out = []
    if ev:
        out.append(f"Perplexity: {ev['windows']} windows of {ev['seq_len']} tokens from the "
                   "start of WikiText-2 test; KL: mean token KL(dense || model) on them.")
    if ev.get("zeroshot_tasks"):
        limit = ev.get("zeroshot_limit")
        scope = "all documents" if limit is None else f"the first {limit} documents"
        out.append(f"Zero-shot: lm-evaluation-harness {ev.get('lm_eval', '')} task "
                   f"definitions on local files, {scope} of each task; acc_norm = "
                   "log-likelihood divided by the answer's length in characters; the average "
                   "acc_norm uses acc for tasks without acc_norm (boolq).")
        errs = [t[k] for m in ev.get("models", {}).values()
                for t in m.get("zeroshot", {}).values()
                for k in ("acc_stderr", "acc_norm_stderr") if math.isfinite(t.get(k, math.nan))]
        if errs:
            out.append(f"Standard error of a task accuracy here: up to {100 * max(errs):.1f} "
                       "points (lm-eval's acc_stderr); smaller differences are noise.")
    if "recovered" in ev.get("models", {}):
        out.append("Gap closed = (degraded − recovered) / (degraded − dense): 100% is back to "
                   "dense, 0% no better than degraded; — where degradation cost nothing on "
                   "that metric.")
    if "synthesize" in facts.manifests:
        m = facts.metrics("synthesize")
        out.append(f"Data-free: the dense model wrote {m['samples']} {m['mode']} samples "
                   f"itself ({m['duplicates']} duplicates and {m['too_short']} too-short ones "
                   "dropped); stages whose data source is 'synthetic' read only those.")
    if "sensitivity" in facts.manifests:
        m = facts.metrics("sensitivity")
        out.append(f"Layer sensitivity: relative output error of each degraded decoder layer, "
                   f"fed the dense model's input to it, on {m['samples']} samples of the data "
                   "stage; LoRA's auto layers are the highest.")
    for stage, why in facts.skipped.items():
        out.append(f"Stage {stage} is not included: {why}.")
    return out


# --------------------------------------------------------------------------- plots


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
    path = select_dir / "heads.json"
    return json.loads(path.read_text()) if path.is_file() else None


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


# --------------------------------------------------------------------------- documents


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; padding: 0 1.5em;
       max-width: 70em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }
th.text, td.text { text-align: left; }
thead th { background: #f0f0f0; }
tr.total td { font-weight: bold; }
p.note { color: #555; font-size: 0.88em; margin: 0.2em 0; }
figure { display: inline-block; margin: 0.6em 1.2em 0.6em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
"""


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_page(title: str, sections: Sequence[tuple[str, str]], notes_: Sequence[str],
              figures: Sequence[Plot]) -> str:
    """A self-contained page: sections of (heading, HTML), notes, then the figures."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, body in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>{body}")
        if heading == sections[0][0]:
            parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes_]
    if figures:
        parts.append("<h2>Plots</h2>")
        for p in figures:
            cap = html.escape(p.title + (f": {p.caption}" if p.caption else ""))
            parts.append(f"<figure>{_img(p.png, p.title)}<figcaption>{cap}</figcaption></figure>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


@dataclass(frozen=True, kw_only=True)
class Report:
    markdown: str
    html: str
    table: Table


def build_report(facts: RunFacts, *, title: str | None = None,
                 spectra_heads: int = 4) -> Report:
    title = title or f"recoup report: {facts.name}"
    results, timing = results_table(facts), timing_table(facts)
    notes_ = notes(facts)
    figures = plots(facts, spectra_heads)
    md = [f"# {title}", "", "## Results", "", results.markdown(), ""]
    md += [f"- {n}" for n in notes_] + ([""] if notes_ else [])
    md += ["## Wall time per stage", "", timing.markdown(), ""]
    if figures:
        md += ["Plots (" + ", ".join(p.title.lower() for p in figures) + f"): see {HTML}.", ""]
    page = html_page(title, [("Results", results.html("results")),
                             ("Wall time per stage", timing.html("timing"))], notes_, figures)
    return Report(markdown="\n".join(md), html=page, table=results)


def write_report(report: Report, out_dir: Path, stem: str = "report") -> tuple[Path, Path]:
    md, page = out_dir / f"{stem}.md", out_dir / f"{stem}.html"
    atomic_write_text(md, report.markdown)
    atomic_write_text(page, report.html)
    return md, page


# --------------------------------------------------------------------------- compare


def _get(d: Mapping[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, Mapping) or p not in d:
            return None
        d = d[p]
    return d


def describe_run(facts: RunFacts) -> dict[str, str]:
    """What distinguishes one run of an ablation: degradation, recovery, selector, cost."""
    deg = facts.config("degrade")
    sel = _get(facts.config("select"), "selector") or {}
    degrade = "—"
    if deg:
        method = deg.get("method", "?")
        pattern = deg.get("pattern")
        if method == "rtn":
            degrade = f"rtn int{deg.get('bits')}"
        elif method == "given":
            degrade = "given"
        elif pattern and pattern != "unstructured":
            degrade = f"{method} {pattern}"
        else:
            degrade = f"{method} {_pct(deg.get('sparsity'))}"
    selector = "—"
    if "select" in facts.manifests:
        size = (f"top {sel['top_count']}" if sel.get("top_count")
                else f"top {_pct(sel.get('top_fraction'))}")
        selector = f"{sel.get('method', '?')}, {size}"
    tp = trainable(facts)
    total = sum(m.duration_s for m in facts.manifests.values())
    data = "—"
    if "data" in facts.manifests:
        src = _get(facts.config("data"), "source") or {}
        data = f"{src.get('source', '?')}, {facts.metrics('data').get('samples', '?')} samples"
    return {
        "degradation": degrade,
        "recovery": str(facts.config("train").get("method", "—")) if "train" in facts.manifests
        else "—",
        "training data": data,
        "selector": selector,
        "trainable parameters": "—" if tp is None else f"{tp[0]:,} ({100 * tp[1]:.4f}%)",
        "wall time (all stages)": _duration(total),
    }


def compare_table(runs: Sequence[RunFacts]) -> tuple[Table, list[str]]:
    """Metrics down, runs across: dense and degraded of the first run, then each run's
    recovered value with the gap it closed (against its own dense and degraded)."""
    if not runs:
        raise ValueError("nothing to compare: no runs given")
    ref = next((r for r in runs if r.evaluation), None)
    if ref is None:
        raise ValueError("none of the runs has a complete evaluate stage")
    ref_keys = ref.evaluation.get("model_keys", {})
    header = ("metric", "dense", "degraded", *(r.name for r in runs))
    rows: list[tuple[str, ...]] = []
    kinds: list[str] = []
    described = [describe_run(r) for r in runs]
    for key in described[0]:
        rows.append((key, "", "", *(d[key] for d in described)))
        kinds.append("setup")
    per_run = [{m.label: m for m in quality_metrics(r.evaluation)} for r in runs]
    notes_: list[str] = []
    for metric in quality_metrics(ref.evaluation):
        row = [metric.label, metric.cell("dense"), metric.cell("degraded")]
        for mets in per_run:
            m = mets.get(metric.label)
            if m is None or "recovered" not in m.values:
                row.append("—")
            else:
                row.append(f"{m.cell('recovered')} ({_pct(m.gap())})")
        rows.append(tuple(row))
        kinds.append("")
    for r in runs:
        keys = r.evaluation.get("model_keys", {})
        if r is not ref and any(keys.get(k) != ref_keys.get(k) for k in ("dense", "degraded")):
            notes_.append(f"{r.name}: its dense or degraded model differs from {ref.name}'s; "
                          "its gap closed is measured against its own.")
    notes_.append("Each run's cell: recovered value (gap closed against that run's dense and "
                  "degraded models).")
    notes_ += [f"{r.name}: stage {stage} is not included: {why}."
               for r in runs for stage, why in r.skipped.items()]
    return Table(header=header, rows=tuple(rows), kinds=tuple(kinds)), notes_


def build_comparison(runs: Sequence[RunFacts]) -> Report:
    table, notes_ = compare_table(runs)
    title = "recoup comparison: " + ", ".join(r.name for r in runs)
    series: dict[str, Any] = {}
    ref = next(r for r in runs if r.evaluation)
    ref_models = ref.evaluation["models"]
    for k in ("dense", "degraded"):
        if ref_models.get(k, {}).get("zeroshot"):
            series[k] = ref_models[k]["zeroshot"]
    for r in runs:
        rec = r.evaluation.get("models", {}).get("recovered", {})
        if rec.get("zeroshot"):
            series[r.name] = rec["zeroshot"]
    order = ref.evaluation.get("zeroshot_tasks", [])
    figures = ([Plot(title="Zero-shot accuracy per task",
                     png=plot_task_accuracy(series, order))] if len(series) > 1 else [])
    md = [f"# {title}", "", table.markdown(), ""] + [f"- {n}" for n in notes_]
    page = html_page(title, [("Runs", table.html("compare"))], notes_, figures)
    return Report(markdown="\n".join(md) + "\n", html=page, table=table)


# --------------------------------------------------------------------------- the stage


def _printed(m: Metrics) -> str:
    return m["table"] + f"\n\nreport: {m['html']}"


@register_stage(name="report", version=1, requires=("evaluate",),
                optional=tuple(s for s in SOURCE_STAGES if s != "evaluate"),
                summarize=lambda m: f"{m['plots']} plots", report=_printed)
def report_stage(ctx: StageContext) -> Metrics:
    cfg: ReportConfig = ctx.config
    facts = facts_from_folders(ctx.run_dir.resolve().name, ctx.inputs)
    rep = build_report(facts, title=cfg.title, spectra_heads=cfg.spectra_heads)
    write_report(rep, ctx.out_dir)
    return {"table": rep.table.markdown(), "plots": rep.html.count("<img "),
            "html": str(ctx.run_dir / "report" / HTML),
            "markdown": str(ctx.run_dir / "report" / MARKDOWN)}

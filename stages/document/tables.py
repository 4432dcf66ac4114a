"""The report's tables: results (dense / degraded / recovered, gap closed, costs), wall
time per stage, the notes under them, and the run-by-run comparison of an ablation.

A :class:`Table` renders itself as Markdown and as HTML; the gap closed of every row is
:func:`recoup.stages.scoring.gap.gap_closed` (on log-perplexity for perplexity), the same
number the evaluate stage prints.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from recoup.orchestrator.stage import get_stage
from recoup.stages.document.facts import MODELS, RunFacts
from recoup.stages.scoring.gap import RULES, GapRule, gap_closed


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


@dataclass(frozen=True, kw_only=True)
class Metric:
    label: str
    #: model name -> value
    values: dict[str, float]
    fmt: str
    #: how the gap closed is measured on this metric (direction, linear or log scale)
    rule: GapRule

    def cell(self, model: str) -> str:
        v = self.values.get(model)
        return "—" if v is None else format(v, self.fmt)

    def gap(self) -> float | None:
        if not all(m in self.values for m in MODELS):
            return None
        return gap_closed(*(self.values[m] for m in MODELS),
                          higher_is_better=self.rule.higher_is_better, scale=self.rule.scale)


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
               rule=RULES["ppl"]),
        Metric(label="KL to dense ↓",
               values={k: v["kl_to_dense"] for k, v in models.items() if "kl_to_dense" in v},
               fmt=".4f", rule=RULES["kl_to_dense"]),
    ]
    for task in evaluation.get("zeroshot_tasks", []):
        for key in ("acc", "acc_norm"):
            vals = {k: 100 * v["zeroshot"][task][key] for k, v in models.items()
                    if key in v.get("zeroshot", {}).get(task, {})}
            if vals:
                out.append(Metric(label=f"{task} {key} (%)", values=vals, fmt=".1f",
                                  rule=RULES[key]))
    for key in ("acc", "acc_norm"):
        vals = {k: 100 * v["zeroshot_avg"][key] for k, v in models.items()
                if key in v.get("zeroshot_avg", {})}
        if vals:
            out.append(Metric(label=f"average {key} (%)", values=vals, fmt=".1f",
                              rule=RULES[key]))
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
        start = ev.get("window_start", 0)
        where = f"from window {start} of" if start else "from the start of"
        out.append(f"Perplexity: {ev['windows']} windows of {ev['seq_len']} tokens {where} "
                   "WikiText-2 test; KL: mean token KL(dense || model) on them.")
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
        out.append("Gap closed = (degraded − recovered) / (degraded − dense), on the log of "
                   "perplexity (the mean token NLL) and on the plain values of the others: "
                   "100% is back to dense, 0% no better than degraded; — where degradation "
                   "cost nothing on that metric.")
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

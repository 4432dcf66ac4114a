"""The report as documents: one Markdown file and one self-contained HTML page (inline
CSS, plots as base64 PNG, no scripts, nothing fetched), for one run or a comparison."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recoup.orchestrator.store import atomic_write_text
from recoup.stages.document.facts import RunFacts
from recoup.stages.document.plots import Plot, plot_task_accuracy, plots
from recoup.stages.document.tables import (
    Table,
    compare_table,
    notes,
    results_table,
    timing_table,
)

MARKDOWN = "report.md"
HTML = "report.html"


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

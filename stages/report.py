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
same code (:mod:`recoup.stages.document`: facts, tables, plots, pages) serves this stage,
``recoup report RUN_DIR`` and ``recoup compare RUN_DIR...`` (one column per run, for
ablations). The gap closed is :mod:`recoup.stages.scoring.gap`'s: on log-perplexity for
perplexity (version 2), the number the evaluate stage prints too.
"""

from __future__ import annotations

from pydantic import Field

from recoup.orchestrator.config import StrictModel
from recoup.orchestrator.estimate import EstimateInputs, StageEstimate
from recoup.orchestrator.stage import Metrics, StageContext, register_stage
from recoup.stages.document.facts import SOURCE_STAGES, facts_from_folders
from recoup.stages.document.pages import HTML, MARKDOWN, build_report, write_report

__all__ = ["HTML", "MARKDOWN", "ReportConfig", "report_stage"]


class ReportConfig(StrictModel):
    title: str | None = Field(None, description="Report title; unset: the run folder's name.")
    spectra_heads: int = Field(
        4, ge=0,
        description="Heads whose singular value spectra are plotted: the best-scored chosen "
        "heads (select), else the heads with the largest top singular value.",
    )


def _printed(m: Metrics) -> str:
    return m["table"] + f"\n\nreport: {m['html']}"


def estimate_report(inp: EstimateInputs) -> StageEstimate:
    """Host only: manifests, small JSON files and a few plots; no model is loaded."""
    return StageEstimate(stage=inp.stage, workers=1, device_bytes=None, host_bytes=None,
                         disk_bytes=None, gpus_config=inp.task_resources[1], gpus_min=0,
                         fits=True, notes=("host only: reads manifests and small files, draws "
                                           "a few plots; no model is loaded",))


@register_stage(name="report", version=2, requires=("evaluate",),
                optional=tuple(s for s in SOURCE_STAGES if s != "evaluate"),
                summarize=lambda m: f"{m['plots']} plots", report=_printed,
                estimate=estimate_report)
def report_stage(ctx: StageContext) -> Metrics:
    cfg: ReportConfig = ctx.config
    facts = facts_from_folders(ctx.run_dir.resolve().name, ctx.inputs)
    rep = build_report(facts, title=cfg.title, spectra_heads=cfg.spectra_heads)
    write_report(rep, ctx.out_dir)
    return {"table": rep.table.markdown(), "plots": rep.html.count("<img "),
            "html": str(ctx.run_dir / "report" / HTML),
            "markdown": str(ctx.run_dir / "report" / MARKDOWN)}

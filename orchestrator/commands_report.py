"""``recoup report RUN_DIR`` and ``recoup compare RUN_DIR...``: tables and plots from the
finished stages of run directories, without running anything (no Ray, no models)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recoup.orchestrator.config import cli_number

if TYPE_CHECKING:
    from recoup.stages.document.facts import RunFacts


def facts_from_run_dir(run_dir: Path) -> RunFacts:
    """Facts from a run directory: every stage of its last config that is done (manifest
    current, outputs of the recorded sizes); the others are listed as skipped. Here and
    not in the document library, because it asks the runner which stages are done."""
    from recoup.orchestrator.runner import load_run_dir_config, plan_run
    from recoup.stages.document.facts import RunFacts, facts_from_folders

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


def cmd_report(args: argparse.Namespace) -> int:
    from recoup.stages.document.pages import build_report, write_report

    run_dir = Path(args.run_dir)
    facts = facts_from_run_dir(run_dir)
    if "evaluate" not in facts.folders:
        print(f"note: {run_dir} has no complete evaluate stage; the table has no metrics")
    report = build_report(facts, spectra_heads=args.spectra_heads)
    out = Path(args.out) if args.out else run_dir
    md, page = write_report(report, out)
    print(report.table.markdown())
    print(f"\nwritten: {md}\n         {page}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from recoup.stages.document.pages import build_comparison, write_report

    names = [Path(d).resolve().name for d in args.run_dirs]
    if len(set(names)) != len(names):
        raise ValueError("run directories to compare must have different folder names "
                         f"(they head the columns): {', '.join(args.run_dirs)}")
    report = build_comparison([facts_from_run_dir(Path(d)) for d in args.run_dirs])
    print(report.markdown)
    if args.out:
        out = Path(args.out)
        md, page = write_report(report, out, stem="compare")
        print(f"written: {md}\n         {page}")
    return 0


_count = cli_number(int, lambda v: v >= 0, "must be 0 or more")


def register(sub: Any) -> None:
    """Add ``report`` and ``compare`` to the ``recoup`` subcommands."""
    rep = sub.add_parser(
        "report", help="write the results table and plots of a run directory",
        description="One table (dense / degraded / recovered per metric, gap closed, "
        "trainable parameters, sparsity, wall time per stage) as Markdown and a "
        "self-contained HTML page with plots, from the run's finished stages.",
    )
    rep.add_argument("run_dir", help="a run directory written by `recoup run`")
    rep.add_argument("--out", help="folder for report.md and report.html (default: RUN_DIR)")
    rep.add_argument("--spectra-heads", type=_count, default=4, metavar="N",
                     help="heads whose singular value spectra are plotted (default 4)")
    rep.set_defaults(fn=cmd_report)

    cmp = sub.add_parser(
        "compare", help="the results table across runs (ablations)",
        description="One column per run: its recovered value of every metric and the gap it "
        "closed, under the setup that distinguishes it (degradation, recovery method, "
        "selector, trainable parameters, wall time).",
        epilog="example: recoup compare runs/lcc runs/lora runs/both --out runs/compare",
    )
    cmp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    cmp.add_argument("--out", help="folder for compare.md and compare.html (default: print "
                     "the Markdown only)")
    cmp.set_defaults(fn=cmd_compare)

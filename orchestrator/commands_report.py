"""``recoup report RUN_DIR`` and ``recoup compare RUN_DIR...``: tables and plots from the
finished stages of run directories, without running anything (no Ray, no models)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def cmd_report(args: argparse.Namespace) -> int:
    from recoup.stages.report import build_report, facts_from_run_dir, write_report

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
    from recoup.stages.report import build_comparison, facts_from_run_dir, write_report

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
    rep.add_argument("--spectra-heads", type=int, default=4, metavar="N",
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

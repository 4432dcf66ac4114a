"""``recoup`` command line: run, status.

Errors a person can fix (config, paths, a held lock, a failed stage) print as one
sentence and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from recoup.orchestrator.stage_logging import configure_console

#: Modules that add further subcommands: each has ``register(subparsers)`` whose parsers set
#: ``fn`` (args -> exit code), like ``run`` and ``status`` below.
COMMAND_MODULES: tuple[str, ...] = ("recoup.orchestrator.commands_report",
                                    "recoup.orchestrator.commands_cluster")

EXIT_USAGE = 2
EXIT_FAILED = 1


def _executor_factory(cfg, *, progress: bool = True,  # noqa: ANN001, ANN202 - RunConfig
                      verbose: bool = False):
    from recoup.orchestrator.stage import InProcessExecutor

    if cfg.cluster.mode == "inprocess":
        return InProcessExecutor

    def make():  # noqa: ANN202
        from recoup.cluster.runtime import RayExecutor

        return RayExecutor(cfg.cluster, progress=progress, verbose=verbose)

    return make


def cmd_run(args: argparse.Namespace) -> int:
    from recoup.orchestrator.config import load_config
    from recoup.orchestrator.runconfig import RunConfig
    from recoup.orchestrator.runner import run_pipeline

    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"run.dir={args.run_dir}")
    cfg = load_config(RunConfig, Path(args.config), overrides)
    # resolved once, here: the run.dir printed and stored in the run is where the files are,
    # whichever process (Ray worker, later `recoup status`) reads it
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(
        update={"dir": cfg.run.dir.expanduser().absolute()})})
    print(f"run directory: {cfg.run.dir}")
    from recoup.cluster.hostmem import fix_mmap_threshold

    # in-process stages free models and batches back to the OS (cluster/hostmem.py)
    fix_mmap_threshold(cfg.cluster.mmap_threshold)
    run_pipeline(cfg, executor_factory=_executor_factory(
        cfg, progress=not args.no_progress, verbose=args.verbose), progress=not args.no_progress)
    return 0


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


def cmd_status(args: argparse.Namespace) -> int:
    from recoup.orchestrator.runner import load_run_dir_config, status_rows

    cfg = load_run_dir_config(Path(args.run_dir))
    rows = status_rows(cfg, verify="sha256" if args.verify else "size")
    print(_table(rows, ("stage", "state", "duration", "finished", "details")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recoup",
        description="Restore the accuracy that pruning or quantization took from an LLM.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run", help="run (or resume) a recovery pipeline from a YAML config",
        description="Run every stage of the config's pipeline that is not already done in the "
        "run directory. Finished stages whose config and inputs are unchanged are reused; "
        "changed ones re-run with what follows them.",
        epilog="example: recoup run configs/smollm2-quick.yaml degrade.sparsity=0.6",
    )
    run.add_argument("config", help="YAML run config, e.g. configs/smollm2-quick.yaml")
    run.add_argument("overrides", nargs="*", metavar="key.sub=value",
                     help="dotted overrides of config values, e.g. degrade.sparsity=0.6")
    run.add_argument("--run-dir", help="run directory (overrides run.dir)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--verbose", action="store_true",
                     help="also print the workers' output (weight loading, lm-eval, DeepSpeed, "
                     "Ray Train) as it is written to the stage's log under RUN/logs/")
    run.set_defaults(fn=cmd_run)

    st = sub.add_parser("status", help="show each stage of a run directory",
                        description="Each stage's state (done / stale / pending / running / "
                        "failed) against the config the directory was last run with.")
    st.add_argument("run_dir", help="a run directory written by `recoup run`")
    st.add_argument("--verify", action="store_true",
                    help="also check every output's sha256 (reads all files)")
    st.set_defaults(fn=cmd_status)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


EXIT_INTERRUPTED = 130


def _interrupted(debug: bool) -> int:
    """Ctrl-C: one line, the shell's exit status for SIGINT. Finished stages keep their
    manifests; the interrupted one is recorded as failed and re-runs next time."""
    if debug:
        raise
    print("recoup: interrupted; finished stages are kept, the next run resumes from them",
          file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after options (`run CFG --run-dir D a.b=1`): argparse
    # stops filling a positional list at the first option, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [e for e in extra
               if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = [*args.overrides, *extra]
    configure_console(logging.DEBUG if args.debug else logging.INFO,
                      verbose=args.debug or getattr(args, "verbose", False))
    from recoup.orchestrator.config import ConfigError
    from recoup.orchestrator.lock import LockHeldError
    from recoup.orchestrator.runner import StageFailedError

    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return _interrupted(args.debug)
    except (ConfigError, LockHeldError, FileNotFoundError, ValueError) as e:
        if args.debug:
            raise
        print(f"recoup: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"recoup: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_USAGE
    except StageFailedError as e:
        if isinstance(e.cause, KeyboardInterrupt):
            return _interrupted(args.debug)
        if args.debug:
            raise
        print(f"recoup: error: {e} (details: {Path('logs')}/{e.stage}.log in the run directory)",
              file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

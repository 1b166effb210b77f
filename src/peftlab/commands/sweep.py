"""peftlab sweep SWEEP.yaml [key=value ...] [--parallel N] [--output DIR] [--dry-run] [--no-report]

Runs every point of a sweep (a base config times a grid; see ``peftlab.lab.sweep``), each in
its own process and run directory, skipping points already finished; failures are recorded
and the sweep goes on. Exit status: 0 when every point succeeded, 1 when some failed. At the
end the report (``report.html`` + ``report.md``) is written into the sweep directory.
"""

from __future__ import annotations

NAME = "sweep"
HELP = "run a grid of training runs (resumable; failures recorded) and write a comparison report"


def add_arguments(p) -> None:
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file: base config, variants, grid, eval")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides of the base config, applied before the grid (e.g. data.path=... train.steps=2)")
    p.add_argument("--parallel", type=int, default=None, help="runs at a time (default: the file's 'parallel', else 1)")
    p.add_argument("--output", help="the sweep directory (default: the file's output_dir, else runs/sweeps/<name>)")
    p.add_argument("--dry-run", action="store_true", help="print the expanded runs and stop")
    p.add_argument("--no-retry-failed", action="store_true", help="leave runs that failed before alone")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")


def run(args) -> int:
    import sys

    from ..errors import ConfigError
    from ..lab.sweep import dump_plan, plan, run_sweep

    if args.parallel is not None and args.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {args.parallel}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"unexpected argument {bad[0]!r}: after the sweep file give key=value overrides")
    sweep = plan(args.sweep, args.output, args.overrides)
    if args.dry_run:
        print(dump_plan(sweep), end="")
        return 0
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    try:
        outcome = run_sweep(sweep, args.parallel, retry_failed=not args.no_retry_failed, say=say)
    except KeyboardInterrupt:
        return 130
    if not args.no_report:
        try:
            from ..lab.report import write_report

            paths = write_report([sweep.output_dir], sweep.output_dir, generate_missing=False)
            say(f"report: {paths['html']} and {paths['md']}")
        except ImportError as e:
            print(f"peftlab sweep: no report ({e}); pip install 'peftlab[lab]'", file=sys.stderr)
    return 1 if outcome["failed"] else 0

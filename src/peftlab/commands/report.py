"""peftlab report RUN_DIR... | SWEEP_DIR [--output DIR] [--prompt TEXT ...] [--no-generate]

Compares runs in one self-contained HTML page (report.html, plots embedded) and a Markdown
file (report.md + curves.png): trainable parameters, learning curves, quality and cost tables
with the best value per column marked, side-by-side generations for a fixed prompt list.
"""

from __future__ import annotations

NAME = "report"
HELP = "compare runs or a sweep: parameter table, learning curves, metrics, side-by-side generations (HTML + Markdown)"


def add_arguments(p) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_DIR|SWEEP_DIR")
    p.add_argument("--output", help="directory for report.html, report.md and curves.png "
                                    "(default: the sweep directory for one sweep, else ./report)")
    p.add_argument("--prompt", action="append", default=[],
                   help="a prompt for the side-by-side generations (repeatable; default: the four built-in ones)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="for generations the report has to make")
    p.add_argument("--no-generate", action="store_true",
                   help="show only stored samples; never load a model")
    p.add_argument("--title", help="the page title")


def run(args) -> int:
    import sys
    from pathlib import Path

    from ..lab.report import write_report

    paths = [Path(p) for p in args.paths]
    if args.output:
        out = Path(args.output)
    elif len(paths) == 1 and (paths[0] / "sweep.json").is_file():
        out = paths[0]
    else:
        out = Path("report")
    say = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    written = write_report(paths, out, prompts=args.prompt or None, generate_missing=not args.no_generate,
                           title=args.title, say=say, max_new_tokens=args.max_new_tokens)
    print(f"report: {written['html']}")
    print(f"markdown: {written['md']} (+ {written['png'].name})")
    return 0

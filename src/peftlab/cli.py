"""``peftlab`` command line: subcommands live in ``peftlab/commands/`` (one file each).

Bad input never shows a traceback: a ``PeftlabError`` prints its message and exits with 2.
``PEFTLAB_DEBUG=1`` shows the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from .errors import PeftlabError
from .version import __version__


def _commands() -> dict:
    from . import commands

    found = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            found[mod.NAME] = mod
    return found


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    parser = argparse.ArgumentParser(
        prog="peftlab",
        description="Fine-tune causal LMs with few parameters, compare methods, ship adapters.",
    )
    parser.add_argument("--version", action="version", version=f"peftlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = _commands()
    order = ["quickstart", "train", "params", "generate"]
    for name in sorted(mods, key=lambda n: (order.index(n) if n in order else len(order), n)):
        mod = mods[name]
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser, mods


def main(argv: list[str] | None = None) -> int:
    # Nothing is ever downloaded at run time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser, mods = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also come after options (argparse stops collecting positionals there)
    if extra:
        if hasattr(args, "args") and all("=" in a and not a.startswith("-") for a in extra):
            args.args = [*args.args, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(mods[args.command].run(args) or 0)
    except PeftlabError as e:
        if os.environ.get("PEFTLAB_DEBUG"):
            raise
        print(f"peftlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

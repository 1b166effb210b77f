"""peftlab data inspect [CONFIG] [key=value ...] [--index N] [--skip-bad-records] [--color]"""

from __future__ import annotations

import sys

from ._args import add_config_arguments, config_from_args

NAME = "data"
HELP = "look at the data as training will see it (peftlab data inspect CONFIG)"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    q = sub.add_parser("inspect", help="a rendered example with trained spans marked, token lengths, "
                                       "record counts, and padding waste with and without packing")
    add_config_arguments(q)
    q.add_argument("--index", type=int, default=0, help="which training example to show (default 0)")
    q.add_argument("--skip-bad-records", action="store_true",
                   help="skip malformed records and count them (data.skip_bad_records=true)")
    q.add_argument("--color", action="store_true", default=None, help="colour trained spans (default: on a terminal)")
    q.add_argument("--no-color", dest="color", action="store_false")


def run(args) -> int:
    from ..data.dataset import build_datasets
    from ..data.inspect import report
    from ..model.load import tokenizer_for

    if args.data_command != "inspect":
        print("usage: peftlab data inspect [CONFIG] [key=value ...]", file=sys.stderr)
        return 2
    cfg = config_from_args(args.args)
    if args.skip_bad_records:
        cfg.data.skip_bad_records = True
    packing = cfg.data.packing
    cfg.data.packing = False  # measure both ways from the unpacked examples
    cfg.data.group_by_length = False
    tok = tokenizer_for(cfg.model)
    data = build_datasets(cfg.data, tok, cfg.train.seed)
    color = sys.stdout.isatty() if args.color is None else args.color
    print(report(data, tok, cfg.train.batch_size, cfg.data.max_length, cfg.train.seed, args.index, color))
    if packing:
        print(f"(the config trains with data.packing=true: rows of {cfg.data.max_length} tokens)")
    return 0

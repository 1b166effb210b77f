"""peftlab train [CONFIG] [key=value ...] [--resume]"""

from __future__ import annotations

import os

from ._args import add_config_arguments, config_from_args

NAME = "train"
HELP = "train a model with a method (LoRA by default); writes a run directory"


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest good checkpoint in train.output_dir")


def run(args) -> int:
    from ..train.loop import train

    cfg = config_from_args(args.args)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in cfg.notes:
            print(note, flush=True)
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    print(f"run directory: {result.run_dir}")
    if result.eval_loss is not None:
        print(f"final eval loss: {result.eval_loss:.4f}")
    print(f"saved: {result.artifact}")
    return 0

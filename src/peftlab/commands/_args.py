"""Shared argument handling: ``[CONFIG] [key=value ...]``."""

from __future__ import annotations

import argparse

from ..config import Config, split_config_args
from ..configure import load_config


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "args", nargs="*", metavar="[CONFIG] [key=value]",
        help="an optional YAML config, then overrides such as peft.r=16 train.lr=1e-3",
    )


def config_from_args(args: list[str], defaults: list[str] | None = None) -> Config:
    path, overrides = split_config_args(args)
    return load_config(path, [*(defaults or []), *overrides])
